"""Flax NNX adapter: AdaAct's statistics from an unmodified NNX model.

``apply(model, *args)`` runs ``model(*args)`` through the capture engine
(``adaact_optax.capture``) and returns the statistics of every parameter that
multiplies an activation as an ``nnx.State`` at the paths of
``nnx.state(model, wrt)``: Linear, LinearGeneral, Einsum, Conv,
ConvTranspose, LoRA, layers inside ``nnx.scan``/``nnx.vmap``/``nnx.remat``
in the forward pass, custom modules. The model's other state (BatchNorm
statistics, RNG counters) is updated as a plain call would update it.
``sow_input`` is the hatch for custom layers whose weight no capture can see.
"""

from adaact_optax._src.flax.nnx import (apply, stats_shapes, sow_input)

__all__ = ["apply", "sow_input", "stats_shapes"]

# Documented, doctested and pickled as members of this module.
for _name in ('apply', 'stats_shapes', 'sow_input'):
  globals()[_name].__module__ = __name__
del _name
