"""The live objects of a training and the one step that uses them.

:func:`build_parts` instantiates the configured network, objectives, aggregator, optimizer and
scheduler and wraps them in the per-objective ``TrainStep``; :class:`Parts` holds them with the
OGR tracker and the step-metric buffer, and converts them to and from a
:class:`~segmerge.engine.checkpoint.TrainingState`. :class:`Iteration` is the
``SupervisedTrainer(iteration_update=...)`` function: forward -> named losses ->
``TrainStep.step`` -> scheduler.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from monai.bundle import ConfigParser

from segmerge.aggregation import Aggregator, OGRTracker
from segmerge.engine.checkpoint import CHECKPOINT_FORMAT, TrainingState
from segmerge.engine.config import ConfigError
from segmerge.engine.metrics_buffer import StepMetrics
from segmerge.engine.rng import rng_state, set_rng_state
from segmerge.engine.settings import Settings, root_message
from segmerge.step import TrainStep

__all__ = ["Iteration", "Parts", "build_parts", "check_network_state"]

T = TypeVar("T")


@dataclass
class Parts:
    """What one training trains and keeps (see the module docstring)."""

    network: torch.nn.Module
    objectives: Any
    aggregator: Aggregator
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_step: TrainStep
    scaler: torch.amp.GradScaler | None
    ogr: OGRTracker
    metrics: StepMetrics

    def state(
        self, iteration: int, steps_per_epoch: int, best: Mapping[str, Any], run_id: str | None,
        tracking_uri: str, resolved: tuple[dict[str, Any], list[str], dict[str, str]],
    ) -> TrainingState:  # fmt: skip
        """The checkpoint of this moment (``resolved``: ``resolved_config``'s triple)."""
        config, expressions, derived = resolved
        objectives_state = getattr(self.objectives, "state_dict", dict)  # subset draws
        return TrainingState(
            format=CHECKPOINT_FORMAT,
            model=self.network.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else {},
            aggregator=self.aggregator.state_dict(),
            train_step=self.train_step.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else {},
            ogr=self.ogr.state_dict(),
            metrics=self.metrics.state_dict(),
            objectives=objectives_state(),
            rng=rng_state(),
            iteration=int(iteration),
            epoch=int(iteration // steps_per_epoch),
            best=dict(best),
            run_id=run_id,
            tracking_uri=tracking_uri,
            config=json.dumps(config, default=repr),
            config_expressions=list(expressions),
            config_derived=dict(derived),
        )

    def restore(self, state: TrainingState, source: Any) -> None:
        """Load a checkpoint into the live objects and the random states.

        Raises:
            ConfigError: the checkpoint's network or state dicts do not fit this configuration.
        """
        check_network_state(self.network, state.model, source)
        try:
            self.network.load_state_dict(state.model)
            self.optimizer.load_state_dict(state.optimizer)
            if self.scheduler is not None and state.scheduler:
                self.scheduler.load_state_dict(state.scheduler)
            self.aggregator.load_state_dict(state.aggregator)
            self.train_step.load_state_dict(state.train_step)
            if hasattr(self.objectives, "load_state_dict"):
                self.objectives.load_state_dict(state.objectives)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(
                f"--resume {source}: checkpoint does not match this configuration "
                f"({root_message(err)})"
            ) from err
        if self.scaler is not None and state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.ogr.load_state_dict(state.ogr)
        self.metrics.load_state_dict(state.metrics)
        set_rng_state(state.rng)


def build_parts(
    parser: ConfigParser, settings: Settings, build_data: Callable[[], T]
) -> tuple[Parts, T]:
    """Instantiate the configured components on ``settings.device``, then the data
    (``build_data()``), then the step around them: this order is the order of the random draws
    of every training so far, so it stays.

    Raises:
        ConfigError: a component that cannot be built, a patch size the network cannot
            downsample.
    """
    try:
        network = parser.get_parsed_content("network_def")
        network.to(settings.device)
        objectives = parser.get_parsed_content("objectives")
        aggregator = parser.get_parsed_content("aggregator")
        optimizer = parser.get_parsed_content("optimizer")
        scheduler = parser.get_parsed_content("lr_scheduler")
    except ConfigError:
        raise
    except Exception as err:  # ConfigParser wraps the component's own ValueError
        raise ConfigError(f"invalid configuration: {root_message(err)}") from err
    divisor = int(getattr(network, "divisor", 1))
    if settings.patch_size % divisor:
        raise ConfigError(
            f"patch_size must be a multiple of {divisor} for this network "
            f"({len(getattr(network, 'features', [])) - 1} downsamplings), "
            f"got {settings.patch_size}"
        )
    data = build_data()
    scaler = torch.amp.GradScaler("cuda") if settings.amp else None
    try:
        train_step = TrainStep(
            network,
            optimizer,
            aggregator,
            strategy=parser.get_parsed_content("strategy"),
            refresh_every=settings.refresh_every,
            clip_norm=parser.get_parsed_content("clip_norm"),
            scaler=scaler,
            jacobian=settings.jacobian,
        )
    except ValueError as err:
        raise ConfigError(str(err)) from err
    parts = Parts(
        network, objectives, aggregator, optimizer, scheduler, train_step, scaler,
        OGRTracker(), StepMetrics(),
    )  # fmt: skip
    return parts, data


def check_network_state(network: torch.nn.Module, weights: Mapping[str, Any], source: Any) -> None:
    """Raise a short ConfigError when ``weights`` are not this network's (names and shapes)."""
    own = network.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [
        k
        for k in own
        if k in weights and tuple(getattr(weights[k], "shape", ())) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} of another shape (e.g. {k}: "
                f"{tuple(weights[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise ConfigError(
            f"--resume {source}: the checkpoint's network is not this one: "
            + ", ".join(parts)
            + " parameter tensors"
        )


def _as_tensor(x: Any) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


class Iteration:
    """One per-objective step, the ``iteration_update`` of MONAI's ``SupervisedTrainer``.

    Args:
        parts: the live objects.
        device: where the batch goes.
        amp: autocast the forward pass.
        reference_patches: fixed validation patches; with an aggregator that
            ``needs_reference`` (Gradient-Blending), step ``i`` adds the fused loss on patch
            ``i mod len``.
    """

    def __init__(
        self, parts: Parts, device: torch.device, amp: bool, reference_patches: Sequence[Any]
    ) -> None:
        self.parts = parts
        self.device = device
        self.amp = amp
        self.reference_patches = reference_patches
        self.needs_reference = parts.aggregator.needs_reference

    def __call__(self, engine: Any, batch: Mapping[str, Any]) -> Any:
        p = self.parts
        image = _as_tensor(batch["image"]).to(self.device, non_blocking=True)
        label = _as_tensor(batch["label"]).to(self.device, non_blocking=True)
        avail = batch.get("available")
        if avail is not None:
            avail = _as_tensor(avail).to(self.device).bool().reshape(image.shape[0], -1)
        p.network.train()
        with torch.autocast(self.device.type, enabled=self.amp):
            outputs = p.network(image, avail)
            named = p.objectives(outputs, label, avail)
        step = engine.state.iteration
        reference = self.reference_loss(step) if self.needs_reference else None
        if getattr(p.train_step, "jacobian", "parameters") == "outputs":
            # the objectives' inputs; heads the network derives from other heads (the shared
            # U-Net's fused.d* = mean of modality.*) are left out so no path counts twice
            derived = set(getattr(p.network, "derived_outputs", ()))
            heads = {k: v for k, v in outputs.items() if k not in derived}
            report = p.train_step.step(named, reference, outputs=heads)
        else:
            report = p.train_step.step(named, reference)
        if p.scheduler is not None:
            p.scheduler.step()
        return report

    def reference_loss(self, step: int) -> torch.Tensor:
        """Fused validation loss on a fixed patch (Gradient-Blending's gradient estimator)."""
        patch = self.reference_patches[step % len(self.reference_patches)]
        image = patch["image"][None].to(self.device)
        label = patch["label"][None].to(self.device)
        avail = patch.get("available")
        avail = None if avail is None else avail[None].to(self.device)
        with torch.autocast(self.device.type, enabled=self.amp):
            outputs = self.parts.network(image, avail)
            named = self.parts.objectives({"fused.d0": outputs["fused.d0"]}, label, avail)
        return named.losses.sum()
