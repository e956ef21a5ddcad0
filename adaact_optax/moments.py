"""Second moments of layer inputs, in pure JAX (no Flax).

AdaAct scales each kernel weight by the running second moment of the input
feature it multiplies. These functions compute one step's statistic
``A = mean over rows of a * a``, where a *row* is every place the kernel is
applied: every example and leading position for a dense layer, every
(example, output position) patch for a convolution. Results are float32 and
computed from ``stop_gradient`` of the input, whatever its dtype.

Convolutions never build the patch tensor (batch x positions x k*C). Instead
``x**2`` is contracted, one spatial axis at a time, with a 0/1 matrix
``(k, n)`` marking which input rows each kernel offset reads over all output
positions (padding, strides and dilations folded in), and the batch is summed
last. The largest temporary is ``x**2``. Summing the batch last matters under
data parallelism: each device reduces its own examples and only the
``(*kernel, C)`` result is all-reduced, never a ``(spatial, C)`` sum.
"""

from adaact_optax._src import moments as _impl
from adaact_optax._src.moments import (InputMoments, combine, dense_moments, conv_moments,
                                       conv_window_sums, input_moments, constant_moments,
                                       token_moments)

#: The default floor that ``token_moments`` adds to a token's frequency. With power 0.5 no
#: embedding row gets more than 1/sqrt(0.01) = 10x the step of an input feature whose second
#: moment is 1, however rare its token.
EMBEDDING_FLOOR = _impl.EMBEDDING_FLOOR

__all__ = ["combine", "constant_moments", "conv_moments", "conv_window_sums", "dense_moments",
    "EMBEDDING_FLOOR", "input_moments", "InputMoments", "token_moments"]

# Documented, doctested and pickled as members of this module.
for _name in ('InputMoments', 'combine', 'dense_moments', 'conv_moments', 'conv_window_sums',
              'input_moments', 'constant_moments', 'token_moments'):
  globals()[_name].__module__ = __name__
del _name
