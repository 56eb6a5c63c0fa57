"""Skip an optimizer step on a device-side flag, without synchronising with the host.

A skipped step must leave the parameters *and* the optimizer state (Adam's moments and step
counter, SGD's momentum) exactly as they were. Zeroing the gradient is not enough: Adam with a
zero gradient still decays its moments, advances its step counter and moves the parameters by
momentum. Reading the flag on the host (``if not ok.item(): return``) would stall the device
every step. Two sync-free ways are used:

1. Optimizers with ``_step_supports_amp_scaling`` (``fused=True`` Adam/AdamW/SGD/Adagrad): the
   ``found_inf`` tensor that ``GradScaler`` passes them. Their fused kernels return early when it
   is 1 and they subtract it back from the step counters, so the step is an exact no-op on device.
2. Every other optimizer: snapshot parameters and state tensors (one ``_foreach_copy_``), run
   ``step()``, then ``torch.where(ok, new, old)`` back into place. Costs one extra copy of the
   parameters and state; on CUDA, host-resident state (non-capturable Adam keeps ``step`` on the
   CPU) needs the flag on the host, which is one sync: use ``fused=True`` or ``capturable=True``
   there.

Before a parameter has any optimizer state (the first step) there is nothing to restore to: the
state is created inside ``step()`` (SGD's fused path even creates its momentum buffer
uninitialised and relies on the kernel to fill it). On those steps only, the flag is read on the
host and ``step()`` is not called when it is False.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GuardedOptimizerStep"]


class GuardedOptimizerStep:
    """Call ``optimizer.step()`` so that it has no effect where ``ok`` is False.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        self._snapshots: list[Tensor] = []

    def _live_params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _state_ready(self, params: list[Tensor]) -> bool:
        state = self.optimizer.state
        return all(len(state.get(p, {})) > 0 for p in params)

    def _tracked(self, params: list[Tensor]) -> list[Tensor]:
        tensors = list(params)
        for p in params:
            for value in self.optimizer.state[p].values():
                if isinstance(value, Tensor):
                    tensors.append(value)
        return tensors

    def step(self, ok: Tensor) -> None:
        """Step the optimizer where ``ok`` (0-dim bool tensor) is True; no-op otherwise.

        Args:
            ok: 0-dim bool tensor on the parameters' device.
        """
        params = self._live_params()
        if not params:
            return
        if not self._state_ready(params):
            # First step for some parameter: no state to restore to (see module docstring).
            if bool(ok):  # host read, only until every parameter has state
                self.optimizer.step()
            return
        if self.fused:
            opt = self.optimizer
            opt.grad_scale = None  # type: ignore[attr-defined]
            opt.found_inf = (~ok).to(torch.float32)  # type: ignore[attr-defined]
            try:
                opt.step()
            finally:
                del opt.grad_scale, opt.found_inf  # type: ignore[attr-defined]
            return
        tensors = self._tracked(params)
        if len(self._snapshots) != len(tensors) or any(
            s.shape != t.shape or s.dtype != t.dtype or s.device != t.device
            for s, t in zip(self._snapshots, tensors)
        ):
            self._snapshots = [torch.empty_like(t) for t in tensors]
        torch._foreach_copy_(self._snapshots, tensors)
        self.optimizer.step()
        flags: dict[torch.device, Tensor] = {ok.device: ok}
        with torch.no_grad():
            for t, s in zip(tensors, self._snapshots):
                flag = flags.get(t.device)
                if flag is None:  # host-resident state of a device model: one transfer
                    flag = flags[t.device] = ok.to(t.device)
                torch.where(flag, t, s, out=t)
