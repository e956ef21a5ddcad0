"""AdaAct for Optax and Flax: per-input-neuron learning rates from activation statistics."""

from adaact_optax import linen, matching, moments, sharding
from adaact_optax.accumulation import MultiSteps, MultiStepsState
from adaact_optax.train_state import TrainState
from adaact_optax.transform import ScaleByAdaActState, adaact, scale_by_adaact

__all__ = [
    "MultiSteps",
    "MultiStepsState",
    "ScaleByAdaActState",
    "TrainState",
    "adaact",
    "linen",
    "matching",
    "moments",
    "scale_by_adaact",
    "sharding",
]
__version__ = "0.1.0"
