"""Flax Linen adapter: AdaAct's statistics from an unmodified Linen model.

``apply(model, variables, *args)`` runs ``model.apply`` through the capture
engine (``adaact_optax.capture``): every parameter that multiplies an
activation gets its statistics (Dense, DenseGeneral, Einsum, Conv,
ConvTranspose, ConvLocal, recurrent cells under ``nn.RNN``, ``nn.scan``
stacks, ``Embed.attend``, custom layers...), returned in the mutable
collection ``COLLECTION`` at the parameters' paths, in the keep-rank layout.
No ``variable_axes`` entry for ``COLLECTION`` is needed under ``nn.scan``.

``capture()`` is the older interception-based capture (Dense, DenseGeneral,
Conv, Embed lookups and attend only, 0.1.0 layout) for code that calls ``model.apply`` itself;
it warns about layers with parameters it cannot see into. ``sow_input`` is
the hatch for a custom layer whose weight no capture can see (a quantized
kernel, a weight computed before its matmul).
"""

from adaact_optax._src.flax import linen as _impl
from adaact_optax._src.flax.linen import (apply, capture, stats_shapes, sow_input, layer_moments)

#: The Flax variable collection, ``"adaact_stats"``, in which ``apply`` returns the statistics.
#: ``mutated[COLLECTION]`` is the statistics tree, keyed like the params.
COLLECTION = _impl.COLLECTION

__all__ = ["apply", "capture", "COLLECTION", "layer_moments", "sow_input", "stats_shapes"]

# Documented, doctested and pickled as members of this module.
for _name in ('apply', 'capture', 'stats_shapes', 'sow_input', 'layer_moments'):
  globals()[_name].__module__ = __name__
del _name
