"""AdaAct for Optax and Flax: per-input-neuron learning rates from activation statistics."""

from adaact_optax import capture, layout, linen, moments, nnx, sharding
from adaact_optax.capture import (
    CoverageReport, UncapturedWeightWarning, coverage, stats_shapes, value_grad_and_stats)
from adaact_optax.accumulation import MultiSteps, MultiStepsState
from adaact_optax.diagnostics import activation_summary
from adaact_optax.train_state import TrainState
from adaact_optax.transform import (ScaleByActivationRMSState, ScaleByAdaActState, adaact,
                                    migrate_state, scale_by_activation_rms, scale_by_adaact)
from adaact_optax.wrappers import lookahead

__all__ = [
    "CoverageReport",
    "UncapturedWeightWarning",
    "capture",
    "coverage",
    "stats_shapes",
    "value_grad_and_stats",
    "MultiSteps",
    "MultiStepsState",
    "ScaleByActivationRMSState",
    "ScaleByAdaActState",
    "TrainState",
    "activation_summary",
    "adaact",
    "linen",
    "layout",
    "lookahead",
    "migrate_state",
    "moments",
    "nnx",
    "scale_by_activation_rms",
    "scale_by_adaact",
    "sharding",
]
__version__ = "0.2.0"
