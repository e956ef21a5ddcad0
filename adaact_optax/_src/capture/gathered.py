"""Slices of a parameter picked by run-time indices (``kinds.Gathered``).

``experts[ids]`` (routing), ``table[sampled]`` or a layer of a stacked weight
indexed in a loop (``lax.dynamic_index_in_dim(W, i)``) are data everywhere
but in a ``dot_general`` that contracts the slices' own axes with an
activation: there they are the weight, and each use's statistics go to the
slice its index picked (``gathered_stats``). The ``gathered`` hooks below are
the table's (``rules.Rule.gathered``): layout ops follow the slices' axes, a
``dot_general`` records their statistics, anything that mixes the slices up
(a slice, a scale by data, a loop or ``cond`` boundary) leaves them
``broken``: used as a weight afterwards, they are reported uncaptured.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from adaact_optax._src.capture import jax_internals as jc
from adaact_optax._src.capture import views
from adaact_optax._src.capture.contractions import dot_square_sums
from adaact_optax._src.capture.kinds import (DATA, GATHERED_OUTPUT, Gathered, Unsupported, View, is_param,
                                            opaque)
from adaact_optax._src.capture.sums import filled


# ----------------------------------------------------------------------------
# Why gathered slices can no longer be told apart.


def broken_by_layout(g: Gathered, name: str) -> Gathered:
  return dataclasses.replace(g, index=(), dims=None, broken=g.broken or (
      f"then laid out by `{name}`, which the capture does not follow for gathered slices"))


def reason(g: Gathered, what: str) -> str:
  return (f"its slices are picked by indices computed at run time (`{g.op}`) {what}, so "
          "the rows each slice meets cannot be told apart. Apply the weight through a "
          "`dot_general` right after the gather (e.g. `jnp.einsum('bi,bio->bo', x, "
          "experts[ids])`), or dispatch densely (a one-hot or capacity dispatch whose "
          "contraction keeps the expert axis)")


def across_bodies(kinds, how: str, keep=()) -> list:
  """Kinds crossing into or out of a loop or ``cond`` body: gathered slices (but
  those at positions ``keep``, whose indices are passed along) are no longer
  followed there (their indices live in another trace)."""
  return [dataclasses.replace(k, index=(), dims=None, broken=k.broken or (
      f"and then {how} a loop or `cond` body")) if isinstance(k, Gathered) and i not in keep
          else k for i, k in enumerate(kinds)]


def sources(g: Gathered) -> set:
  return {p.param for p in g.table.pieces}


# ----------------------------------------------------------------------------
# The table's ``gathered`` hooks: ``hook(walker, eqn, invals, inkinds, in_mm)`` ->
# ``(outs, kinds, out_mm)``, or None to treat the slices as data.


def keep(walker, eqn, invals, inkinds, in_mm):
  """Ops that only move or retype elements: still the same slices."""
  if not isinstance(inkinds[0], Gathered) or len(eqn.outvars) != 1:
    return None
  return walker.bind(eqn, invals), [inkinds[0]], [False]


def follow(dims_fn):
  """The hook of a layout op whose effect on the slices' axes ``dims_fn(g.dims, eqn)``
  says (None: it cannot say, and the slices are lost)."""
  def hook(walker, eqn, invals, inkinds, in_mm):
    g = inkinds[0]
    if not isinstance(g, Gathered):
      return None
    dims = None if g.dims is None else dims_fn(g.dims, eqn)
    if dims is None:
      kind = g if g.dims is None else broken_by_layout(g, eqn.primitive.name)
    else:
      kind = dataclasses.replace(g, dims=dims)
    return walker.bind(eqn, invals), [kind], [False]
  return hook


def lose(walker, eqn, invals, inkinds, in_mm):
  """Any other layout op (a slice, concatenation, another gather...): slices lost."""
  if not isinstance(inkinds[0], Gathered):
    return None
  n_out = len(eqn.outvars)
  kind = broken_by_layout(inkinds[0], eqn.primitive.name)
  return walker.bind(eqn, invals), [kind] * n_out, [False] * n_out


def transpose_dims(dims: tuple, eqn):
  return tuple(dims[i] for i in eqn.params["permutation"])


def squeeze_dims(dims: tuple, eqn):
  drop = {d % len(dims) for d in eqn.params["dimensions"]}
  return tuple(d for i, d in enumerate(dims) if i not in drop)


def reshape_dims(dims: tuple, eqn):
  """Only size-1 axes coming or going."""
  in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  if eqn.params.get("dimensions") is not None or (
      [n for n in in_shape if n != 1] != [n for n in out_shape if n != 1]):
    return None
  it = iter(d for d, n in zip(dims, in_shape) if n != 1)
  return tuple(next(it) if n != 1 else None for n in out_shape)


def broadcast_dims(dims: tuple, eqn):
  """Only size-1 axes added."""
  in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  where = eqn.params["broadcast_dimensions"]
  if not (all(in_shape[i] == out_shape[j] for i, j in enumerate(where))
          and all(out_shape[j] == 1 for j in range(len(out_shape)) if j not in where)):
    return None
  new = [None] * len(out_shape)
  for i, j in enumerate(where):
    new[j] = dims[i]
  return tuple(new)


def scaled(walker, eqn, invals, inkinds, in_mm):
  """Slices scaled by data (``experts[ids] * gate``): no longer the weight's values."""
  if any(is_param(k) for k in inkinds):
    return None
  name = eqn.primitive.name
  g = inkinds[0] if isinstance(inkinds[0], Gathered) else inkinds[1]
  others = [k for k in inkinds if k is not g]
  if eqn.outvars[0].aval.shape != eqn.invars[inkinds.index(g)].aval.shape or any(
      isinstance(k, Gathered) for k in others):
    return None
  kind = dataclasses.replace(g, index=(), broken=g.broken or (
      f"then scaled by `{name}` before the matmul (scale its input or output instead)"))
  return walker.bind(eqn, invals), [kind], [False]


def conv(walker, eqn, invals, inkinds, in_mm):
  """A convolution kernel made of gathered slices: reported."""
  if not isinstance(inkinds[1], Gathered) or is_param(inkinds[0]):
    return None
  walker.trace.miss(sources(inkinds[1]), reason(
      inkinds[1], "and then used as a convolution kernel, which the capture does not follow"))
  return walker.bind(eqn, invals), [DATA], [False]


def dot(walker, eqn, invals, inkinds, in_mm):
  """Statistics of gathered slices used as the weight of a ``dot_general``.

  None when the slices are not the weight here (the other operand is a
  parameter, or gathered too, or only the index axes are contracted): then
  they are data, as an embedding lookup's rows are.
  """
  sides = [i for i in (0, 1) if isinstance(inkinds[i], Gathered)]
  if len(sides) == 2 or is_param(inkinds[1 - sides[0]]):
    return None
  w = sides[0]
  g = inkinds[w]
  lc, rc, lb, rb = jc.dot_dimensions(eqn)
  a_c, w_c, a_b, w_b = (lc, rc, lb, rb) if w == 1 else (rc, lc, rb, lb)
  if not contracts_table_axes(g, w_c):
    return None
  outs = walker.bind(eqn, invals)
  if g.broken is not None:
    walker.trace.miss(sources(g), reason(g, g.broken))
    return outs, [DATA], [False]
  w_ndim, mask, tags = eqn.invars[w].aval.ndim, walker.mask, walker.tag(eqn.invars[1 - w])
  w_free = [v for v in range(w_ndim) if v not in w_c and v not in w_b]
  pooled = is_pooled(g, w_free)
  table_shape = g.table.shape

  def stats(values):
    a, index = (values, ()) if pooled else (values[0], values[1:])
    sums, count = dot_square_sums(a, a_c, a_b, w_c, w_b, w_ndim, mask, tags)
    return gathered_stats(g, table_shape, pooled, sums, count, index)
  walker.stat(g.table, stats, invals[1 - w] if pooled else (invals[1 - w],) + g.index)
  return outs, [DATA], [GATHERED_OUTPUT]


def bias(walker, eqn, invals, inkinds, in_mm):
  """Gathered slices added to a captured contraction's output (``x @ W + b[ids]``,
  ``einsum('bi,bio->bo', x, experts[ids]) + biases[ids]``) are its bias, as in
  ``contractions.bias``: statistic 1 for each slice its indices picked, the
  no-rows marker for the others (an expert routed no tokens keeps its second
  moment). None unless exactly one operand is gathered and the other is the
  output of a contraction whose weight is gathered slices (``kinds.GATHERED_OUTPUT``):
  else the slices are data (embedding rows added to a residual stream)."""
  sides = [i for i in (0, 1) if isinstance(inkinds[i], Gathered)]
  if len(sides) != 1 or in_mm[1 - sides[0]] != GATHERED_OUTPUT:
    return None
  g = inkinds[sides[0]]
  outs = walker.bind(eqn, invals)
  if g.broken is not None:
    walker.trace.miss(sources(g), (
        f"it is a bias picked by indices computed at run time (`{g.op}`) {g.broken}, and "
        "then added to a contraction's output, so which slices were used cannot be told "
        "apart. Add the gathered bias unchanged (`y + biases[ids]`)"))
    return outs, [DATA], [False]
  # One row per use: every use adds 1 to its slice's sums and its rows.
  ones = np.ones((1,) * eqn.invars[sides[0]].aval.ndim, np.float32)
  walker.stat(g.table, lambda index: gathered_stats(g, g.table.shape, False, ones, 1, index),
              g.index)
  return outs, [DATA], [GATHERED_OUTPUT]


# ----------------------------------------------------------------------------
# ``dynamic_slice`` of a parameter at run-time starts.


def dynamic_slice(walker, eqn, invals, inkinds, in_mm):
  """The table rule of ``dynamic_slice``: a static slice at literal starts, gathered
  slices of a view at run-time starts, opaque otherwise."""
  view = inkinds[0]
  if (all(jc.is_literal(v) for v in eqn.invars[1:]) or not isinstance(view, View)
      or any(is_param(k) for k in inkinds[1:])):
    return views.layout_rule(views.dynamic_slice)(walker, eqn, invals, inkinds, in_mm)
  return [dynamic_slice_kind(eqn, invals, view)], [False]


def dynamic_slice_kind(eqn, invals, view: View):
  """Whole slices along the axes of size 1 (a layer of a stacked weight,
  ``lax.dynamic_index_in_dim``), static slices where the start is a literal,
  the others ignored (full)."""
  name = eqn.primitive.name
  sizes = eqn.params["slice_sizes"]
  starts, limits, picked, window = [0] * len(sizes), list(view.shape), [], None
  for a, (atom, n, dim) in enumerate(zip(eqn.invars[1:], sizes, view.shape)):
    if n == dim:
      continue
    if jc.is_literal(atom):  # clamped as dynamic_slice clamps
      starts[a] = min(max(int(jc.literal_value(atom)), 0), dim - n)
      limits[a] = starts[a] + n
    elif n == 1:
      picked.append(a)
    elif window is None:
      window = (a, n, dim)
  try:
    table = views.view_slice(view, tuple(l - s_ for s_, l in zip(starts, limits)), starts,
                             limits)
  except Unsupported as e:
    return opaque([view], f"`{name}` ({e})")
  if not picked and window is None:  # only the starts of whole axes are computed
    return table
  dims = tuple(None if a in picked else ("table", a) for a in range(len(sizes)))
  slices = Gathered(table, tuple(picked), tuple(invals[1 + a] for a in picked), True, (),
                    True, dims, name)
  if window is not None:
    a, n, dim = window
    return dataclasses.replace(slices, index=(), broken=(
        f"as a dynamic index into a stacked weight: `{name}` takes a window of {n} "
        f"of {dim} along axis {a} at a start computed at run time (only whole slices, of "
        "size 1 along the indexed axis, are followed)"))
  return slices


# ----------------------------------------------------------------------------
# Statistics of gathered slices used as a weight.


def contracts_table_axes(g: Gathered, w_contract) -> bool:
  """Whether a contraction sums over the slices' own axes, as a matmul sums over a
  weight's input axis (unknown axes: assumed so). Over the index axes only, it
  combines looked-up rows (attention, pooling): they are its activation."""
  if g.dims is None:
    return True
  return any(g.dims[v] is not None and g.dims[v][0] == "table" for v in w_contract)


def is_pooled(g: Gathered, w_free) -> bool:
  """Whether every gathered slice meets the same rows: the indices have batch axes
  and each is a free axis of the weight operand (``h @ table[sampled].T``). Then the
  slices share one statistic (size 1 along the picked axes, never parameter-sized);
  otherwise (routing, a loop's dynamic index) each slice gets its own."""
  index_axes = [v for v, d in enumerate(g.dims or ()) if d is not None and d[0] == "index"]
  return bool(g.batch_shape) and all(v in w_free for v in index_axes)


def to_table_axes(g: Gathered, sums, table_shape):
  """``sums`` laid over the gathered value's axes -> ``(index part, rest)``: an array
  ``(*batch_shape or 1s, *rest sizes)`` and the table axes ``rest`` (all but the
  picked ones), the index part broadcast-ready (size 1 where ``sums`` does not vary)."""
  rest = [t for t in range(len(table_shape)) if t not in g.picked]
  dims = g.dims or ()    # known: slices whose axes were lost are never a recorded weight
  where = {d: v for v, d in enumerate(dims) if d is not None}
  index_shape = [sums.shape[where[("index", j)]] if ("index", j) in where else 1
                 for j in range(len(g.batch_shape))]
  rest_shape = [sums.shape[where[("table", t)]] if ("table", t) in where else 1 for t in rest]
  order = ([where[("index", j)] for j in range(len(g.batch_shape)) if ("index", j) in where]
           + [where[("table", t)] for t in rest if ("table", t) in where])
  others = [v for v in range(len(dims)) if v not in order]    # size-1 axes
  sums = jnp.transpose(sums, order + others).reshape(index_shape + rest_shape)
  return sums, rest


def index_array(g: Gathered, index) -> jax.Array:
  """The indices as ``(*batch_shape, len(picked))`` int32."""
  if g.stacked:
    return jnp.stack([jnp.asarray(i, jnp.int32).reshape(()) for i in index], -1)
  return jnp.asarray(index[0]).astype(jnp.int32)


def gathered_stats(g: Gathered, table_shape, pooled: bool, sums, count, index):
  """``(sums, counts)`` over the table view's axes from one use of gathered slices.

  ``sums``/``count``: ``dot_square_sums`` over the gathered value's axes (the
  rows each weight element met). Pooled: every slice met the same rows; the
  statistic is size 1 along the picked axes, weighted by the number of slices.
  Per slice: each use (index position) adds its sums and rows to the slice
  its index picked (a segment sum), so a slice's statistic is the mean over
  the rows routed to it, and a slice that no index picked has no rows.
  """
  sums, rest = to_table_axes(g, sums, table_shape)
  n_rest = len(rest)
  uses = math.prod(g.batch_shape)
  sizes = [table_shape[a] for a in g.picked]
  if pooled:  # the index part of `sums` is all 1s: every use met the same rows
    by_table = sums.reshape([1] * len(sizes) + list(sums.shape[len(g.batch_shape):])) * uses
    counts = filled(count * uses, by_table.shape)
  else:
    sums = jnp.broadcast_to(sums, tuple(g.batch_shape) + sums.shape[len(g.batch_shape):])
    sums = sums.reshape((uses,) + sums.shape[len(g.batch_shape):])
    ids = index_array(g, index).reshape(uses, len(sizes))
    bound = jnp.asarray(sizes, jnp.int32)
    if g.clips:
      ids, valid = jnp.clip(ids, 0, bound - 1), jnp.asarray(True)
    else:
      valid = jnp.all((ids >= 0) & (ids < bound), axis=-1)
    segment = jnp.zeros((uses,), jnp.int32)
    for c, n in enumerate(sizes):
      segment = segment * n + ids[:, c]
    total = math.prod(sizes)
    segment = jnp.where(valid, segment, total)   # out of range: dropped by segment_sum
    by_slice = jax.ops.segment_sum(sums, segment, num_segments=total)
    rows = jax.ops.segment_sum(jnp.ones((uses,), jnp.float32), segment, num_segments=total)
    by_table = by_slice.reshape(sizes + list(by_slice.shape[1:]))
    counts = (rows * jnp.asarray(count, jnp.float32)).reshape(sizes + [1] * n_rest)
    counts = jnp.broadcast_to(counts, by_table.shape)
  # Axes (picked..., rest...) -> the table's own order.
  position = {a: i for i, a in enumerate(list(g.picked) + rest)}
  perm = [position[t] for t in range(len(table_shape))]
  by_table = jnp.transpose(by_table, perm)
  counts = counts if np.ndim(counts) == 0 else jnp.transpose(counts, perm)
  return by_table, counts
