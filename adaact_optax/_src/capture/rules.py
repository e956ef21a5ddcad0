"""THE table: how the capture engine treats each JAX primitive.

This is the only place primitive names appear. A primitive not in ``TABLE``
gets ``OTHER``: with a parameter among its inputs, its outputs are opaque
(the parameter is reported uncaptured if they reach a contraction), and a
primitive with a jaxpr of its own that has no row here (``shard_map``,
``pallas_call``...) reports the parameters passed into it. See README.md
here for how to add a primitive.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from adaact_optax._src.capture import contractions, control_flow, gathered, row_mask, views
from adaact_optax._src.capture import jax_internals as jc
from adaact_optax._src.capture.kinds import DATA, opaque, param_sources


class Rule(NamedTuple):
  """How the walker treats one primitive.

  Attributes:
    apply: ``apply(walker, eqn, invals, inkinds, in_mm)``, called when a
      parameter (or, with ``sees_mixed``, an activation combined with one) is
      among the inputs. ``in_mm``: per input, whether it is a captured
      contraction's output. Returns ``(kinds, out_mm)`` per output, the
      walker having bound the equation; a ``nested`` rule evaluates the
      primitive itself and returns ``(outs, kinds, out_mm)``.
    tags: the row-mask rule, ``tags(eqn, in_tags) -> out tags or None``
      (see ``row_mask``); primitives with a jaxpr of their own skip it (their
      ``nested`` rules set their outputs' tags).
    nested: a higher-order primitive whose body the rule evaluates with
      child walkers (the reading walker of the fast route refuses it).
    data_out: without parameter inputs, the outputs are plain data: a
      contraction or lookup of an activation combined with a parameter (a
      norm's scale) is no longer combined with it.
    sees_mixed: ``apply`` also runs when an input is such a combination
      (to report a weight passed in as data and scaled by a parameter).
    passes_mm: the output of a captured contraction (or a sum of them) stays
      one through this op, a view or a part of it (a bias added after it is
      still its bias).
    sums_mm: a sum of captured contractions' outputs is one too (``W_i x +
      W_h h`` in an LSTM cell): a parameter added to it is a bias.
    moves: the op only moves or retypes the elements of its first operand
      (for ``argument_order``: a raw input stays raw through it).
    inlined_body: for a call-like primitive whose body is inlined, its body
      as a ``ClosedJaxpr`` (``inlined_body(eqn)``; for ``argument_order``).
    gathered: ``gathered(walker, eqn, invals, inkinds, in_mm)``, called first when
      slices of a parameter picked at run time (``kinds.Gathered``) are
      among the inputs: ``(outs, kinds, out_mm)``, or None to treat them as
      data (see ``gathered.py``).
  """

  apply: Callable
  tags: Callable = row_mask.elementwise_tags
  nested: bool = False
  data_out: bool = False
  sees_mixed: bool = False
  passes_mm: bool = False
  sums_mm: bool = False
  moves: bool = False
  inlined_body: Callable | None = None
  gathered: Callable | None = None

  def is_contraction_output(self, in_mm) -> bool | str:
    """Whether a parameter-free equation's outputs are captured contractions'
    outputs; ``in_mm``: each operand's marker (False, True, or
    ``kinds.GATHERED_OUTPUT``, which an op that only moves elements passes on)."""
    if not in_mm:
      return False
    if self.passes_mm:
      return in_mm[0]
    return self.sums_mm and all(in_mm)


def other(walker, eqn, invals, inkinds, in_mm):
  """Any primitive without a row: opaque outputs, or unseen nested parameters."""
  n_out, name = len(eqn.outvars), eqn.primitive.name
  if jc.has_subjaxpr(eqn):
    walker.trace.miss(param_sources(inkinds), f"it is passed into `{name}`, which the capture "
                      "does not see into")
    return [DATA] * n_out, [False] * n_out
  return [opaque(inkinds, f"`{name}`")] * n_out, [False] * n_out


OTHER = Rule(other)

# Names that moved between JAX releases are grouped (``pjit`` became ``jit``,
# ``custom_vjp_call_jaxpr`` became ``custom_vjp_call``); tests/capture/test_jax_compat.py
# checks the installed JAX against every group here.
CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})  # inlined
REMAT = frozenset({"checkpoint", "remat2", "remat"})
CUSTOM_JVP = frozenset({"custom_jvp_call"})
CUSTOM_VJP = frozenset({"custom_vjp_call", "custom_vjp_call_jaxpr"})
SCAN, WHILE, COND = "scan", "while", "cond"
DOT, CONV, GATHER = "dot_general", "conv_general_dilated", "gather"
DYNAMIC_SLICE = "dynamic_slice"  # params: slice_sizes; operands: the array, one start per axis
# Ops that only move or retype elements: a parameter seen through them is
# still that parameter.
IDENTITY = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                      "sharding_constraint", "pvary", "optimization_barrier"})

_view = views.layout_rule

# Layout ops, followed symbolically (views.py).
LAYOUT_RULES: dict[str, Rule] = {
    "transpose": Rule(_view(views.single(views.view_transpose)), tags=row_mask.transpose_tags,
                      passes_mm=True, moves=True,
                      gathered=gathered.follow(gathered.transpose_dims)),
    "reshape": Rule(_view(views.single(views.view_reshape)), tags=row_mask.reshape_tags,
                    passes_mm=True, moves=True, gathered=gathered.follow(gathered.reshape_dims)),
    "squeeze": Rule(_view(views.single(views.view_squeeze)), tags=row_mask.squeeze_tags,
                    passes_mm=True, moves=True, gathered=gathered.follow(gathered.squeeze_dims)),
    "broadcast_in_dim": Rule(_view(views.single(views.view_broadcast)),
                             tags=row_mask.broadcast_tags, passes_mm=True, moves=True,
                             gathered=gathered.follow(gathered.broadcast_dims)),
    "slice": Rule(_view(views.single(views.view_slice)), passes_mm=True, moves=True,
                  gathered=gathered.lose),
    "rev": Rule(_view(views.single(views.view_rev)), tags=row_mask.forget_tags, moves=True,
                gathered=gathered.lose),
    "pad": Rule(_view(views.pad), gathered=gathered.lose),
    # One gate of a fused projection: still a contraction's output.
    "split": Rule(_view(views.split), passes_mm=True, moves=True, gathered=gathered.lose),
    "concatenate": Rule(_view(views.concatenate), gathered=gathered.lose),
    # At run-time starts: a layer of a stacked weight (gathered slices).
    DYNAMIC_SLICE: Rule(gathered.dynamic_slice, gathered=gathered.lose),
}
LAYOUT = frozenset(LAYOUT_RULES)

TABLE: dict[str, Rule] = {
    # Contractions, lookups and biases (contractions.py).
    DOT: Rule(contractions.dot, tags=row_mask.dot_tags, data_out=True, sees_mixed=True,
              gathered=gathered.dot),
    CONV: Rule(contractions.conv, tags=row_mask.conv_tags, data_out=True, sees_mixed=True,
               gathered=gathered.conv),
    GATHER: Rule(contractions.gather, tags=row_mask.gather_tags, data_out=True,
                 gathered=gathered.lose),
    "add": Rule(contractions.bias, sums_mm=True, gathered=gathered.bias),
    "add_any": Rule(contractions.bias, sums_mm=True, gathered=gathered.bias),
    **LAYOUT_RULES,
    **{name: Rule(views.identity, passes_mm=True, moves=True, gathered=gathered.keep)
       for name in IDENTITY},
    # Gathered slices scaled by data are no longer the weight's values.
    **{name: Rule(other, gathered=gathered.scaled) for name in ("mul", "div")},
    # Higher-order primitives (control_flow.py).
    **{name: Rule(control_flow.call, nested=True, inlined_body=jc.call_jaxpr) for name in CALLS},
    **{name: Rule(control_flow.remat, nested=True, inlined_body=control_flow.remat_body)
       for name in REMAT},
    **{name: Rule(control_flow.custom_call, nested=True, inlined_body=jc.call_jaxpr)
       for name in CUSTOM_JVP | CUSTOM_VJP},
    SCAN: Rule(control_flow.scan, nested=True),
    WHILE: Rule(control_flow.while_loop, nested=True),
    COND: Rule(control_flow.cond, nested=True),
    # Only a row-mask rule: reductions keep the rows of the axes they keep...
    **{name: Rule(other, tags=row_mask.reduce_tags)
       for name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                    "reduce_or", "reduce_xor", "reduce_window", "reduce_window_sum",
                    "reduce_window_max", "reduce_window_min", "argmax", "argmin")},
    # ... and these move rows around.
    **{name: Rule(other, tags=row_mask.forget_tags)
       for name in ("sort", "scatter", "scatter-add", "dynamic_update_slice")},
}


def rule_for(name: str) -> Rule:
  return TABLE.get(name, OTHER)
