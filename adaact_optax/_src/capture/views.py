"""Layout views: parameters followed symbolically through layout ops.

Each ``view_*`` takes a ``View`` and the op's params and returns the output
``View`` (or raises ``Unsupported``): per value axis, a list of
``(parameter axis, size, stride)`` factors, never an index array.
"""

from __future__ import annotations

import dataclasses
import math

from adaact_optax._src.capture import jax_internals as jc
from adaact_optax._src.capture.kinds import (Factor, Opaque, Piece, Unsupported, View,
                                              broadcast_factors, is_data, norm, opaque)


def add_offset(offset, deltas) -> tuple:
  out = list(offset)
  for axis, d in deltas.items():
    if axis >= 0:
      out[axis] += d
  return tuple(out)


def slice_factors(factors, lo: int, n: int, step: int):
  """Row-major factors of indices ``lo, lo+step, ...`` (n of them); ``(factors, deltas)``."""
  factors = norm(factors)
  if n == 1:
    deltas: dict = {}
    for f, i in zip(factors, unravel(lo, [f.size for f in factors])):
      deltas[f.axis] = deltas.get(f.axis, 0) + i * f.stride
    return (), deltas
  if not factors:
    raise Unsupported("slice")
  if len(factors) == 1:
    f = factors[0]
    return (Factor(f.axis, n, f.stride * step),), {f.axis: lo * f.stride}
  inner = math.prod(f.size for f in factors[1:])
  f0 = factors[0]
  if step == 1 and lo % inner == 0 and n % inner == 0:
    return norm((Factor(f0.axis, n // inner, f0.stride),) + factors[1:]), {
        f0.axis: (lo // inner) * f0.stride}
  if lo // inner == (lo + (n - 1) * step) // inner:  # within one outer index
    sub, deltas = slice_factors(factors[1:], lo % inner, n, step)
    deltas = dict(deltas)
    deltas[f0.axis] = deltas.get(f0.axis, 0) + (lo // inner) * f0.stride
    return sub, deltas
  raise Unsupported("a slice across merged axes")


def unravel(index: int, sizes) -> list:
  out = []
  for s in reversed(sizes):
    out.append(index % s)
    index //= s
  return out[::-1]


def regroup(axes, in_shape, out_shape) -> tuple:
  """Factors of a reshape's output axes from the input's (full bounds only)."""
  seq: list = []
  for fs, n in zip(axes, in_shape):
    fs = norm(fs)
    seq.extend(fs if fs or n == 1 else broadcast_factors(n))
  out, i = [], 0
  for n in out_shape:
    need, cur = n, []
    while need > 1:
      if i >= len(seq):
        raise Unsupported("reshape")
      f = seq[i]
      if need % f.size == 0:
        cur.append(f)
        need //= f.size
        i += 1
      elif f.size % need == 0:
        cur.append(Factor(f.axis, need, f.stride * (f.size // need)))
        seq[i] = Factor(f.axis, f.size // need, f.stride)
        need = 1
      else:
        raise Unsupported("a reshape that splits a parameter axis unevenly")
    out.append(tuple(cur))
  if i != len(seq):
    raise Unsupported("reshape")
  return tuple(out)


def is_whole(piece: Piece, shape, axis: int) -> bool:
  return piece.bounds[axis] == (0, shape[axis])


# ----------------------------------------------------------------------------
# Layout ops on views. Each returns the output View, or raises Unsupported.


def map_pieces(view: View, fn, out_shape) -> View:
  pieces = tuple(p for p in (fn(p) for p in view.pieces) if p is not None)
  return View(pieces, tuple(out_shape))


def view_transpose(view, out_shape, permutation):
  perm = tuple(permutation)
  return map_pieces(view, lambda p: dataclasses.replace(
      p, bounds=tuple(p.bounds[i] for i in perm), axes=tuple(p.axes[i] for i in perm)), out_shape)


def view_reshape(view, out_shape, new_sizes, dimensions=None, **_):
  if dimensions is not None:
    raise Unsupported("reshape with dimensions")

  in_axes = [a for a, n in enumerate(view.shape) if n != 1]
  out_axes = [a for a, n in enumerate(new_sizes) if n != 1]
  unit_only = [view.shape[a] for a in in_axes] == [new_sizes[a] for a in out_axes]

  def fn(p):
    if unit_only:  # only size-1 axes come or go: bounds carry over (concatenations too)
      bounds, axes = [(0, 1)] * len(new_sizes), [()] * len(new_sizes)
      for i, o in zip(in_axes, out_axes):
        bounds[o], axes[o] = p.bounds[i], p.axes[i]
      return dataclasses.replace(p, bounds=tuple(bounds), axes=tuple(axes))
    if not all(is_whole(p, view.shape, a) for a in range(len(view.shape))):
      raise Unsupported("a reshape of a concatenated weight")
    axes = regroup(p.axes, view.shape, tuple(new_sizes))
    return dataclasses.replace(p, bounds=tuple((0, n) for n in new_sizes), axes=axes)
  return map_pieces(view, fn, out_shape)


def view_squeeze(view, out_shape, dimensions):
  dims = {d % len(view.shape) for d in dimensions}

  def fn(p):
    keep = [a for a in range(len(view.shape)) if a not in dims]
    return dataclasses.replace(p, bounds=tuple(p.bounds[a] for a in keep),
                               axes=tuple(p.axes[a] for a in keep))
  return map_pieces(view, fn, out_shape)


def view_broadcast(view, out_shape, shape, broadcast_dimensions, **_):
  def fn(p):
    bounds, axes = [(0, n) for n in shape], [broadcast_factors(n) for n in shape]
    for i, j in enumerate(broadcast_dimensions):
      if view.shape[i] == shape[j]:
        bounds[j], axes[j] = p.bounds[i], p.axes[i]
    return dataclasses.replace(p, bounds=tuple(bounds), axes=tuple(axes))
  return map_pieces(view, fn, out_shape)


def slice_piece(p: Piece, shape, axis: int, start: int, limit: int, step: int):
  n_out = max(0, -(-(limit - start) // step))
  lo, hi = p.bounds[axis]
  if (lo, hi) == (0, shape[axis]):
    factors, deltas = slice_factors(p.axes[axis], start, n_out, step)
    new_bounds = (0, n_out)
  else:
    if step != 1:
      raise Unsupported("a strided slice of a concatenated weight")
    a, b = max(lo, start), min(hi, limit)
    if a >= b:
      return None
    factors, deltas = slice_factors(p.axes[axis], a - lo, b - a, 1)
    new_bounds = (a - start, b - start)
  bounds = list(p.bounds)
  axes = list(p.axes)
  bounds[axis], axes[axis] = new_bounds, factors
  return dataclasses.replace(p, bounds=tuple(bounds), axes=tuple(axes),
                             offset=add_offset(p.offset, deltas))


def view_slice(view, out_shape, start_indices, limit_indices, strides=None):
  strides = strides or (1,) * len(view.shape)

  def fn(p):
    shape = list(view.shape)
    for axis, (s, l, st) in enumerate(zip(start_indices, limit_indices, strides)):
      if (s, l, st) == (0, view.shape[axis], 1):
        continue
      p = slice_piece(p, shape, axis, s, l, st)
      if p is None:
        return None
      shape[axis] = out_shape[axis]
    return p
  return map_pieces(view, fn, out_shape)


def view_rev(view, out_shape, dimensions):
  def fn(p):
    bounds, axes, offset = list(p.bounds), list(p.axes), dict()
    for d in dimensions:
      n = view.shape[d]
      lo, hi = bounds[d]
      bounds[d] = (n - hi, n - lo)
      new = []
      for f in axes[d]:
        if f.axis >= 0:
          offset[f.axis] = offset.get(f.axis, 0) + (f.size - 1) * f.stride
        new.append(Factor(f.axis, f.size, -f.stride))
      axes[d] = tuple(new)
    return dataclasses.replace(p, bounds=tuple(bounds), axes=tuple(axes),
                               offset=add_offset(p.offset, offset))
  return map_pieces(view, fn, out_shape)


def view_pad(view, out_shape, padding_config):
  def fn(p):
    bounds = list(p.bounds)
    for d, (lo, hi, interior) in enumerate(padding_config):
      if interior != 0 or lo < 0 or hi < 0:
        raise Unsupported("pad")
      bounds[d] = (bounds[d][0] + lo, bounds[d][1] + lo)
    return dataclasses.replace(p, bounds=tuple(bounds))
  return map_pieces(view, fn, out_shape)


def shift_piece(p: Piece, axis: int, by: int) -> Piece:
  bounds = list(p.bounds)
  bounds[axis] = (bounds[axis][0] + by, bounds[axis][1] + by)
  return dataclasses.replace(p, bounds=tuple(bounds))


# ----------------------------------------------------------------------------
# Rules: each ``fn(eqn, inkinds) -> output kinds`` below becomes a table rule
# with ``layout_rule``; a view it cannot follow makes the outputs opaque.


def layout_rule(fn):
  """The table rule of a layout op given as ``fn(eqn, inkinds) -> kinds``."""
  def rule(interp, eqn, invals, inkinds, in_mm):
    n_out = len(eqn.outvars)
    try:
      kinds = fn(eqn, inkinds)
    except Unsupported as e:
      kinds = [opaque(inkinds, f"`{eqn.primitive.name}` ({e})")] * n_out
    return kinds, [False] * n_out
  return rule


def single(view_fn):
  """``fn(eqn, inkinds)`` of a one-operand op: ``view_fn(view, out_shape, **params)``."""
  def fn(eqn, inkinds):
    kind = inkinds[0]
    if not isinstance(kind, View):
      return [kind]
    return [view_fn(kind, tuple(eqn.outvars[0].aval.shape), **dict(eqn.params))]
  return fn


def pad(eqn, inkinds):
  kind = inkinds[0]
  if not isinstance(kind, View):
    return [opaque(inkinds, f"`{eqn.primitive.name}`")]
  return [view_pad(kind, tuple(eqn.outvars[0].aval.shape), eqn.params["padding_config"])]


def split(eqn, inkinds):
  out_shapes = [v.aval.shape for v in eqn.outvars]
  kind = inkinds[0]
  if not isinstance(kind, View):
    return [kind] * len(out_shapes)
  axis, start, out = eqn.params["axis"], 0, []
  for size, shape in zip(eqn.params["sizes"], out_shapes):
    starts = [0] * len(shape)
    limits = list(kind.shape)
    starts[axis], limits[axis] = start, start + size
    out.append(view_slice(kind, tuple(shape), starts, limits))
    start += size
  return out


def concatenate(eqn, inkinds):
  """Views (and constants) side by side along one axis."""
  if any(is_data(k) or isinstance(k, Opaque) for k in inkinds):
    return [opaque(inkinds, f"`{eqn.primitive.name}`")]
  axis, start, pieces = eqn.params["dimension"], 0, []
  for var, kind in zip(eqn.invars, inkinds):
    if isinstance(kind, View):
      pieces.extend(shift_piece(p, axis, start) for p in kind.pieces)
    start += var.aval.shape[axis]
  return [View(tuple(pieces), tuple(eqn.outvars[0].aval.shape))]


def dynamic_slice(eqn, inkinds):
  """A slice at start indices known at trace time (literals); opaque otherwise."""
  if not all(jc.is_literal(v) for v in eqn.invars[1:]):
    return [opaque(inkinds, f"`{eqn.primitive.name}`")]
  kind = inkinds[0]
  if not isinstance(kind, View):
    return [kind]
  starts = [jc.literal_value(v) for v in eqn.invars[1:]]
  return [view_slice(kind, tuple(eqn.outvars[0].aval.shape), start_indices=starts,
                     limit_indices=[s + n for s, n in zip(starts, eqn.params["slice_sizes"])])]


def identity(interp, eqn, invals, inkinds, in_mm):
  """Ops that only move or retype elements: outputs are their inputs."""
  n_out = len(eqn.outvars)
  return list(inkinds[:n_out]), list(in_mm[:n_out])
