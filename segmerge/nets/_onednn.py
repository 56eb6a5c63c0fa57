"""Eval-mode CPU fast path of the segmerge networks: 3D convolutions through oneDNN at any batch.

Why (torch.profiler, one 32³ window at batch 1, 1 and 2 threads): about 93 % of a forward of
``MultiModalDSNet`` or ``SharedModalityUNet`` is ``aten::slow_conv3d_forward``, PyTorch's
im2col + GEMM fallback. PyTorch's backend heuristic (``ConvParams::use_mkldnn``) sends a float32
CPU convolution to oneDNN only when ``groups > 1``, the batch is larger than 1, the kernel is
larger than 3 or ``N * C * D * H > 20480``; at batch 1 and these widths (8-64 channels on
4³-32³ maps) almost every convolution falls back, and oneDNN runs the same convolution 3-13x
faster (full-resolution decoder convolution 16 -> 8 channels at 32³: 42 ms vs 3 ms). A sliding
window runs at batch ``sw_batch_size`` = 1.

:class:`OneDNNConv3d` is ``nn.Conv3d`` with the eval-mode forward on CPU float32 calling oneDNN
directly (``aten::mkldnn_convolution``, the kernel PyTorch itself picks for larger batches), with
the module's live weight and bias (nothing cached, so changed weights take effect at once). Results
equal the fallback's to float32 rounding (a different summation order; about 1e-6 on the logits).
Everything else takes ``nn.Conv3d``'s own path, so that nothing changes there:

* train mode (training stays bit-identical);
* TorchScript scripting and tracing (``torch.jit``, the TorchScript ONNX exporter), dynamo
  (``torch.compile``, ``torch.export``);
* CUDA or any other device, dtypes other than float32, CPU autocast;
* ``torch.backends.mkldnn.flags(enabled=False)``, PyTorch's own switch, which turns the fast path
  off as well (the tests compare against the fallback this way).

Parameters and state-dict keys are those of ``nn.Conv3d`` (checkpoints load either way).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OneDNNConv3d", "use_onednn_convs"]


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose eval-mode CPU float32 forward runs oneDNN at any batch size.

    Not built directly: :func:`use_onednn_convs` turns a network's ``nn.Conv3d`` layers into this
    class after construction (same parameters, same state-dict keys).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """oneDNN in eager eval mode on CPU float32 (see the module docstring), else ``nn.Conv3d``."""
        if not self.training and not (torch.jit.is_scripting() or torch.jit.is_tracing()):
            if self._onednn_eligible(input):
                return self._onednn_forward(input)
        return self._conv_forward(input, self.weight, self.bias)

    @torch.jit.unused
    def _onednn_eligible(self, input: torch.Tensor) -> bool:
        # Python-level checks of devices, dtypes and flags only: no tensor values, no device sync.
        # Dynamo first: it must not trace the rest (torch.backends.mkldnn is on its skip list).
        return (
            not torch.compiler.is_compiling()
            and input.device.type == "cpu"
            and input.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and input.dim() == 5
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled("cpu")
        )

    @torch.jit.unused
    def _onednn_forward(self, input: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.mkldnn_convolution(
            input,
            self.weight,
            self.bias,
            list(self.padding),
            list(self.stride),
            list(self.dilation),
            self.groups,
        )


def use_onednn_convs(module: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Conv3d`` inside ``module`` into :class:`OneDNNConv3d`, in place.

    Only the class changes (the same parameter tensors, the same state-dict keys); subclasses of
    ``nn.Conv3d`` and transposed convolutions are left alone.

    Returns:
        ``module``.
    """
    for sub in module.modules():
        if type(sub) is nn.Conv3d:
            sub.__class__ = OneDNNConv3d
    return module
