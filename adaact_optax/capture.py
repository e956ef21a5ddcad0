"""AdaAct's statistics read from the computation itself: any JAX model.

AdaAct needs, for every weight that multiplies an activation, the mean of the
squared input elements it multiplies. That is a property of the computation,
not of a layer library: in a jaxpr, each ``dot_general`` or
``conv_general_dilated`` whose operand is (a view of) a parameter says exactly
which input elements meet which weight elements.

Two routes read them. ``value_grad_and_stats`` traces
``jax.value_and_grad(fun)`` as JAX does, walks the forward part of that jaxpr
without binding anything, then evaluates the jaxpr once (inlined) with the
contractions' inputs as extra outputs and adds their squared sums to each
parameter's statistics: the forward runs once and the tracing costs little
more than JAX's own. Where a parameter enters a higher-order primitive
(``scan``, ``while``, ``cond``, a non-inlined ``jit``, ``custom_jvp``) it
falls back to the evaluating route, which ``capture_call`` (and so
``linen.apply``/``nnx.apply``) always takes: trace ``fun`` once
(``jax.make_jaxpr``), re-evaluate the jaxpr equation by equation on the real
inputs (so gradients flow as usual) and record the statistics on the way,
rebuilding the higher-order primitives around it.

Parameters are followed through layout ops symbolically: each value derived
from a parameter by transpose / reshape / slice / split / concatenate /
broadcast / rev / pad / dtype casts keeps a map from its axes to the
parameter's axes (per axis, a list of ``(parameter axis, size, stride)``
factors), never an index array. Anything else applied to a parameter before
it reaches a contraction (``W * mask``, a dequantisation, a merged LoRA
``W0 + A @ B``) makes it *opaque*: that weight is reported, with the op's
name, as a weight whose statistics could not be captured
(``UncapturedWeightWarning``), never silently left to plain SGD.

Statistics are kept as ``(sum, count)`` so that every use of a weight (RNN
time steps, a layer applied twice, both branches of a ``cond``, ``while``
iterations) pools exactly, weighted by rows; weights sliced per iteration by
``scan`` (stacked layers) get per-slice statistics. Results follow the
keep-rank layout of ``adaact_optax.layout``: same rank as the parameter,
size 1 along axes the statistic does not vary along, whole blocks where it
varies per block (grouped convolutions, fused projections used with
different inputs). A feature that met no rows in the call (a weight in the
``cond`` branch not taken, an expert routed no tokens) gets ``-0.0``
(``adaact_optax.layout.NO_ROWS``): the transforms leave its second moment
as it was.

JAX internals used here live in ``adaact_optax._src.capture.jax_internals``;
the engine itself is the private package ``adaact_optax._src.capture`` (its
README says how to add a primitive).
"""

from adaact_optax._src.capture.api import (capture_call, coverage, stats_shapes,
                                           value_grad_and_stats)
from adaact_optax._src.capture.report import (ArgumentOrderWarning, CoverageReport,
                                              UncapturedWeightWarning)

__all__ = [
    "ArgumentOrderWarning",
    "CoverageReport",
    "UncapturedWeightWarning",
    "capture_call",
    "coverage",
    "stats_shapes",
    "value_grad_and_stats",
]

# Documented, doctested and pickled as members of this module.
for _name in __all__:
  globals()[_name].__module__ = __name__
del _name
