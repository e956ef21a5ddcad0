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

JAX internals used here live in ``adaact_optax._jax_compat``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax import tree_util

from adaact_optax import _jax_compat as jc
from adaact_optax import _alignment
from adaact_optax import moments


#: The shape, ``(0,)``, of the float32 statistics leaf that marks a weight the capture saw
#: multiplying an activation but could not record (see ``coverage``, ``UncapturedWeightWarning``).
UNCAPTURED_SHAPE = _alignment.UNCAPTURED_SHAPE


class UncapturedWeightWarning(UserWarning):
  """A weight multiplies an activation, but AdaAct could not record its statistics.

  Raised (as a warning) at trace time, once per weight and trace, naming the
  parameter's path and the reason. The weight then gets the optimizer's
  ``unmatched`` update; ``adaact(..., unmatched="error")`` turns it into an
  error.

  Examples:
    >>> import warnings
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> def loss(params, x):   # the weight is masked before its matmul: not a layout op
    ...   return jnp.mean(x @ (params["w"] * jnp.tril(jnp.ones((3, 3)))))
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   _, _, stats = adaact_optax.value_grad_and_stats(loss)(
    ...       {"w": jnp.ones((3, 3))}, jnp.ones((2, 3)))
    >>> caught[0].category.__name__, stats["w"].shape    # the uncaptured marker
    ('UncapturedWeightWarning', (0,))
  """


# ----------------------------------------------------------------------------
# What the engine knows about each jaxpr value.


class _Data:
  """Depends on the function's non-parameter inputs: an activation."""

  def __repr__(self):
    return "_DATA"


class _Const:
  """Depends on neither parameters nor inputs (literals, constants)."""

  def __repr__(self):
    return "_CONST"


_DATA, _CONST = _Data(), _Const()


@dataclasses.dataclass(frozen=True)
class _Factor:
  """One row-major component of a value's axis: ``size`` steps of ``stride``
  along parameter axis ``axis`` (``axis == -1``: no parameter axis, a broadcast)."""

  axis: int
  size: int
  stride: int


@dataclasses.dataclass(frozen=True)
class _Piece:
  """The part of a value that is a view of one parameter.

  ``box`` gives, per value axis, the half-open range this piece covers (the
  whole axis unless the value is a concatenation); ``axes`` the factors of
  each axis over that range; ``offset`` the parameter index at the box's
  origin; ``pinned`` the factors of leading parameter axes that enclosing
  ``scan``s iterate over (innermost last).
  """

  param: int
  box: tuple
  axes: tuple
  offset: tuple
  pinned: tuple = ()


@dataclasses.dataclass(frozen=True)
class _View:
  pieces: tuple
  shape: tuple


@dataclasses.dataclass(frozen=True)
class _Opaque:
  """Derived from parameters only, but not by layout ops: ``reason`` names the op."""

  sources: frozenset
  reason: str


@dataclasses.dataclass(frozen=True)
class _Mixed:
  """An activation combined elementwise with parameters (a norm's scale, or a
  weight passed in as data and dequantised by a parameter): ``sources`` are
  those parameters, ``reason`` the first op that combined them."""

  sources: frozenset
  reason: str


@dataclasses.dataclass(frozen=True, eq=False)
class _Gathered:
  """Whole slices of a parameter picked by indices known only at run time:
  ``experts[ids]`` (routing), ``table[sampled]``, ``lax.dynamic_index_in_dim(W, i)``.

  It is data (an embedding lookup's rows are an activation) everywhere but in a
  ``dot_general`` whose other operand is data and that contracts the slices'
  own (table) axes, as a matmul contracts a weight's input axis: there it is
  the weight, and each use's statistics go to the slice its index picked (see
  ``_gathered_stats``). A contraction over the index axes only (attention or
  pooling over looked-up rows) combines rows: the slices are its activation.

  ``table``: the view the slices come from; ``picked``: the table axes the
  indices pick, in index-component order; ``index``: the index values (Vars on
  the deferred route) and ``stacked``: whether they are one scalar per picked
  axis (``dynamic_slice``) or one ``(*batch_shape, len(picked))`` array
  (``gather``); ``clips``: out-of-range indices are clamped (else their slice
  is dropped); ``dims``: per axis of this value, ``("index", j)`` (the
  indices' batch axis j), ``("table", t)`` (table axis t) or ``None`` (size
  1), or None when a layout op lost track of them; ``op``: the primitive that
  picked them; ``broken``: why the slices can no longer be told apart (then,
  used as a weight, they are reported uncaptured), else None.
  """

  table: _View
  picked: tuple
  index: tuple
  stacked: bool
  batch_shape: tuple
  clips: bool
  dims: tuple | None
  op: str
  broken: str | None = None

  def __repr__(self):
    return f"_Gathered({self.op}, picked={self.picked}, broken={self.broken!r})"


class _Unsupported(Exception):
  pass


class _NeedsEvaluation(Exception):
  """The deferred pass met a parameter inside a higher-order primitive."""


def _is_data(kind) -> bool:
  return kind is _DATA or isinstance(kind, (_Mixed, _Gathered))


def _is_param(kind) -> bool:
  return isinstance(kind, (_View, _Opaque))


def _sources(kinds) -> frozenset:
  out = set()
  for k in kinds:
    if isinstance(k, _View):
      out.update(p.param for p in k.pieces)
    elif isinstance(k, _Opaque):
      out.update(k.sources)
  return frozenset(out)


def _opaque(kinds, reason: str):
  """The kind of a non-layout op's result."""
  if any(_is_data(k) for k in kinds):
    mixed = [k for k in kinds if isinstance(k, _Mixed)]
    sources = _sources(kinds).union(*(k.sources for k in mixed))
    if not sources:
      return _DATA
    if not any(_is_param(k) for k in kinds):
      reason = mixed[0].reason
    return _Mixed(sources, reason)
  sources = _sources(kinds)
  if not sources:
    return _CONST
  if not any(isinstance(k, _View) for k in kinds):
    reason = next(k.reason for k in kinds if isinstance(k, _Opaque))
  return _Opaque(sources, reason)


def _identity_view(param: int, shape) -> _View:
  axes = tuple((_Factor(a, n, 1),) if n != 1 else () for a, n in enumerate(shape))
  return _View((_Piece(param, tuple((0, n) for n in shape), axes, (0,) * len(shape)),),
              tuple(shape))


def _norm(factors) -> tuple:
  return tuple(f for f in factors if f.size != 1)


def _bcast(n: int) -> tuple:
  return (_Factor(-1, n, 0),) if n != 1 else ()


def _add_offset(offset, deltas) -> tuple:
  out = list(offset)
  for axis, d in deltas.items():
    if axis >= 0:
      out[axis] += d
  return tuple(out)


def _slice_factors(factors, lo: int, n: int, step: int):
  """Row-major factors of indices ``lo, lo+step, ...`` (n of them); ``(factors, deltas)``."""
  factors = _norm(factors)
  if n == 1:
    deltas = {}
    for f, i in zip(factors, _unravel(lo, [f.size for f in factors])):
      deltas[f.axis] = deltas.get(f.axis, 0) + i * f.stride
    return (), deltas
  if not factors:
    raise _Unsupported("slice")
  if len(factors) == 1:
    f = factors[0]
    return (_Factor(f.axis, n, f.stride * step),), {f.axis: lo * f.stride}
  inner = math.prod(f.size for f in factors[1:])
  f0 = factors[0]
  if step == 1 and lo % inner == 0 and n % inner == 0:
    return _norm((_Factor(f0.axis, n // inner, f0.stride),) + factors[1:]), {
        f0.axis: (lo // inner) * f0.stride}
  if lo // inner == (lo + (n - 1) * step) // inner:  # within one outer index
    sub, deltas = _slice_factors(factors[1:], lo % inner, n, step)
    deltas = dict(deltas)
    deltas[f0.axis] = deltas.get(f0.axis, 0) + (lo // inner) * f0.stride
    return sub, deltas
  raise _Unsupported("a slice across merged axes")


def _unravel(index: int, sizes) -> list:
  out = []
  for s in reversed(sizes):
    out.append(index % s)
    index //= s
  return out[::-1]


def _regroup(axes, in_shape, out_shape) -> tuple:
  """Factors of a reshape's output axes from the input's (full boxes only)."""
  seq = []
  for fs, n in zip(axes, in_shape):
    fs = _norm(fs)
    seq.extend(fs if fs or n == 1 else _bcast(n))
  out, i = [], 0
  for n in out_shape:
    need, cur = n, []
    while need > 1:
      if i >= len(seq):
        raise _Unsupported("reshape")
      f = seq[i]
      if need % f.size == 0:
        cur.append(f)
        need //= f.size
        i += 1
      elif f.size % need == 0:
        cur.append(_Factor(f.axis, need, f.stride * (f.size // need)))
        seq[i] = _Factor(f.axis, f.size // need, f.stride)
        need = 1
      else:
        raise _Unsupported("a reshape that splits a parameter axis unevenly")
    out.append(tuple(cur))
  if i != len(seq):
    raise _Unsupported("reshape")
  return tuple(out)


def _full(piece: _Piece, shape, axis: int) -> bool:
  return piece.box[axis] == (0, shape[axis])


# ----------------------------------------------------------------------------
# Layout ops on views. Each returns the output _View, or raises _Unsupported.


def _map_pieces(view: _View, fn, out_shape) -> _View:
  pieces = tuple(p for p in (fn(p) for p in view.pieces) if p is not None)
  return _View(pieces, tuple(out_shape))


def _view_transpose(view, out_shape, permutation):
  perm = tuple(permutation)
  return _map_pieces(view, lambda p: dataclasses.replace(
      p, box=tuple(p.box[i] for i in perm), axes=tuple(p.axes[i] for i in perm)), out_shape)


def _view_reshape(view, out_shape, new_sizes, dimensions=None, **_):
  if dimensions is not None:
    raise _Unsupported("reshape with dimensions")

  in_axes = [a for a, n in enumerate(view.shape) if n != 1]
  out_axes = [a for a, n in enumerate(new_sizes) if n != 1]
  unit_only = [view.shape[a] for a in in_axes] == [new_sizes[a] for a in out_axes]

  def fn(p):
    if unit_only:  # only size-1 axes come or go: boxes carry over (concatenations too)
      box, axes = [(0, 1)] * len(new_sizes), [()] * len(new_sizes)
      for i, o in zip(in_axes, out_axes):
        box[o], axes[o] = p.box[i], p.axes[i]
      return dataclasses.replace(p, box=tuple(box), axes=tuple(axes))
    if not all(_full(p, view.shape, a) for a in range(len(view.shape))):
      raise _Unsupported("a reshape of a concatenated weight")
    axes = _regroup(p.axes, view.shape, tuple(new_sizes))
    return dataclasses.replace(p, box=tuple((0, n) for n in new_sizes), axes=axes)
  return _map_pieces(view, fn, out_shape)


def _view_squeeze(view, out_shape, dimensions):
  dims = {d % len(view.shape) for d in dimensions}

  def fn(p):
    keep = [a for a in range(len(view.shape)) if a not in dims]
    return dataclasses.replace(p, box=tuple(p.box[a] for a in keep),
                               axes=tuple(p.axes[a] for a in keep))
  return _map_pieces(view, fn, out_shape)


def _view_broadcast(view, out_shape, shape, broadcast_dimensions, **_):
  def fn(p):
    box, axes = [(0, n) for n in shape], [_bcast(n) for n in shape]
    for i, j in enumerate(broadcast_dimensions):
      if view.shape[i] == shape[j]:
        box[j], axes[j] = p.box[i], p.axes[i]
    return dataclasses.replace(p, box=tuple(box), axes=tuple(axes))
  return _map_pieces(view, fn, out_shape)


def _slice_piece(p: _Piece, shape, axis: int, start: int, limit: int, step: int):
  n_out = max(0, -(-(limit - start) // step))
  lo, hi = p.box[axis]
  if (lo, hi) == (0, shape[axis]):
    factors, deltas = _slice_factors(p.axes[axis], start, n_out, step)
    new_box = (0, n_out)
  else:
    if step != 1:
      raise _Unsupported("a strided slice of a concatenated weight")
    a, b = max(lo, start), min(hi, limit)
    if a >= b:
      return None
    factors, deltas = _slice_factors(p.axes[axis], a - lo, b - a, 1)
    new_box = (a - start, b - start)
  box = list(p.box)
  axes = list(p.axes)
  box[axis], axes[axis] = new_box, factors
  return dataclasses.replace(p, box=tuple(box), axes=tuple(axes),
                             offset=_add_offset(p.offset, deltas))


def _view_slice(view, out_shape, start_indices, limit_indices, strides=None):
  strides = strides or (1,) * len(view.shape)

  def fn(p):
    shape = list(view.shape)
    for axis, (s, l, st) in enumerate(zip(start_indices, limit_indices, strides)):
      if (s, l, st) == (0, view.shape[axis], 1):
        continue
      p = _slice_piece(p, shape, axis, s, l, st)
      if p is None:
        return None
      shape[axis] = out_shape[axis]
    return p
  return _map_pieces(view, fn, out_shape)


def _view_rev(view, out_shape, dimensions):
  def fn(p):
    box, axes, offset = list(p.box), list(p.axes), dict()
    for d in dimensions:
      n = view.shape[d]
      lo, hi = box[d]
      box[d] = (n - hi, n - lo)
      new = []
      for f in axes[d]:
        if f.axis >= 0:
          offset[f.axis] = offset.get(f.axis, 0) + (f.size - 1) * f.stride
        new.append(_Factor(f.axis, f.size, -f.stride))
      axes[d] = tuple(new)
    return dataclasses.replace(p, box=tuple(box), axes=tuple(axes),
                               offset=_add_offset(p.offset, offset))
  return _map_pieces(view, fn, out_shape)


def _view_pad(view, out_shape, padding_config):
  def fn(p):
    box = list(p.box)
    for d, (lo, hi, interior) in enumerate(padding_config):
      if interior != 0 or lo < 0 or hi < 0:
        raise _Unsupported("pad")
      box[d] = (box[d][0] + lo, box[d][1] + lo)
    return dataclasses.replace(p, box=tuple(box))
  return _map_pieces(view, fn, out_shape)


def _shift(p: _Piece, axis: int, by: int) -> _Piece:
  box = list(p.box)
  box[axis] = (box[axis][0] + by, box[axis][1] + by)
  return dataclasses.replace(p, box=tuple(box))


_VIEW_RULES = {
    "transpose": _view_transpose,
    "reshape": _view_reshape,
    "squeeze": _view_squeeze,
    "broadcast_in_dim": _view_broadcast,
    "slice": _view_slice,
    "rev": _view_rev,
}


# ----------------------------------------------------------------------------
# Contributions: one use of one parameter piece, as sums and row counts laid
# out over the value's axes (size 1 where the statistic does not vary).


class _Contribution(NamedTuple):
  piece: _Piece
  sums: jax.Array
  counts: jax.Array
  lookup: bool = False


def _squares(x) -> jax.Array:
  x = lax.stop_gradient(x)
  if jnp.iscomplexobj(x):
    return jnp.real(x * jnp.conj(x)).astype(jnp.float32)
  return jnp.square(x.astype(jnp.float32))


# Row counts are known at trace time unless a row mask weighs the rows. A
# static count is one number per contribution (a numpy float32 scalar), so its
# bookkeeping (placing, padding, pooling) costs nothing in the traced program
# and no memory; a traced count is an array shaped like the sums. Sums are
# traced, except a bias's constant ones (numpy). The helpers take either kind.


def _xp(a):
  return np if isinstance(a, (np.ndarray, np.generic)) else jnp


def _is_static(a) -> bool:
  return isinstance(a, (np.ndarray, np.generic))


def _filled(value, shape) -> Any:
  """A row count: a static scalar, or traced ``value`` broadcast to ``shape``."""
  if isinstance(value, (int, float, np.integer, np.floating)):
    return np.float32(value)
  return jnp.broadcast_to(jnp.asarray(value, jnp.float32), shape)


def _materialize(counts, shape) -> jax.Array:
  """Counts as a traced array of ``shape`` (to pass through ``scan``, ``cond``...)."""
  return jnp.broadcast_to(jnp.asarray(counts, jnp.float32), shape)


def _slice_axis(a, lo: int, hi: int, axis: int):
  return (a[(slice(None),) * axis + (slice(lo, hi),)] if _xp(a) is np
          else lax.slice_in_dim(a, lo, hi, axis=axis))


def _pad_zeros(a, pads):
  if _xp(a) is np:
    return np.pad(a, [(lo, hi) for lo, hi, _ in pads])
  return lax.pad(a, jnp.zeros((), a.dtype), pads)


def _row_weights(mask, tags, shape, free: Sequence[int]):
  """``mask`` laid over an activation whose axes carry ``tags`` (mask axis or None).

  Applies only when every mask axis is one of the activation's row (free)
  axes; returns ``(weights broadcastable to the activation, total row weight)``
  or ``None``.
  """
  if mask is None or tags is None:
    return None
  pos = {t: ax for ax, t in enumerate(tags) if t is not None}
  if set(pos) != set(range(mask.ndim)) or not all(ax in free for ax in pos.values()):
    return None
  order = sorted(range(mask.ndim), key=lambda t: pos[t])
  w = jnp.transpose(lax.stop_gradient(mask).astype(jnp.float32), order)
  tagged = set(pos.values())
  w = w.reshape([shape[ax] if ax in tagged else 1 for ax in range(len(shape))])
  untagged = math.prod(shape[ax] for ax in free if ax not in tagged)
  return w, jnp.sum(w) * untagged


def _dot_sums(a, a_contract, a_batch, w_contract, w_batch, w_ndim, mask, tags):
  """``(sums, counts)`` of ``a**2`` laid over the weight operand's axes."""
  sums, count = _dot_square_sums(a, a_contract, a_batch, w_contract, w_batch, w_ndim, mask,
                                 tags)
  return sums, _filled(count, sums.shape)


def _dot_square_sums(a, a_contract, a_batch, w_contract, w_batch, w_ndim, mask, tags):
  """``(sums, count)``: ``a**2`` summed over ``a``'s free (row) axes, laid over the
  weight operand's axes (size 1 along its own free axes), and the number of rows
  each weight element met (a Python number, or a traced scalar with a row mask)."""
  sq = _squares(a)
  free = [ax for ax in range(a.ndim) if ax not in a_contract and ax not in a_batch]
  weights = _row_weights(mask, tags, a.shape, free)
  if weights is not None:
    sq = sq * weights[0]
    count = weights[1]
  else:
    count = math.prod(a.shape[ax] for ax in free)
  sums = jnp.sum(sq, axis=tuple(free)) if free else sq
  kept = [ax for ax in range(a.ndim) if ax not in free]
  order, shape = [], []
  for w_ax in range(w_ndim):
    if w_ax in w_contract:
      a_ax = a_contract[w_contract.index(w_ax)]
    elif w_ax in w_batch:
      a_ax = a_batch[w_batch.index(w_ax)]
    else:
      shape.append(1)
      continue
    order.append(kept.index(a_ax))
    shape.append(a.shape[a_ax])
  sums = jnp.transpose(sums, order).reshape(shape)
  return sums, count


def _conv_sums(lhs, rhs_shape, cp, mask, tags):
  """``(sums, counts)`` of the patch elements' squares over the kernel's axes."""
  lhs_spec, rhs_spec = cp["lhs_spec"], cp["rhs_spec"]
  sq = _squares(lhs)
  batch_weights = None
  if (mask is not None and mask.ndim == 1 and tags is not None
      and tags[lhs_spec[0]] == 0 and all(t is None for i, t in enumerate(tags)
                                         if i != lhs_spec[0])):
    batch_weights = lax.stop_gradient(mask).astype(jnp.float32)
    bshape = [1] * lhs.ndim
    bshape[lhs_spec[0]] = mask.shape[0]
    sq = sq * batch_weights.reshape(bshape)
  # (N, *spatial, C): for Flax's NHWC this transpose is the identity.
  sq = jnp.transpose(sq, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  kernel = tuple(rhs_shape[d] for d in rhs_spec[2:])
  sums, rows = moments.conv_window_sums(sq, kernel, cp["strides"], cp["padding"],
                                        cp["lhs_dilation"], cp["rhs_dilation"])
  if batch_weights is not None:
    rows = jnp.sum(batch_weights) * (rows // lhs.shape[lhs_spec[0]])
  groups = cp["groups"]
  c = sums.shape[-1]
  sums = sums.reshape(kernel + (groups, c // groups))          # (*k, G, C/G)
  # Into the kernel's own axis order: out axis -> G blocks, in axis -> C/G.
  src = {rhs_spec[0]: len(kernel), rhs_spec[1]: len(kernel) + 1}
  src.update({d: i for i, d in enumerate(rhs_spec[2:])})
  sums = jnp.transpose(sums, [src[d] for d in range(len(rhs_shape))])
  return sums, _filled(rows, sums.shape)


def _restrict(piece: _Piece, shape, sums, counts):
  """The part of value-shaped ``sums``/``counts`` that ``piece`` covers."""
  for axis, (lo, hi) in enumerate(piece.box):
    if (lo, hi) == (0, shape[axis]) or sums.shape[axis] == 1:
      continue
    if sums.shape[axis] != shape[axis]:
      raise _Unsupported("grouped statistics of a concatenated weight")
    sums = _slice_axis(sums, lo, hi, axis)
    counts = counts if np.ndim(counts) == 0 else _slice_axis(counts, lo, hi, axis)
  return sums, counts


# ----------------------------------------------------------------------------
# Slices gathered by run-time indices (`_Gathered`): their layout and statistics.


def _gathered_layout(g: _Gathered, name: str, eqn) -> _Gathered:
  """The kind of a layout op's output on gathered slices: the axes followed
  through transposes and size-1 axes coming or going, anything else broken."""
  if g.broken is not None and g.dims is None or name in jc.IDENTITY:
    return g
  in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  p = eqn.params
  dims = None
  if name == "transpose":
    dims = tuple(g.dims[i] for i in p["permutation"])
  elif name == "squeeze":
    drop = {d % len(in_shape) for d in p["dimensions"]}
    dims = tuple(d for i, d in enumerate(g.dims) if i not in drop)
  elif name == "reshape" and p.get("dimensions") is None:
    kept = [d for d, n in zip(g.dims, in_shape) if n != 1]
    if [n for n in in_shape if n != 1] == [n for n in out_shape if n != 1]:
      it = iter(kept)
      dims = tuple(next(it) if n != 1 else None for n in out_shape)
  elif name == "broadcast_in_dim":
    if all(in_shape[i] == out_shape[j] for i, j in enumerate(p["broadcast_dimensions"])) and all(
        out_shape[j] == 1 for j in range(len(out_shape)) if j not in p["broadcast_dimensions"]):
      new = [None] * len(out_shape)
      for i, j in enumerate(p["broadcast_dimensions"]):
        new[j] = g.dims[i]
      dims = tuple(new)
  if dims is None:
    return _broken_by_layout(g, name)
  return dataclasses.replace(g, dims=dims)


def _broken_by_layout(g: _Gathered, name: str) -> _Gathered:
  return dataclasses.replace(g, index=(), dims=None, broken=g.broken or (
      f"then laid out by `{name}`, which the capture does not follow for gathered slices"))


def _gathered_reason(g: _Gathered, what: str) -> str:
  return (f"its slices are picked by indices computed at run time (`{g.op}`) {what}, so "
          "the rows each slice meets cannot be told apart. Apply the weight through a "
          "`dot_general` right after the gather (e.g. `jnp.einsum('bi,bio->bo', x, "
          "experts[ids])`), or dispatch densely (a one-hot or capacity dispatch whose "
          "contraction keeps the expert axis)")


def _across_bodies(kinds, how: str, keep=()) -> list:
  """Kinds crossing into or out of a loop or ``cond`` body: gathered slices (but
  those at positions ``keep``, whose indices are passed along) are no longer
  followed there (their indices live in another trace)."""
  return [dataclasses.replace(k, index=(), dims=None, broken=k.broken or (
      f"and then {how} a loop or `cond` body")) if isinstance(k, _Gathered) and i not in keep
          else k for i, k in enumerate(kinds)]


def _contracts_inside(eqn) -> bool:
  """Whether a higher-order primitive's body has a contraction anywhere (gathered
  slices passed in may be a weight there; ``relu``'s or ``clip``'s body has none,
  and is bound as is)."""
  todo = jc.sub_jaxprs(eqn)
  while todo:
    jaxpr = todo.pop()
    for e in jaxpr.eqns:
      if e.primitive.name in (jc.DOT, jc.CONV):
        return True
      todo.extend(jc.sub_jaxprs(e))
  return False


def _contracts_table_axes(g: _Gathered, w_contract) -> bool:
  """Whether a contraction sums over the slices' own axes, as a matmul sums over a
  weight's input axis (unknown axes: assumed so). Over the index axes only, it
  combines looked-up rows (attention, pooling): they are its activation."""
  if g.dims is None:
    return True
  return any(g.dims[v] is not None and g.dims[v][0] == "table" for v in w_contract)


def _gathered_pooled(g: _Gathered, w_free) -> bool:
  """Whether every gathered slice meets the same rows: the indices have batch axes
  and each is a free axis of the weight operand (``h @ table[sampled].T``). Then the
  slices share one statistic (size 1 along the picked axes, never parameter-sized);
  otherwise (routing, a loop's dynamic index) each slice gets its own."""
  index_axes = [v for v, d in enumerate(g.dims) if d is not None and d[0] == "index"]
  return bool(g.batch_shape) and all(v in w_free for v in index_axes)


def _to_table_axes(g: _Gathered, sums, table_shape):
  """``sums`` laid over the gathered value's axes -> ``(index part, rest)``: an array
  ``(*batch_shape or 1s, *rest sizes)`` and the table axes ``rest`` (all but the
  picked ones), the index part broadcast-ready (size 1 where ``sums`` does not vary)."""
  rest = [t for t in range(len(table_shape)) if t not in g.picked]
  where = {d: v for v, d in enumerate(g.dims) if d is not None}
  index_shape = [sums.shape[where[("index", j)]] if ("index", j) in where else 1
                 for j in range(len(g.batch_shape))]
  rest_shape = [sums.shape[where[("table", t)]] if ("table", t) in where else 1 for t in rest]
  order = ([where[("index", j)] for j in range(len(g.batch_shape)) if ("index", j) in where]
           + [where[("table", t)] for t in rest if ("table", t) in where])
  others = [v for v in range(len(g.dims)) if v not in order]    # size-1 axes
  sums = jnp.transpose(sums, order + others).reshape(index_shape + rest_shape)
  return sums, rest


def _index_array(g: _Gathered, index) -> jax.Array:
  """The indices as ``(*batch_shape, len(picked))`` int32."""
  if g.stacked:
    return jnp.stack([jnp.asarray(i, jnp.int32).reshape(()) for i in index], -1)
  return jnp.asarray(index[0]).astype(jnp.int32)


def _gathered_stats(g: _Gathered, table_shape, pooled: bool, sums, count, index):
  """``(sums, counts)`` over the table view's axes from one use of gathered slices.

  ``sums``/``count``: ``_dot_square_sums`` over the gathered value's axes (the
  rows each weight element met). Pooled: every slice met the same rows; the
  statistic is size 1 along the picked axes, weighted by the number of slices.
  Per slice: each use (index position) adds its sums and rows to the slice
  its index picked (a segment sum), so a slice's statistic is the mean over
  the rows routed to it, and a slice that no index picked has no rows.
  """
  sums, rest = _to_table_axes(g, sums, table_shape)
  n_rest = len(rest)
  uses = math.prod(g.batch_shape)
  sizes = [table_shape[a] for a in g.picked]
  if pooled:  # the index part of `sums` is all 1s: every use met the same rows
    by_table = sums.reshape([1] * len(sizes) + list(sums.shape[len(g.batch_shape):])) * uses
    counts = _filled(count * uses, by_table.shape)
  else:
    sums = jnp.broadcast_to(sums, tuple(g.batch_shape) + sums.shape[len(g.batch_shape):])
    sums = sums.reshape((uses,) + sums.shape[len(g.batch_shape):])
    ids = _index_array(g, index).reshape(uses, len(sizes))
    bound = jnp.asarray(sizes, jnp.int32)
    if g.clips:
      ids, valid = jnp.clip(ids, 0, bound - 1), True
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


# ----------------------------------------------------------------------------
# Row tags: with a row mask, which mask axis each activation axis is, followed
# from the inputs' leading axes through the ops that keep rows apart.


def _propagate_tags(eqn, tags: dict):
  ins = [None if jc.is_literal(v) else tags.get(v) for v in eqn.invars]
  if not any(ins):
    return
  name, p = eqn.primitive.name, eqn.params
  outs = [v.aval.shape for v in eqn.outvars]
  t0 = ins[0]
  out = None
  if name == "transpose" and t0:
    out = [tuple(t0[i] for i in p["permutation"])]
  elif name == "broadcast_in_dim" and t0:
    t = [None] * len(p["shape"])
    for i, j in enumerate(p["broadcast_dimensions"]):
      if eqn.invars[0].aval.shape[i] == p["shape"][j]:
        t[j] = t0[i]
    out = [tuple(t)]
  elif name == "reshape" and t0:
    shape_in, k = eqn.invars[0].aval.shape, 0
    while k < min(len(shape_in), len(outs[0])) and shape_in[k] == outs[0][k]:
      k += 1
    out = [t0[:k] + (None,) * (len(outs[0]) - k)]
  elif name == "squeeze" and t0:
    dims = {d % len(t0) for d in p["dimensions"]}
    out = [tuple(t for i, t in enumerate(t0) if i not in dims)]
  elif name == jc.DOT:
    lc, rc, lb, rb = jc.dot_dimensions(eqn)
    lt, rt = (ins[0] or (None,) * eqn.invars[0].aval.ndim,
              ins[1] or (None,) * eqn.invars[1].aval.ndim)
    out = [tuple(lt[i] for i in lb)
           + tuple(t for i, t in enumerate(lt) if i not in lc and i not in lb)
           + tuple(t for i, t in enumerate(rt) if i not in rc and i not in rb)]
  elif name == jc.CONV and t0:
    dn = p["dimension_numbers"]
    t = [None] * len(outs[0])
    t[dn.out_spec[0]] = t0[dn.lhs_spec[0]]
    out = [tuple(t)]
  elif name == jc.GATHER and ins[1] and not t0:
    # A lookup: the output's non-offset axes are the indices' batch axes.
    offset = set(p["dimension_numbers"].offset_dims)
    batch = iter(ins[1][:-1])
    out = [tuple(None if i in offset else next(batch, None) for i in range(len(outs[0])))]
  elif name.startswith("reduce_") or name in ("argmax", "argmin"):
    axes = set(p.get("axes", ()))
    if t0:
      out = [tuple(t for i, t in enumerate(t0) if i not in axes)] * len(outs)
  elif name in ("rev", "sort", "gather", "scatter", "scatter-add", "dynamic_update_slice"):
    out = None  # rows move: forget
  else:  # elementwise and the like: an output shaped like a tagged input keeps its tags
    for v, t in zip(eqn.invars, ins):
      if t and all(tuple(o) == tuple(v.aval.shape) for o in outs):
        out = [t] * len(outs)
        break
  if out:
    for var, t in zip(eqn.outvars, out):
      if t is not None and any(x is not None for x in t) and not jc.is_dropvar(var):
        tags[var] = t


# ----------------------------------------------------------------------------
# The interpreter.


class _Trace:
  """What one capture call shares across nested jaxprs."""

  def __init__(self, shapes, embeddings):
    self.shapes = shapes
    self.embeddings = embeddings
    self.uncaptured: dict[int, str] = {}

  def miss(self, sources, reason: str):
    for s in sorted(sources):
      self.uncaptured.setdefault(s, reason)


class _Interpreter:
  """Evaluates jaxprs while collecting contributions; ``depth`` = enclosing scans."""

  def __init__(self, trace: _Trace, depth: int = 0, mask=None, deferred: bool = False):
    self.trace = trace
    self.depth = depth
    self.contributions: list[_Contribution] = []
    # Deferred: walk an already differentiated jaxpr without binding anything;
    # each statistic waits in `pending` for the value it is computed from
    # (see `resolve`).
    self.deferred = deferred
    self.pending: list = []
    # With a row mask: which mask axis each axis of an activation is (by Var).
    self.mask = mask
    self.tags: dict = {}

  def _bind(self, eqn, invals):
    return list(eqn.outvars) if self.deferred else jc.bind(eqn, invals)

  def _stat(self, view: _View, fn, value, lookup=False, key=None):
    """Records ``fn(value) -> (sums, counts)`` for ``view``, now or once resolved.

    ``key`` names what ``fn`` computes from ``value``; deferred statistics
    with the same value and key are computed once (q, k and v projections
    of one input).
    """
    if self.deferred:
      self.pending.append((view, fn, value, lookup, key))
    else:
      self._record(view, *fn(value), lookup=lookup)

  def resolve(self, env: dict):
    """Computes the deferred statistics; ``env`` maps the jaxpr's vars to values."""
    done = {}
    fetch = lambda v: env[v] if isinstance(v, jc.Var) else v
    for view, fn, value, lookup, key in self.pending:
      is_var = isinstance(value, jc.Var)
      memo = (value, key) if is_var and key is not None else None
      if memo not in done:
        # A tuple value: several operands (a gathered weight's input and indices).
        result = fn(tuple(map(fetch, value)) if isinstance(value, tuple) else fetch(value))
        if memo is None:
          self._record(view, *result, lookup=lookup)
          continue
        done[memo] = result
      self._record(view, *done[memo], lookup=lookup)
    self.pending = []

  def tag(self, atom):
    return None if jc.is_literal(atom) else self.tags.get(atom)

  def _copy_tags(self, src_vars, dst_vars, source=None):
    source = self if source is None else source
    if self.mask is None:
      return
    for s_, d in zip(src_vars, dst_vars):
      t = source.tag(s_)
      if t is not None and not jc.is_dropvar(d):
        self.tags[d] = t

  # -- entry point ------------------------------------------------------------
  def run(self, jaxpr, consts, args, kinds):
    env, kenv, mm = {}, {}, set()

    def read(atom):
      if jc.is_literal(atom):
        return jc.literal_value(atom), _CONST
      return env[atom], kenv[atom]

    def write(var, val, kind, is_mm=False):
      if jc.is_dropvar(var):
        return
      env[var], kenv[var] = val, kind
      if is_mm:
        mm.add(var)

    for v, c in zip(jaxpr.constvars, consts):
      write(v, c, _CONST)
    for v, a, k in zip(jaxpr.invars, args, kinds):
      write(v, a, k)
    for eqn in jaxpr.eqns:
      pairs = [read(v) for v in eqn.invars]
      invals = [p[0] for p in pairs]
      inkinds = [p[1] for p in pairs]
      in_mm = [(not jc.is_literal(v)) and v in mm for v in eqn.invars]
      outvals, outkinds, out_mm = self.eqn(eqn, invals, inkinds, in_mm)
      for var, val, kind, m in zip(eqn.outvars, outvals, outkinds, out_mm):
        write(var, val, kind, m)
      if self.mask is not None and not jc.has_subjaxpr(eqn):
        _propagate_tags(eqn, self.tags)
    outs = [read(v) for v in jaxpr.outvars]
    out_mm = [(not jc.is_literal(v)) and v in mm for v in jaxpr.outvars]
    return [o[0] for o in outs], [o[1] for o in outs], out_mm

  # -- one equation -----------------------------------------------------------
  def eqn(self, eqn, invals, inkinds, in_mm):
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    if any(isinstance(k, _Gathered) for k in inkinds):
      done = self._gathered_eqn(eqn, invals, inkinds)
      if done is not None:
        return done
    if not any(_is_param(k) for k in inkinds) and (
        not any(isinstance(k, _Mixed) for k in inkinds) or name not in (jc.DOT, jc.CONV)) and (
        not any(isinstance(k, _Gathered) for k in inkinds) or not _contracts_inside(eqn)):
      outs = self._bind(eqn, invals)
      if name in (jc.DOT, jc.CONV, jc.GATHER) or jc.has_subjaxpr(eqn):
        kind = _DATA if any(_is_data(k) for k in inkinds) else _CONST
      else:
        kind = _opaque(inkinds, f"`{name}`")
      passes_mm = bool(in_mm) and in_mm[0] and (name in jc.IDENTITY or name in (
          "reshape", "transpose", "broadcast_in_dim", "squeeze"))
      return outs, [kind] * n_out, [passes_mm] * n_out
    if self.deferred and (name in jc.CALLS or name in jc.REMAT or name in jc.CUSTOM_JVP
                          or name in jc.CUSTOM_VJP or name in (jc.SCAN, jc.WHILE, jc.COND)):
      raise _NeedsEvaluation(name)
    if name in jc.CALLS:
      return self._call(eqn, invals, inkinds)
    if name in jc.REMAT:
      return self._remat(eqn, invals, inkinds)
    if name in jc.CUSTOM_JVP or name in jc.CUSTOM_VJP:
      return self._custom(eqn, invals, inkinds)
    if name == jc.SCAN:
      return self._scan(eqn, invals, inkinds)
    if name == jc.WHILE:
      return self._while(eqn, invals, inkinds)
    if name == jc.COND:
      return self._cond(eqn, invals, inkinds)
    outs = self._bind(eqn, invals)
    if name == jc.DOT:
      kind, recorded = self._dot(eqn, invals, inkinds)
      return outs, [kind], [recorded]
    if name == jc.CONV:
      kind, recorded = self._conv(eqn, invals, inkinds)
      return outs, [kind], [recorded]
    if name == jc.GATHER:
      return outs, [self._gather(eqn, invals, inkinds)], [False]
    if name in jc.ADD:
      return outs, [self._add(invals, inkinds, in_mm)], [False]
    if name in jc.IDENTITY:
      return outs, list(inkinds[:n_out]), list(in_mm[:n_out])
    if name in _VIEW_RULES or name in ("concatenate", "split", "pad"):
      try:
        kinds = self._layout(eqn, name, inkinds)
      except _Unsupported as e:
        kinds = [_opaque(inkinds, f"`{name}` ({e})")] * n_out
      return outs, kinds, [False] * n_out
    if name == jc.DYNAMIC_SLICE and all(jc.is_literal(v) for v in eqn.invars[1:]):
      starts = [jc.literal_value(v) for v in eqn.invars[1:]]
      try:
        kind = self._layout_one(inkinds[0], "slice", eqn.outvars[0].aval.shape, dict(
            start_indices=starts,
            limit_indices=[s + n for s, n in zip(starts, eqn.params["slice_sizes"])]))
      except _Unsupported as e:
        kind = _opaque(inkinds, f"`dynamic_slice` ({e})")
      return outs, [kind], [False]
    if (name == jc.DYNAMIC_SLICE and isinstance(inkinds[0], _View)
        and not any(_is_param(k) for k in inkinds[1:])):
      return outs, [self._dynamic_slice(eqn, invals, inkinds[0])], [False]
    if jc.has_subjaxpr(eqn):
      self.trace.miss(_sources(inkinds), f"it is passed into `{name}`, which the capture "
                      "does not see into")
      return outs, [_DATA] * n_out, [False] * n_out
    return outs, [_opaque(inkinds, f"`{name}`")] * n_out, [False] * n_out

  # -- layout -----------------------------------------------------------------
  def _layout_one(self, kind, name, out_shape, params):
    if not isinstance(kind, _View):
      return kind
    return _VIEW_RULES[name](kind, tuple(out_shape), **params)

  def _layout(self, eqn, name, inkinds):
    out_shapes = [v.aval.shape for v in eqn.outvars]
    if name in _VIEW_RULES:
      kind = inkinds[0]
      if not isinstance(kind, _View):
        return [kind]
      return [self._layout_one(kind, name, out_shapes[0], dict(eqn.params))]
    if name == "pad":
      kind = inkinds[0]
      if not isinstance(kind, _View):
        return [_opaque(inkinds, "`pad`")]
      return [_view_pad(kind, tuple(out_shapes[0]), eqn.params["padding_config"])]
    if name == "split":
      kind = inkinds[0]
      if not isinstance(kind, _View):
        return [kind] * len(out_shapes)
      axis, start, out = eqn.params["axis"], 0, []
      for size, shape in zip(eqn.params["sizes"], out_shapes):
        starts = [0] * len(shape)
        limits = list(kind.shape)
        starts[axis], limits[axis] = start, start + size
        out.append(_view_slice(kind, tuple(shape), starts, limits))
        start += size
      return out
    # concatenate: views (and constants) side by side along one axis.
    if any(_is_data(k) or isinstance(k, _Opaque) for k in inkinds):
      return [_opaque(inkinds, "`concatenate`")]
    axis, start, pieces = eqn.params["dimension"], 0, []
    for var, kind in zip(eqn.invars, inkinds):
      if isinstance(kind, _View):
        pieces.extend(_shift(p, axis, start) for p in kind.pieces)
      start += var.aval.shape[axis]
    return [_View(tuple(pieces), tuple(out_shapes[0]))]

  # -- contractions -----------------------------------------------------------
  def _record(self, view: _View, sums, counts, lookup=False):
    for piece in view.pieces:
      try:
        s, c = _restrict(piece, view.shape, sums, counts)
      except _Unsupported as e:
        self.trace.miss({piece.param}, str(e))
        continue
      self.contributions.append(_Contribution(piece, s, c, lookup))

  def _weight_and_input(self, inkinds, eqn_name, batched=False):
    """Which operand is the weight: ``(weight index, kind of result)`` or None.

    ``batched``: the contraction has batch dimensions (attention scores), so
    neither operand can be a weight unless it is a view of a parameter.
    """
    lk, rk = inkinds
    if isinstance(lk, _View) and isinstance(rk, _View):
      return None, _Opaque(_sources(inkinds), f"`{eqn_name}` with another parameter")
    if isinstance(lk, _Opaque) and isinstance(rk, _Opaque):
      return None, _opaque(inkinds, eqn_name)
    for w, (wk, ak) in ((1, (rk, lk)), (0, (lk, rk))):
      if isinstance(wk, _View):
        if isinstance(ak, _Opaque):
          self.trace.miss(ak.sources, f"it passes through {ak.reason}, which is not a layout "
                          "op, before it multiplies another weight")
        return w, _DATA
    for k in (lk, rk):
      if isinstance(k, _Opaque):
        self.trace.miss(k.sources, f"it passes through {k.reason}, which is not a layout "
                        f"op, before its `{eqn_name}`")
    # A parameter combined with data right before a contraction whose other side
    # is plain data: a weight given as data and scaled (dequantised) by it.
    mixed = [k for k in (lk, rk) if isinstance(k, _Mixed)]
    if len(mixed) == 1 and not batched and not any(_is_param(k) for k in (lk, rk)):
      self.trace.miss(mixed[0].sources, f"it is combined with data by {mixed[0].reason} "
                      f"before a `{eqn_name}` whose other operand is data (a weight passed in "
                      "as data and scaled by a parameter?)")
    return None, _DATA

  def _dot(self, eqn, invals, inkinds):
    lc, rc, lb, rb = jc.dot_dimensions(eqn)
    w, kind = self._weight_and_input(inkinds, "dot_general", batched=bool(lb))
    if w is None:
      return kind, False
    a_c, w_c, a_b, w_b = (lc, rc, lb, rb) if w == 1 else (rc, lc, rb, lb)
    w_ndim, mask, tags = eqn.invars[w].aval.ndim, self.mask, self.tag(eqn.invars[1 - w])
    self._stat(inkinds[w], lambda a: _dot_sums(a, a_c, a_b, w_c, w_b, w_ndim, mask, tags),
               invals[1 - w], key=(jc.DOT, a_c, a_b, w_c, w_b, w_ndim))
    return _DATA, True

  def _conv(self, eqn, invals, inkinds):
    lk, rk = inkinds
    if _is_param(lk):
      if _is_data(rk):
        self.trace.miss(_sources([lk]), "it is the input (not the kernel) of a convolution")
        return _DATA, False
      return _opaque(inkinds, "`conv_general_dilated`"), False
    if isinstance(rk, (_Opaque, _Mixed)):
      self.trace.miss(rk.sources, f"it passes through {rk.reason}, which is not a layout "
                      "op, before its `conv_general_dilated`")
      return _DATA, False
    if not isinstance(rk, _View):
      return (_DATA if _is_data(lk) or _is_data(rk) else _CONST), False
    cp = jc.conv_params(eqn)
    if cp["batch_groups"] != 1:
      self.trace.miss(_sources([rk]), "a convolution with batch_group_count > 1")
      return _DATA, False
    rhs_shape, mask, tags = eqn.invars[1].aval.shape, self.mask, self.tag(eqn.invars[0])
    self._stat(rk, lambda lhs: _conv_sums(lhs, rhs_shape, cp, mask, tags), invals[0])
    return _DATA, True

  def _gather(self, eqn, invals, inkinds):
    table, ids = inkinds
    if not isinstance(table, _View) or _is_param(ids):
      return _opaque(inkinds, "`gather`")
    gp = jc.gather_params(eqn)
    shape = table.shape
    picked = gp["start_index_map"]
    # Whole slices: size 1 along the picked axes, whole along the others.
    whole = not gp["batching"] and all(s == (1 if a in picked else n) for a, (s, n) in
                                       enumerate(zip(gp["slice_sizes"], shape)))
    out_ndim = eqn.outvars[0].aval.ndim
    offset_axes = iter(a for a in range(len(shape)) if a not in gp["collapsed"])
    batch_axes = iter(range(out_ndim))
    dims = []
    for v in range(out_ndim):
      if v in gp["offset_dims"]:
        t = next(offset_axes)   # size 1 where picked, unless only part of slices is taken
        dims.append(None if t in picked and gp["slice_sizes"][t] == 1 else ("table", t))
      else:
        dims.append(("index", next(batch_axes)))
    gathered = _Gathered(table, picked, (invals[1],), False, eqn.invars[1].aval.shape[:-1],
                         gp["clips"], tuple(dims), "gather")
    if not whole:
      return dataclasses.replace(gathered, index=(), broken=(
          f"and the `gather` takes parts of slices (slice sizes {gp['slice_sizes']} of "
          f"{shape}) or batches the table"))
    # An embedding lookup: whole rows along one axis, picked by integer ids.
    lookup = len(picked) == 1 and gp["collapsed"] == picked
    if lookup and self.trace.embeddings is not None:
      axis = gp["start_index_map"][0]

      def frequencies(ids):
        index = lax.stop_gradient(ids).reshape(-1)
        counts_row = jax.ops.segment_sum(jnp.ones(index.shape, jnp.float32), index,
                                         num_segments=shape[axis])
        sums = counts_row.reshape([n if a == axis else 1 for a, n in enumerate(shape)])
        return sums, _filled(float(max(index.size, 1)), sums.shape)
      self._stat(table, frequencies, invals[1], lookup=True)
    return gathered

  def _dynamic_slice(self, eqn, invals, view: _View):
    """``dynamic_slice`` of a parameter at run-time starts: whole slices along the
    axes of size 1 (a layer of a stacked weight, ``lax.dynamic_index_in_dim``),
    static slices where the start is a literal, the others ignored (full)."""
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
      table = _view_slice(view, tuple(l - s_ for s_, l in zip(starts, limits)), starts, limits)
    except _Unsupported as e:
      return _opaque([view], f"`dynamic_slice` ({e})")
    if not picked and window is None:  # only the starts of whole axes are computed
      return table
    dims = tuple(None if a in picked else ("table", a) for a in range(len(sizes)))
    gathered = _Gathered(table, tuple(picked), tuple(invals[1 + a] for a in picked), True, (),
                         True, dims, "dynamic_slice")
    if window is not None:
      a, n, dim = window
      return dataclasses.replace(gathered, index=(), broken=(
          f"as a dynamic index into a stacked weight: `dynamic_slice` takes a window of {n} "
          f"of {dim} along axis {a} at a start computed at run time (only whole slices, of "
          "size 1 along the indexed axis, are followed)"))
    return gathered

  def _gathered_eqn(self, eqn, invals, inkinds):
    """An equation with gathered slices among its inputs, or None to treat them as data.

    Layout ops keep following the slices; a ``dot_general`` with data on the
    other side makes them the weight; a convolution kernel made of them is
    reported.
    """
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    first = inkinds[0]
    if name == jc.DOT:
      recorded = self._gathered_dot(eqn, invals, inkinds)
      if recorded is None:
        return None
      return self._bind(eqn, invals), [_DATA], [recorded]
    if name == jc.CONV and isinstance(inkinds[1], _Gathered) and not _is_param(first):
      self.trace.miss({p.param for p in inkinds[1].table.pieces}, _gathered_reason(
          inkinds[1], "and then used as a convolution kernel, which the capture does not "
          "follow"))
      return self._bind(eqn, invals), [_DATA], [False]
    if name in ("mul", "div") and not any(_is_param(k) for k in inkinds):
      # Slices scaled by data (`experts[ids] * gate`): no longer the weight's values.
      g = inkinds[0] if isinstance(inkinds[0], _Gathered) else inkinds[1]
      others = [k for k in inkinds if k is not g]
      if eqn.outvars[0].aval.shape == eqn.invars[inkinds.index(g)].aval.shape and not any(
          isinstance(k, _Gathered) for k in others):
        kind = dataclasses.replace(g, index=(), broken=g.broken or (
            f"then scaled by `{name}` before the matmul (scale its input or output instead)"))
        return self._bind(eqn, invals), [kind], [False]
      return None
    if not isinstance(first, _Gathered) or jc.has_subjaxpr(eqn):
      return None
    if name in jc.IDENTITY and n_out == 1 or name in jc.LAYOUT or name in (
        jc.GATHER, jc.DYNAMIC_SLICE):
      kind = _gathered_layout(first, name, eqn) if n_out == 1 and name not in (
          "concatenate", "pad") else _broken_by_layout(first, name)
      return self._bind(eqn, invals), [kind] * n_out, [False] * n_out
    return None

  def _gathered_dot(self, eqn, invals, inkinds):
    """Statistics of gathered slices used as the weight of a ``dot_general``.

    Returns whether they were recorded, or None when the slices are not the
    weight here (the other operand is a parameter, or gathered too, or only
    the index axes are contracted): then they are data, as an embedding
    lookup's rows are.
    """
    sides = [i for i in (0, 1) if isinstance(inkinds[i], _Gathered)]
    if len(sides) == 2 or _is_param(inkinds[1 - sides[0]]):
      return None
    w = sides[0]
    g = inkinds[w]
    lc, rc, lb, rb = jc.dot_dimensions(eqn)
    a_c, w_c, a_b, w_b = (lc, rc, lb, rb) if w == 1 else (rc, lc, rb, lb)
    if not _contracts_table_axes(g, w_c):
      return None
    if g.broken is not None:
      self.trace.miss({p.param for p in g.table.pieces}, _gathered_reason(g, g.broken))
      return False
    w_ndim, mask, tags = eqn.invars[w].aval.ndim, self.mask, self.tag(eqn.invars[1 - w])
    w_free = [v for v in range(w_ndim) if v not in w_c and v not in w_b]
    pooled = _gathered_pooled(g, w_free)
    table_shape = g.table.shape

    def stats(values):
      a, index = (values, ()) if pooled else (values[0], values[1:])
      sums, count = _dot_square_sums(a, a_c, a_b, w_c, w_b, w_ndim, mask, tags)
      return _gathered_stats(g, table_shape, pooled, sums, count, index)
    self._stat(g.table, stats, invals[1 - w] if pooled else (invals[1 - w],) + g.index)
    return True

  def _add(self, invals, inkinds, in_mm):
    # A parameter added to a captured contraction's output is its bias: a
    # weight on the constant input 1.
    for b, o in ((0, 1), (1, 0)):
      if isinstance(inkinds[b], _View) and in_mm[o]:
        view = inkinds[b]
        ones = np.ones((1,) * len(view.shape), np.float32)
        self._stat(view, lambda _: (ones, ones), None)
        return _DATA
    return _opaque(inkinds, "`add`")

  # -- higher-order primitives ------------------------------------------------
  def _call(self, eqn, invals, inkinds):
    inner = jc.call_jaxpr(eqn)
    ins, outs_s = jc.call_shardings(eqn)
    invals = [v if s is None else lax.with_sharding_constraint(v, s)
              for v, s in zip(invals, ins or [None] * len(invals))]
    self._copy_tags(eqn.invars, inner.jaxpr.invars)
    outs, kinds, mm = self.run(inner.jaxpr, inner.consts, invals, inkinds)
    self._copy_tags(inner.jaxpr.outvars, eqn.outvars)
    outs = [v if s is None else lax.with_sharding_constraint(v, s)
            for v, s in zip(outs, outs_s or [None] * len(outs))]
    return outs, kinds, mm

  def _custom(self, eqn, invals, inkinds):
    # The function keeps its own differentiation rule; the statistics come
    # from evaluating its body on stop-gradient inputs (XLA shares the work).
    outs = jc.bind(eqn, invals)
    inner = jc.call_jaxpr(eqn)
    self._copy_tags(eqn.invars, inner.jaxpr.invars)
    _, kinds, mm = self.run(inner.jaxpr, inner.consts,
                            [jc.stop_gradient(v) for v in invals], inkinds)
    self._copy_tags(inner.jaxpr.outvars, eqn.outvars)
    return outs, kinds, mm

  def _nested(self, jaxpr, consts, kinds, depth=None, in_vars=None, tags=None, thread=False):
    """A function evaluating ``jaxpr`` that also returns its contributions' arrays.

    Its ``info`` dict is filled when the function is traced: the child
    interpreter's contributions (pieces), output kinds and mm flags. With a
    row mask, the child starts with the tags of ``in_vars`` (the outer
    values passed in), or with explicit ``tags`` for its inputs; ``fn``'s
    first argument is then the child's mask (``None`` to keep this one).

    Gathered slices among the inputs or outputs are reported (their indices
    live in the other trace), unless ``thread``: then ``fn`` takes the input
    slices' indices as extra trailing arguments (``info["extra"]``, known now)
    and returns the output slices' indices as a third result, which
    ``_threaded_kinds`` puts back into ``info["kinds"]``.
    """
    info = {}
    outer = [None if v is None else self.tag(v) for v in (in_vars or [])]
    in_tags = tags if tags is not None else outer
    slots = [i for i, k in enumerate(kinds) if thread and isinstance(k, _Gathered)
             and k.broken is None]
    info["extra"] = [v for i in slots for v in kinds[i].index]
    kinds = _across_bodies(kinds, "passed into", keep=slots)

    def fn(*args, mask=None):
      args, extra = args[:len(jaxpr.invars)], iter(args[len(jaxpr.invars):])
      in_kinds = list(kinds)
      for i in slots:
        in_kinds[i] = dataclasses.replace(kinds[i], index=tuple(next(extra)
                                                                for _ in kinds[i].index))
      child = _Interpreter(self.trace, self.depth if depth is None else depth,
                           mask=self.mask if mask is None else mask)
      if child.mask is not None:
        for var, t in zip(jaxpr.invars, in_tags):
          if t is not None:
            child.tags[var] = t
      outs, okinds, omm = child.run(jaxpr, consts, args, in_kinds)
      out_slots = [i for i, k in enumerate(okinds) if thread and isinstance(k, _Gathered)
                   and k.broken is None]
      info.update(contributions=child.contributions, out_slots=out_slots,
                  kinds=_across_bodies(okinds, "returned from", keep=out_slots), mm=omm,
                  tags=[child.tag(v) for v in jaxpr.outvars])
      arrays = [(c.sums, _materialize(c.counts, c.sums.shape)) for c in child.contributions]
      if thread:
        return outs, arrays, [list(okinds[i].index) for i in out_slots]
      return outs, arrays
    return fn, info

  def _threaded_kinds(self, info, indices) -> list:
    """``info["kinds"]`` with the output slices' indices (from a threaded ``fn``) put back."""
    kinds = list(info["kinds"])
    for i, index in zip(info["out_slots"], indices):
      kinds[i] = dataclasses.replace(kinds[i], index=tuple(index))
    return kinds

  def _remat(self, eqn, invals, inkinds):
    p = jc.remat_params(eqn)
    inner = jc.closed(p["jaxpr"])
    # Threaded: JAX inlines a checkpoint's forward when it differentiates, so the
    # differentiated route sees gathered slices cross it; this route must too.
    fn, info = self._nested(inner.jaxpr, inner.consts, inkinds, in_vars=eqn.invars,
                            thread=True)
    outs, arrays, indices = jax.checkpoint(fn, prevent_cse=p["prevent_cse"],
                                           policy=p["policy"])(*invals, *info["extra"])
    self._adopt(info["contributions"], arrays)
    self._set_tags(eqn.outvars, info["tags"])
    return list(outs), self._threaded_kinds(info, indices), info["mm"]

  def _set_tags(self, outvars, tags):
    if self.mask is None:
      return
    for var, t in zip(outvars, tags):
      if t is not None and not jc.is_dropvar(var):
        self.tags[var] = t

  def _adopt(self, contributions, arrays):
    for c, (s, n) in zip(contributions, arrays):
      self.contributions.append(c._replace(sums=s, counts=n))

  def _scan(self, eqn, invals, inkinds):
    p = jc.scan_params(eqn)
    body, nc, ncar = p["jaxpr"], p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
    ck, ik, xk = inkinds[:nc], inkinds[nc:nc + ncar], inkinds[nc + ncar:]
    carry_in = body.jaxpr.invars[nc:nc + ncar]
    carry_out = body.jaxpr.outvars[:ncar]
    carry_kinds = [k if (not _is_param(k) or v_out is v_in) else
                   _Opaque(_sources([k]), "a `scan` carry")
                   for k, v_in, v_out in zip(ik, carry_in, carry_out)]
    carry_kinds = [_DATA if k is _CONST or isinstance(k, _Mixed) else k for k in carry_kinds]
    x_kinds = [self._pin(k) for k in xk]
    # A scan over a mask axis j (time): each iteration sees the mask sliced at j.
    in_tags = [self.tag(v) for v in eqn.invars]
    j = next((t[0] for t in in_tags[nc + ncar:] if t and t[0] is not None), None)
    renumber = lambda t: None if t is None or j is None else tuple(
        None if x is None or x == j else (x - 1 if x > j else x) for x in t)
    body_tags = ([renumber(t) if j is not None else t for t in in_tags[:nc + ncar]]
                 + [renumber(t[1:]) if j is not None else (t[1:] if t else None)
                    for t in in_tags[nc + ncar:]])
    fn, info = self._nested(body.jaxpr, body.consts, ck + carry_kinds + x_kinds,
                            depth=self.depth + 1, tags=body_tags)
    masks = [] if j is None else [jnp.moveaxis(self.mask, j, 0)]

    def step(carry, x):
      x, m = (x[:-1], x[-1]) if masks else (x, None)
      outs, arrays = fn(*consts, *carry, *x, mask=m)
      return outs[:ncar], (outs[ncar:], arrays)

    carry, (ys, arrays) = lax.scan(step, list(init), list(xs) + masks, length=p["length"],
                                   reverse=p["reverse"], unroll=p["unroll"])
    for c, (s, n) in zip(info["contributions"], arrays):
      if len(c.piece.pinned) == self.depth + 1:  # sliced per iteration: stack
        piece = c.piece
        lead = piece.pinned[-1]
        piece = dataclasses.replace(piece, pinned=piece.pinned[:-1],
                                    box=((0, p["length"]),) + piece.box,
                                    axes=(lead,) + piece.axes)
        self.contributions.append(c._replace(piece=piece, sums=s, counts=n))
      else:  # the same weight every iteration: pool
        self.contributions.append(c._replace(sums=s.sum(0), counts=n.sum(0)))
    okinds = info["kinds"]
    out_kinds = [carry_kinds[i] if _is_param(carry_kinds[i]) and okinds[i] is not _DATA
                 else (_DATA if okinds[i] is _CONST else okinds[i]) for i in range(ncar)]
    out_kinds += [_opaque([k], "`scan` output") if _is_param(k) else k
                  for k in okinds[ncar:]]
    return list(carry) + list(ys), out_kinds, [False] * len(out_kinds)

  def _pin(self, kind):
    if not isinstance(kind, _View):
      return kind
    pieces = []
    for p in kind.pieces:
      if p.box[0] != (0, kind.shape[0]):
        return _Opaque(_sources([kind]), "a `scan` over a concatenated weight")
      pieces.append(dataclasses.replace(p, box=p.box[1:], axes=p.axes[1:],
                                        pinned=p.pinned + (_norm(p.axes[0]),)))
    return _View(tuple(pieces), kind.shape[1:])

  def _while(self, eqn, invals, inkinds):
    p = jc.while_params(eqn)
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    bk, ik = inkinds[cn:cn + bn], inkinds[cn + bn:]
    body = p["body_jaxpr"]
    carry_in, carry_out = body.jaxpr.invars[bn:], body.jaxpr.outvars
    carry_kinds = [k if (not _is_param(k) or v_out is v_in) else
                   _Opaque(_sources([k]), "a `while` carry")
                   for k, v_in, v_out in zip(ik, carry_in, carry_out)]
    carry_kinds = [_DATA if k is _CONST or isinstance(k, _Mixed) else k for k in carry_kinds]
    fn, info = self._nested(body.jaxpr, body.consts, bk + carry_kinds,
                            in_vars=eqn.invars[cn:])
    # Trace once for the accumulators' shapes, then loop with them in the carry.
    _, shapes = jax.eval_shape(lambda *c: fn(*bconsts, *c), *init)
    contributions = info["contributions"]
    cond_fun = jc.jex_core.jaxpr_as_fun(p["cond_jaxpr"])

    def loop_body(state):
      carry, acc = state
      outs, arrays = fn(*bconsts, *carry)
      return list(outs), [(a + s, b + n) for (a, b), (s, n) in zip(acc, arrays)]

    zeros = [(jnp.zeros(s.shape, s.dtype), jnp.zeros(n.shape, n.dtype)) for s, n in shapes]
    carry, acc = lax.while_loop(lambda st: cond_fun(*cconsts, *st[0])[0], loop_body,
                                (list(init), zeros))
    self._adopt(contributions, acc)
    okinds = info["kinds"]
    out_kinds = [carry_kinds[i] if _is_param(carry_kinds[i]) else okinds[i]
                 for i in range(len(okinds))]
    return list(carry), out_kinds, [False] * len(out_kinds)

  def _cond(self, eqn, invals, inkinds):
    index, ops = invals[0], invals[1:]
    branches = jc.cond_branches(eqn)
    fns = [self._nested(b.jaxpr, b.consts, inkinds[1:], in_vars=eqn.invars[1:])
           for b in branches]
    shapes = [jax.eval_shape(fn, *ops)[1] for fn, _ in fns]
    union = []  # (branch, position) for every contribution of every branch
    for b, s in enumerate(shapes):
      union += [(b, i) for i in range(len(s))]

    def branch(b):
      def run(*args):
        outs, arrays = fns[b][0](*args)
        full = []
        for bb, i in union:
          if bb == b:
            full.append(arrays[i])
          else:
            s, n = shapes[bb][i]
            full.append((jnp.zeros(s.shape, s.dtype), jnp.zeros(n.shape, n.dtype)))
        return outs, full
      return run

    outs, arrays = lax.switch(index, [branch(b) for b in range(len(branches))], *ops)
    contributions = [fns[b][1]["contributions"][i] for b, i in union]
    self._adopt(contributions, arrays)
    kinds = []
    for i in range(len(outs)):
      ks = [fn[1]["kinds"][i] for fn in fns]
      same = all(k == ks[0] for k in ks)
      kinds.append(ks[0] if same else _opaque(ks, "`cond` output"))
    return list(outs), kinds, [False] * len(outs)


# ----------------------------------------------------------------------------
# From contributions to statistics in the parameter's keep-rank layout.


def _place(c: _Contribution, rank: int):
  """``(sums, counts, regions)`` over the parameter's axes; region = (lo, n, block)."""
  piece = c.piece
  # A static count is a scalar: only the axes summed away below change it.
  static = np.ndim(c.counts) == 0
  arrays = [c.sums] if static else [c.sums, c.counts]
  scale = c.counts if static else None
  entries, new_shape = [], []
  for axis, fs in enumerate(piece.axes):
    fs = _norm(fs)
    extent = piece.box[axis][1] - piece.box[axis][0]
    size = c.sums.shape[axis]
    if size == extent:
      sizes = [f.size for f in fs]
    elif size == 1:
      sizes = [1] * len(fs)
    else:  # blocks of `block` consecutive elements along this axis
      block, new_fs, sizes = extent // size, [], []
      for f in reversed(fs):
        if block == 1:
          new_fs.insert(0, f)
          sizes.insert(0, f.size)
        elif block % f.size == 0:
          new_fs.insert(0, f)
          sizes.insert(0, 1)
          block //= f.size
        elif f.size % block == 0:
          new_fs[0:0] = [_Factor(f.axis, f.size // block, f.stride * block),
                         _Factor(f.axis, block, f.stride)]
          sizes[0:0] = [f.size // block, 1]
          block = 1
        else:
          raise _Unsupported("blocks that do not align with the parameter's axes")
      fs = new_fs
    entries += list(zip(fs, sizes))
    new_shape += sizes
  arrays = [a.reshape(new_shape) for a in arrays]
  # Axes with no parameter origin (a weight broadcast along them): every
  # position is another set of rows for the same weights.
  for k in reversed(range(len(entries))):
    f, size = entries[k]
    if f.axis == -1:
      arrays = ([a.sum(k) for a in arrays] if size > 1 else
                [_xp(a).squeeze(a, k) * np.float32(f.size) for a in arrays])
      scale = None if scale is None else scale * np.float32(size if size > 1 else f.size)
      del entries[k]
  order, regions = [], []
  groups = []
  for p in range(rank):
    idx = sorted((k for k, (f, _) in enumerate(entries) if f.axis == p),
                 key=lambda k: -abs(entries[k][0].stride))
    groups.append(idx)
    order += idx
  arrays = [_xp(a).transpose(a, order) for a in arrays]
  pos = {k: i for i, k in enumerate(order)}
  shape_out = []
  pinned_offset = list(piece.offset)
  for p in range(rank):
    idx = groups[p]
    fs = [entries[k][0] for k in idx]
    cs = [entries[k][1] for k in idx]
    if not idx:
      regions.append((pinned_offset[p], 1, 1))
      shape_out.append(None)
      continue
    if abs(fs[-1].stride) != 1 or any(abs(fs[i].stride) != fs[i + 1].size * abs(fs[i + 1].stride)
                                      for i in range(len(fs) - 1)):
      raise _Unsupported("a strided view of the parameter")
    if len({f.stride > 0 for f in fs}) != 1:
      raise _Unsupported("a partly reversed view of the parameter")
    n = math.prod(f.size for f in fs)
    lo = pinned_offset[p] + sum(min(0, (f.size - 1) * f.stride) for f in fs)
    if fs[0].stride < 0:
      flip = [pos[k] for k, c in zip(idx, cs) if c > 1]
      arrays = [_xp(a).flip(a, flip) if flip else a for a in arrays]
    last = max([i for i, c in enumerate(cs) if c > 1], default=-1)
    block = math.prod(f.size for f in fs[last + 1:])
    for i in range(last + 1):
      if cs[i] == 1:
        arrays = [_xp(a).repeat(a, fs[i].size, axis=pos[idx[i]]) for a in arrays]
    regions.append((lo, n, block))
    shape_out.append((idx, n // block))
  # Merge each parameter axis's group into one axis (they are adjacent now).
  final_shape = []
  for p in range(rank):
    final_shape.append(1 if shape_out[p] is None else shape_out[p][1])
  arrays = [a.reshape(final_shape) for a in arrays]
  return arrays[0], (scale if static else arrays[1]), regions


def _assemble(placed, shape):
  """Pools placed contributions into one keep-rank statistic of ``shape``."""
  rank = len(shape)
  q = [shape[p] for p in range(rank)]
  for _, _, regions in placed:
    for p, (lo, n, block) in enumerate(regions):
      q[p] = math.gcd(q[p], lo, block, n)
  total_s = total_n = None
  for s, n, regions in placed:
    static = np.ndim(n) == 0
    pads = []
    for p, (lo, size, block) in enumerate(regions):
      if block // q[p] > 1:  # each element repeated block // q[p] times along axis p
        new = s.shape[:p + 1] + (block // q[p],) + s.shape[p + 1:]
        for_each = (s,) if static else (s, n)
        out = [_xp(x).broadcast_to(_xp(x).expand_dims(x, p + 1), new) for x in for_each]
        out = [x.reshape(x.shape[:p] + (-1,) + x.shape[p + 2:]) for x in out]
        s, n = (out[0], n) if static else out
      pads.append((lo // q[p], (shape[p] - lo - size) // q[p], 0))
    if static:  # the count over its region, size 1 along the axes it covers whole
      small = [shape[p] // q[p] if lo or hi else 1 for p, (lo, hi, _) in enumerate(pads)]
      region = np.zeros(small, np.float32)
      region[tuple(slice(lo, k - hi) for k, (lo, hi, _) in zip(small, pads))] = n
      n = region
    if any(lo or hi for lo, hi, _ in pads):  # a part of the parameter: zeros elsewhere
      s = _pad_zeros(s, pads)
      n = n if static else _pad_zeros(n, pads)
    total_s = s if total_s is None else total_s + s
    total_n = n if total_n is None else total_n + n
  return _mean_or_no_rows(total_s, total_n)


def _mean_or_no_rows(sums, counts) -> jax.Array:
  """``sums / counts`` as float32, the no-rows marker ``-0.0`` where ``counts`` is 0
  (a weight in the ``cond`` branch not taken, an expert routed no tokens, the
  part of a parameter no slice used): the transforms keep its second moment."""
  xp = _xp(counts)
  denominator = xp.where(counts > 0, counts, np.float32(1))
  return jnp.where(counts > 0, jnp.asarray(sums / denominator, jnp.float32),
                   jnp.float32(_alignment.NO_ROWS))


class CoverageReport(NamedTuple):
  """Which parameters get AdaAct statistics, from one trace of the model.

  Attributes:
    matched: ``{path: statistics shape}`` for every parameter with statistics.
    unmatched: ``{path: reason}`` for every weight that multiplies an
      activation but whose statistics could not be captured.
    other: paths of parameters that multiply no activation (norm scales,
      lookup-only embedding tables without ``embeddings=True``, ...): they
      get the ``unmatched`` update, silently, as the authors' rule says.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import coverage
    >>> masked = lambda p, x: jnp.sum(x @ (p["w"] * 0.5)) + jnp.sum(x @ p["v"] * p["g"])
    >>> p = {"w": jnp.ones((3, 2)), "v": jnp.ones((3, 2)), "g": jnp.ones(2)}
    >>> coverage(masked, p, jnp.ones((4, 3)))._asdict()
    {'matched': {'v': (3, 1)}, 'unmatched': {'w': 'it passes through `mul`, which is not a layout op, before its `dot_general`'}, 'other': ('g',)}
  """

  matched: dict
  unmatched: dict
  other: tuple

  def __str__(self):
    lines = [f"AdaAct coverage: {len(self.matched)} with statistics, "
             f"{len(self.unmatched)} uncaptured, {len(self.other)} without"]
    lines += [f"  ok    {p}  {s}" for p, s in self.matched.items()]
    lines += [f"  MISS  {p}  {r}" for p, r in self.unmatched.items()]
    lines += [f"  --    {p}" for p in self.other]
    return "\n".join(lines)


def _finalize(trace: _Trace, contributions, paths, shapes):
  """Per-parameter statistics (keep-rank array, the uncaptured marker or None) and a report."""
  by_param: dict[int, list] = {}
  lookups: dict[int, list] = {}
  for c in contributions:
    (lookups if c.lookup else by_param).setdefault(c.piece.param, []).append(c)
  stats, matched, unmatched, other = [], {}, {}, []
  for i, (path, shape) in enumerate(zip(paths, shapes)):
    uses = by_param.get(i) or lookups.get(i)
    stat = None
    if i not in trace.uncaptured and uses:
      try:
        placed = [_place(c, len(shape)) for c in uses]
        stat = _assemble(placed, tuple(shape))
        if not by_param.get(i):
          stat = stat + jnp.float32(trace.embeddings)
      except _Unsupported as e:
        trace.uncaptured[i] = str(e)
    if i in trace.uncaptured:
      stat = jnp.zeros(UNCAPTURED_SHAPE, jnp.float32)
      unmatched[path] = trace.uncaptured[i]
    elif stat is not None:
      matched[path] = tuple(stat.shape)
    else:
      other.append(path)
    stats.append(stat)
  return stats, CoverageReport(matched, unmatched, tuple(other))


def _warn_uncaptured(report: CoverageReport, shapes: dict | None = None, skip=()):
  """Emits one ``UncapturedWeightWarning`` per uncaptured weight in ``report``."""
  for path, reason in report.unmatched.items():
    if path in skip:
      continue
    shape = "" if shapes is None or path not in shapes else f" (shape {shapes[path]})"
    warnings.warn(UncapturedWeightWarning(
        f"AdaAct: the weight '{path}'{shape} multiplies an activation, but its "
        f"statistics could not be captured: {reason}. It gets the optimizer's `unmatched` "
        "update (plain SGD by default). Fix: record its input with a sow hatch "
        "(adaact_optax.linen.sow_input / adaact_optax.nnx.sow_input) in a custom layer, "
        "or silence this on purpose with warnings.filterwarnings('ignore', "
        "category=adaact_optax.UncapturedWeightWarning); adaact(..., unmatched='error') "
        "makes it an error."), stacklevel=3)


def _embedding_floor(embeddings) -> float | None:
  """The ``embeddings=`` flag as a floor: False -> None (unmatched), True -> default."""
  if embeddings is True:
    return moments.EMBEDDING_FLOOR
  if embeddings is False or embeddings is None:
    return None
  if isinstance(embeddings, str) or not float(embeddings) >= 0:
    raise ValueError(f"embeddings must be a bool or a floor >= 0, got {embeddings!r}")
  return float(embeddings)


def _split_dynamic(args, kwargs):
  """``(arrays, rebuild)``: the array leaves of ``(args, kwargs)`` and a function
  putting new values for them back (other leaves, e.g. flags, stay static)."""
  leaves, treedef = tree_util.tree_flatten((args, kwargs))
  dynamic = (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)
  idx = [i for i, x in enumerate(leaves) if isinstance(x, dynamic)]

  def rebuild(values):
    full = list(leaves)
    for i, x in zip(idx, values):
      full[i] = x
    return tree_util.tree_unflatten(treedef, full)
  return [leaves[i] for i in idx], rebuild


def _flat_inputs(params, args, kwargs):
  """``(treedef, paths, parameter leaves, array args, rebuild)`` for both capture routes."""
  flat, treedef = tree_util.tree_flatten_with_path(params)
  paths = [_alignment.path_name(p) for p, _ in flat]
  dyn_vals, rebuild = _split_dynamic(args, kwargs)
  return treedef, paths, [jnp.asarray(x) for _, x in flat], dyn_vals, rebuild


_version_warned = []


def _check_version():
  if not jc.is_tested_version() and not _version_warned:
    _version_warned.append(True)
    warnings.warn(f"adaact_optax.capture was tested on jax {jc.TESTED_JAX[0]}..{jc.TESTED_JAX[1]}, "
                  f"not {jax.__version__}: run tests/test_jax_compat.py to check the internals "
                  "it reads", stacklevel=3)


def capture_call(fun: Callable, params, args: tuple = (), kwargs: dict | None = None, *,
                 embeddings: bool | float = False, row_mask=None):
  """Runs ``fun(params, *args, **kwargs)`` and captures AdaAct's statistics.

  The lower-level entry of ``value_grad_and_stats``: differentiable with
  respect to ``params`` (use it inside your own loss function), emits no
  warnings itself.

  Args:
    fun: called as ``fun(params, *args, **kwargs)``.
    params: the parameter pytree.
    args: ``fun``'s other positional arguments (a tuple).
    kwargs: ``fun``'s keyword arguments (a dict, or ``None``).
    embeddings: as for :func:`value_grad_and_stats`.
    row_mask: as for :func:`value_grad_and_stats`.

  Returns:
    ``(output, stats_leaves, report)``: ``fun``'s output; one entry per leaf
    of ``params`` (in ``jax.tree.leaves`` order): a keep-rank float32
    statistic, the ``(0,)``-shaped uncaptured marker, or ``None``; and a
    ``CoverageReport``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from adaact_optax import capture
    >>> def loss(params, x):
    ...   return jnp.mean(jnp.tanh(x @ params["w"] + params["b"]) ** 2)
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> out, leaves, report = capture.capture_call(loss, params, (jnp.ones((4, 3)),))
    >>> [leaf.shape for leaf in leaves]                # leaves order: "b", "w"
    [(1,), (3, 1)]
  """
  _check_version()
  kwargs = kwargs or {}
  floor = _embedding_floor(embeddings)
  treedef, paths, p_leaves, dyn_vals, rebuild = _flat_inputs(params, args, kwargs)

  def flat_fun(p, d):
    a, kw = rebuild(d)
    return fun(tree_util.tree_unflatten(treedef, p), *a, **kw)

  closed, out_shape = jax.make_jaxpr(flat_fun, return_shape=True)(p_leaves, dyn_vals)
  shapes = [x.shape for x in p_leaves]
  trace = _Trace(shapes, floor)
  interp = _interpreter(trace, row_mask, closed.jaxpr.invars[len(p_leaves):])
  kinds = [_identity_view(i, s) for i, s in enumerate(shapes)] + [_DATA] * len(dyn_vals)
  outs, _, _ = interp.run(closed.jaxpr, closed.consts, p_leaves + dyn_vals, kinds)
  out = tree_util.tree_unflatten(tree_util.tree_structure(out_shape), outs)
  stats, report = _finalize(trace, interp.contributions, paths, shapes)
  return out, stats, report


def _interpreter(trace: _Trace, row_mask, data_vars, deferred=False) -> _Interpreter:
  """The top-level interpreter; with a row mask, the data inputs' leading axes
  that match the mask's shape are its axes."""
  interp = _Interpreter(trace, mask=None if row_mask is None else jnp.asarray(row_mask),
                        deferred=deferred)
  if row_mask is not None:
    m = tuple(jnp.shape(row_mask))
    for var in data_vars:
      if tuple(var.aval.shape[:len(m)]) == m:
        interp.tags[var] = tuple(range(len(m))) + (None,) * (len(var.aval.shape) - len(m))
  return interp


class _ForwardPart(NamedTuple):
  """The equations of a differentiated jaxpr that compute its primal outputs."""

  constvars: list
  invars: list
  eqns: list
  outvars: list


def _forward_part(jaxpr, n_primal: int) -> _ForwardPart:
  """The equations the first ``n_primal`` outputs depend on, in order.

  In ``make_jaxpr(value_and_grad(f))`` these are ``f``'s forward pass; the
  backward pass only feeds the gradient outputs.
  """
  live = {v for v in jaxpr.outvars[:n_primal] if isinstance(v, jc.Var)}
  eqns = []
  for eqn in reversed(jaxpr.eqns):
    if any(v in live for v in eqn.outvars):
      eqns.append(eqn)
      live.update(v for v in eqn.invars if isinstance(v, jc.Var))
  return _ForwardPart(jaxpr.constvars, jaxpr.invars, eqns[::-1], jaxpr.outvars[:n_primal])


def _capture_differentiated(fun, has_aux, params, args, kwargs, floor, row_mask):
  """``value_grad_and_stats`` on a jaxpr that JAX has already differentiated.

  Traces ``value_and_grad(fun)`` as JAX does (its cached rules for nested
  ``jit``s make this far cheaper than differentiating the engine's
  equation-by-equation re-evaluation), reads the forward pass's equations
  without binding them, then evaluates the whole jaxpr as one inlined call
  that also returns the contractions' inputs, from which the statistics are
  computed. Returns ``None`` when a parameter enters a higher-order primitive
  of the differentiated jaxpr (``scan``, ``while``, ``cond``, a non-inlined
  ``jit``, ``custom_jvp``): those need the evaluating engine. (A
  ``checkpoint``'s forward and a ``custom_vjp``'s ``fwd`` are staged inline
  when differentiated, so they stay on this route.)

  Returns:
    ``(value, grad_leaves, stats_leaves, report)`` or ``None``.
  """
  _check_version()
  treedef, paths, p_leaves, dyn_vals, rebuild = _flat_inputs(params, args, kwargs)

  def value_and_grad(p, d):
    def loss(q):
      a, kw = rebuild(d)
      return fun(tree_util.tree_unflatten(treedef, q), *a, **kw)
    return jax.value_and_grad(loss, has_aux=has_aux)(p)

  closed, out_shape = jax.make_jaxpr(value_and_grad, return_shape=True)(p_leaves, dyn_vals)
  jaxpr = closed.jaxpr
  if jaxpr.effects:
    return None
  value_tree = tree_util.tree_structure(out_shape[0])
  n_value = value_tree.num_leaves
  shapes = [x.shape for x in p_leaves]
  trace = _Trace(shapes, floor)
  interp = _interpreter(trace, row_mask, jaxpr.invars[len(p_leaves):], deferred=True)
  kinds = [_identity_view(i, s) for i, s in enumerate(shapes)] + [_DATA] * len(dyn_vals)
  try:
    interp.run(_forward_part(jaxpr, n_value), jaxpr.constvars, jaxpr.invars, kinds)
  except _NeedsEvaluation:
    return None
  inputs = set(jaxpr.constvars) | set(jaxpr.invars)
  values = [v for _, _, value, _, _ in interp.pending
            for v in (value if isinstance(value, tuple) else (value,))]
  needed = list(dict.fromkeys(v for v in values if isinstance(v, jc.Var) and v not in inputs))
  args_in = list(closed.consts) + p_leaves + dyn_vals
  outs = jc.call_inline(jc.with_outputs(jaxpr, needed), args_in, "value_grad_and_stats")
  n_out = len(jaxpr.outvars)
  env = dict(zip(list(jaxpr.constvars) + list(jaxpr.invars), args_in))
  env.update(zip(needed, outs[n_out:]))
  interp.resolve(env)
  stats, report = _finalize(trace, interp.contributions, paths, shapes)
  value = tree_util.tree_unflatten(value_tree, outs[:n_value])
  return value, outs[n_value:n_out], stats, report


def value_grad_and_stats(fun: Callable, has_aux: bool = False, *,
                         embeddings: bool | float = False) -> Callable:
  """Like ``jax.value_and_grad``, also returning AdaAct's statistics.

  ``fun(params, *args, **kwargs)`` is any JAX function whose first argument
  is the parameter pytree (Flax ``variables['params']``, the ``nnx.Param``
  state of ``nnx.split``, an ``eqx.filter``-ed model, Haiku params, a dict)
  and that returns a scalar loss (or ``(loss, aux)`` with ``has_aux``). The
  returned function runs one forward pass and is jittable. Its jaxpr is
  ``jax.value_and_grad(fun)``'s plus a few equations per weight (see the
  module docstring for the fallback route).

  Statistics are read from the computation (see ``adaact_optax.capture``):
  every parameter that meets an activation in a ``dot_general`` or
  ``conv_general_dilated`` gets the mean of the squared input elements each
  of its elements multiplies, in the keep-rank layout (same rank as the
  parameter; size 1 along the axes the statistic does not vary along); a
  bias added to such a product gets ones; embedding tables used only by a
  lookup get token frequencies when ``embeddings`` is set. A weight that
  meets an activation but cannot be captured gets the ``(0,)``-shaped
  uncaptured marker and an ``UncapturedWeightWarning``.

  Args:
    fun: the loss function.
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    embeddings: ``False``: lookup-only tables get no statistics; ``True``
      or a float floor: token frequencies plus the floor (see
      ``adaact_optax.moments.token_moments``). A table that also multiplies
      an activation (``Embed.attend``, a tied output ``h @ table.T``) gets
      that product's statistics (``(1, d)`` for attend) whatever
      ``embeddings`` is: its lookups are not counted.

  Returns:
    ``g(params, *args, row_mask=None, **kwargs) -> (value, grads, stats)``:
    ``value`` is the loss (``(loss, aux)`` with ``has_aux``), ``grads`` the
    gradient with respect to ``params``, ``stats`` a tree with ``params``'
    structure (``None`` where a parameter has no statistics), ready for
    ``tx.update(grads, opt_state, params, activation_stats=stats)``.
    ``row_mask`` (optional, float or bool, shape of the leading batch/time
    axes of the inputs) excludes padded rows from the statistics of every
    weight whose input carries those leading axes.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import adaact_optax
    >>> def loss(params, x):
    ...   return jnp.mean(jnp.tanh(x @ params["w"] + params["b"]) ** 2)
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    >>> _, grads, stats = adaact_optax.value_grad_and_stats(loss)(params, jnp.ones((4, 3)))
    >>> stats["w"].shape, stats["b"].shape
    ((3, 1), (1,))
  """
  def g(params, *args, row_mask=None, **kwargs):
    treedef = jax.tree.structure(params)
    shapes = {_alignment.path_name(k): jnp.shape(v)
              for k, v in tree_util.tree_flatten_with_path(params)[0]}
    done = _capture_differentiated(fun, has_aux, params, args, kwargs,
                                   _embedding_floor(embeddings), row_mask)
    if done is not None:
      value, grads, stats, report = done
      _warn_uncaptured(report, shapes)
      return value, treedef.unflatten(grads), treedef.unflatten(stats)
    box = {}

    def inner(p):
      out, stats, report = capture_call(fun, p, args, kwargs, embeddings=embeddings,
                                        row_mask=row_mask)
      box["report"] = report
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, stats)

    (loss, (aux, stats)), grads = jax.value_and_grad(inner, has_aux=True)(params)
    _warn_uncaptured(box["report"], shapes)
    value = (loss, aux) if has_aux else loss
    return value, grads, treedef.unflatten(stats)
  return g


def _abstract_capture(fun, params, args, kwargs, embeddings):
  box = {}
  dyn_vals, rebuild = _split_dynamic(args, kwargs)

  def run(p, d):
    a, kw = rebuild(d)
    _, stats, report = capture_call(fun, p, a, kw, embeddings=embeddings)
    box["report"] = report
    return stats
  stats = jax.eval_shape(run, params, dyn_vals)
  return stats, box["report"]


def stats_shapes(fun: Callable, params, *args, embeddings: bool | float = False, **kwargs):
  """Shapes of ``value_grad_and_stats(fun)``'s statistics, without FLOPs.

  Returns a tree with ``params``' structure and ``jax.ShapeDtypeStruct``
  leaves (``None`` where a parameter has no statistics; shape ``(0,)`` for
  an uncaptured weight), for ``adaact(..., stats_shapes=...)``: it sizes the
  optimizer state to the statistics' layout (which axes are input axes).

  Args:
    fun: the loss function, ``fun(params, *args, **kwargs)``.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    *args: ``fun``'s other positional arguments (arrays or shapes).
    embeddings: as for :func:`value_grad_and_stats`.
    **kwargs: ``fun``'s keyword arguments.

  Returns:
    The tree of shapes described above.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> def loss(params, x):   # a grouped convolution: C=4 input channels, G=2 groups
    ...   y = jax.lax.conv_general_dilated(x, params["kernel"], (1, 1), "SAME",
    ...       dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
    ...   return jnp.mean(y ** 2)
    >>> params = {"kernel": jnp.ones((3, 3, 2, 6))}
    >>> shapes = adaact_optax.stats_shapes(loss, params, jnp.ones((1, 5, 5, 4)))
    >>> shapes["kernel"].shape
    (3, 3, 2, 2)
    >>> tx = adaact_optax.adaact(0.1, stats_shapes=shapes)
    >>> tx.init(params)[0].nu["kernel"].shape
    (3, 3, 2, 2)
  """
  stats, _ = _abstract_capture(fun, params, args, kwargs, embeddings)
  return jax.tree.structure(params).unflatten(stats)


def coverage(fun: Callable, params, *args, embeddings: bool | float = False,
             **kwargs) -> CoverageReport:
  """Which parameters of ``fun(params, *args, **kwargs)`` get statistics, and why not.

  Traces ``fun`` abstractly (no FLOPs, no warnings). ``print(report)``
  gives a table; ``report.unmatched`` maps each uncaptured weight's path to
  the reason.

  Args:
    fun: the loss function, ``fun(params, *args, **kwargs)``.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    *args: ``fun``'s other positional arguments (arrays or shapes).
    embeddings: as for :func:`value_grad_and_stats`.
    **kwargs: ``fun``'s keyword arguments.

  Returns:
    A :class:`CoverageReport`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import adaact_optax
    >>> def loss(params, x):
    ...   return params["scale"] * jnp.mean(jnp.tanh(x @ params["w"] + params["b"]) ** 2)
    >>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "scale": jnp.ones(())}
    >>> print(adaact_optax.coverage(loss, params, jnp.ones((4, 3))))
    AdaAct coverage: 2 with statistics, 0 uncaptured, 1 without
      ok    b  (1,)
      ok    w  (3, 1)
      --    scale
  """
  return _abstract_capture(fun, params, args, kwargs, embeddings)[1]
