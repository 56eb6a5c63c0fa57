"""segmerge.step: the one module that talks to autograd for the aggregated update.

Per-objective gradients and reach (``loop`` or ``batched`` Jacobian), the aggregator call, the
merged gradient written to ``.grad``, clipping, a sync-free guarded optimizer step, amortised
refreshes, AMP loss scaling and torch.distributed averaging. ``TrainStep(jacobian="outputs")``
takes the coefficients from the gradients at the network's outputs instead (one backward
through the network per step).
"""

from segmerge.step._guard import GuardedOptimizerStep
from segmerge.step._jacobian import (
    ParamLayout,
    disjoint_groups,
    gradient_into,
    jacobian_batched,
    jacobian_loop,
)
from segmerge.step._reach import graph_reach, objective_roots, shared_bits
from segmerge.step._train_step import AUTO_STRATEGY, JACOBIAN_MODES, StepReport, TrainStep

__all__ = [
    "AUTO_STRATEGY",
    "JACOBIAN_MODES",
    "GuardedOptimizerStep",
    "ParamLayout",
    "StepReport",
    "TrainStep",
    "disjoint_groups",
    "gradient_into",
    "graph_reach",
    "jacobian_batched",
    "jacobian_loop",
    "objective_roots",
    "shared_bits",
]
