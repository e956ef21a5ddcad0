"""AdaAct for Optax and Flax: per-input-neuron learning rates from activation statistics.

``import adaact_optax`` loads no Flax module: the Flax adapters
(``adaact_optax.linen``, ``adaact_optax.nnx``) and ``TrainState`` are
imported on first access, so Equinox, Haiku and plain-JAX users need only
jax and optax.
"""

import importlib as _importlib
from typing import TYPE_CHECKING

from adaact_optax import capture, layout, moments, sharding
from adaact_optax.capture import (
    ArgumentOrderWarning, CoverageReport, UncapturedWeightWarning, coverage, stats_shapes,
    value_grad_and_stats)
from adaact_optax._src.accumulation import MultiSteps, MultiStepsState
from adaact_optax._src.diagnostics import activation_summary, scaling_summary
from adaact_optax._src.alias import adaact
from adaact_optax._src.migration import migrate_state
from adaact_optax._src.transform import (ScaleByActivationRMSState, ScaleByAdaActState,
                                         scale_by_activation_rms, scale_by_adaact)
from adaact_optax._src.wrappers import lookahead

if TYPE_CHECKING:  # what the lazy attributes below resolve to, for type checkers
  from adaact_optax import linen, nnx
  from adaact_optax._src.flax.train_state import TrainState

# Public attribute -> (module, attribute or None for the module itself), imported on first use.
_LAZY = {
    "linen": ("adaact_optax.linen", None),
    "nnx": ("adaact_optax.nnx", None),
    "TrainState": ("adaact_optax._src.flax.train_state", "TrainState"),
}


# Documented, doctested and pickled as members of this package.
for _obj in (MultiSteps, MultiStepsState, activation_summary, scaling_summary,
             ScaleByActivationRMSState, ScaleByAdaActState, adaact, migrate_state,
             scale_by_activation_rms, scale_by_adaact, lookahead):
  _obj.__module__ = __name__
del _obj


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f"module 'adaact_optax' has no attribute {name!r}")
  module_name, attribute = _LAZY[name]
  module = _importlib.import_module(module_name)
  value = module if attribute is None else getattr(module, attribute)
  globals()[name] = value  # later lookups skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ArgumentOrderWarning",
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
    "scaling_summary",
    "sharding",
]
__version__ = "0.2.0"
