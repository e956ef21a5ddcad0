"""Contractions: the rules that record statistics, and the statistics' math.

``dot_sums`` / ``conv_sums`` return ``(sums, counts)`` of the squared input
elements laid over the weight operand's axes (size 1 where the statistic
does not vary). The rules ``dot``, ``conv``, ``gather`` (embedding lookups;
slices picked at run time, see ``gathered.py``)
and ``bias`` (a parameter added to a contraction's output) decide which
operand is the weight and record its statistic with the walker.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adaact_optax._src import moments
from adaact_optax._src.capture import jax_internals as jc
from adaact_optax._src.capture.kinds import (CONST, DATA, Gathered, Mixed, Opaque, View, is_data,
                                              is_param, opaque, param_sources)
from adaact_optax._src.capture.row_mask import row_weights
from adaact_optax._src.capture.sums import filled, squares


def dot_sums(a, a_contract, a_batch, w_contract, w_batch, w_ndim, mask, tags):
  """``(sums, counts)`` of ``a**2`` laid over the weight operand's axes."""
  sums, count = dot_square_sums(a, a_contract, a_batch, w_contract, w_batch, w_ndim, mask, tags)
  return sums, filled(count, sums.shape)


def dot_square_sums(a, a_contract, a_batch, w_contract, w_batch, w_ndim, mask, tags):
  """``(sums, count)``: ``a**2`` summed over ``a``'s free (row) axes, laid over the
  weight operand's axes (size 1 along its own free axes), and the number of rows
  each weight element met (a Python number, or a traced scalar with a row mask)."""
  sq = squares(a)
  free = [ax for ax in range(a.ndim) if ax not in a_contract and ax not in a_batch]
  weights = row_weights(mask, tags, a.shape, free)
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


def conv_sums(lhs, rhs_shape, cp, mask, tags):
  """``(sums, counts)`` of the patch elements' squares over the kernel's axes."""
  lhs_spec, rhs_spec = cp["lhs_spec"], cp["rhs_spec"]
  sq = squares(lhs)
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
  return sums, filled(rows, sums.shape)


# ----------------------------------------------------------------------------
# Rules: which operand is a weight, and its statistic recorded with the walker.


def weight_and_input(interp, inkinds, eqn_name, batched=False):
  """Which operand is the weight: ``(weight index, kind of result)`` or None.

  ``batched``: the contraction has batch dimensions (attention scores), so
  neither operand can be a weight unless it is a view of a parameter.
  """
  lk, rk = inkinds
  if isinstance(lk, View) and isinstance(rk, View):
    return None, Opaque(param_sources(inkinds), f"`{eqn_name}` with another parameter")
  if isinstance(lk, Opaque) and isinstance(rk, Opaque):
    return None, opaque(inkinds, eqn_name)
  for w, (wk, ak) in ((1, (rk, lk)), (0, (lk, rk))):
    if isinstance(wk, View):
      if isinstance(ak, Opaque):
        interp.trace.miss(ak.sources, f"it passes through {ak.reason}, which is not a layout "
                          "op, before it multiplies another weight")
      return w, DATA
  for k in (lk, rk):
    if isinstance(k, Opaque):
      interp.trace.miss(k.sources, f"it passes through {k.reason}, which is not a layout "
                        f"op, before its `{eqn_name}`")
  # A parameter combined with data right before a contraction whose other side
  # is plain data: a weight given as data and scaled (dequantised) by it.
  mixed = [k for k in (lk, rk) if isinstance(k, Mixed)]
  if len(mixed) == 1 and not batched and not any(is_param(k) for k in (lk, rk)):
    interp.trace.miss(mixed[0].sources, f"it is combined with data by {mixed[0].reason} "
                      f"before a `{eqn_name}` whose other operand is data (a weight passed in "
                      "as data and scaled by a parameter?)")
  return None, DATA


def dot(interp, eqn, invals, inkinds, in_mm):
  lc, rc, lb, rb = jc.dot_dimensions(eqn)
  w, kind = weight_and_input(interp, inkinds, eqn.primitive.name, batched=bool(lb))
  if w is None:
    return [kind], [False]
  a_c, w_c, a_b, w_b = (lc, rc, lb, rb) if w == 1 else (rc, lc, rb, lb)
  w_ndim, mask, tags = eqn.invars[w].aval.ndim, interp.mask, interp.tag(eqn.invars[1 - w])
  interp.stat(inkinds[w], lambda a: dot_sums(a, a_c, a_b, w_c, w_b, w_ndim, mask, tags),
              invals[1 - w], key=(dot, a_c, a_b, w_c, w_b, w_ndim, tags))
  return [DATA], [True]


def conv(interp, eqn, invals, inkinds, in_mm):
  name = eqn.primitive.name
  lk, rk = inkinds
  if is_param(lk):
    if is_data(rk):
      interp.trace.miss(param_sources([lk]), "it is the input (not the kernel) of a convolution")
      return [DATA], [False]
    return [opaque(inkinds, f"`{name}`")], [False]
  if isinstance(rk, (Opaque, Mixed)):
    interp.trace.miss(rk.sources, f"it passes through {rk.reason}, which is not a layout "
                      f"op, before its `{name}`")
    return [DATA], [False]
  if not isinstance(rk, View):
    return [DATA if is_data(lk) or is_data(rk) else CONST], [False]
  cp = jc.conv_params(eqn)
  if cp["batch_groups"] != 1:
    interp.trace.miss(param_sources([rk]), "a convolution with batch_group_count > 1")
    return [DATA], [False]
  rhs_shape, mask, tags = eqn.invars[1].aval.shape, interp.mask, interp.tag(eqn.invars[0])
  interp.stat(rk, lambda lhs: conv_sums(lhs, rhs_shape, cp, mask, tags), invals[0])
  return [DATA], [True]


def gather(interp, eqn, invals, inkinds, in_mm):
  """Slices of a parameter picked by run-time indices: ``Gathered`` (see ``gathered.py``);
  an embedding lookup (whole rows along one axis) also records token frequencies."""
  table, ids = inkinds
  name = eqn.primitive.name
  if not isinstance(table, View) or is_param(ids):
    return [opaque(inkinds, f"`{name}`")], [False]
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
  slices = Gathered(table, picked, (invals[1],), False, eqn.invars[1].aval.shape[:-1],
                    gp["clips"], tuple(dims), name)
  if not whole:
    return [dataclasses.replace(slices, index=(), broken=(
        f"and the `{name}` takes parts of slices (slice sizes {gp['slice_sizes']} of "
        f"{shape}) or batches the table"))], [False]
  # An embedding lookup: whole rows along one axis, picked by integer ids.
  lookup = len(picked) == 1 and gp["collapsed"] == picked
  if lookup and interp.trace.embeddings is not None:
    axis = picked[0]

    def frequencies(ids):
      index = lax.stop_gradient(ids).reshape(-1)
      counts_row = jax.ops.segment_sum(jnp.ones(index.shape, jnp.float32), index,
                                       num_segments=shape[axis])
      sums = counts_row.reshape([n if a == axis else 1 for a, n in enumerate(shape)])
      return sums, filled(float(max(index.size, 1)), sums.shape)
    interp.stat(table, frequencies, invals[1], lookup=True)
  return [slices], [False]


def bias(interp, eqn, invals, inkinds, in_mm):
  """An ``add`` with a parameter operand.

  A parameter added to a captured contraction's output (or to a sum or a
  part of such outputs, see ``Rule.is_contraction_output``) is its bias: a
  weight on the constant input 1, statistic 1. The sum is still an affine
  output, so a second bias added to it is a bias too.
  """
  for b, o in ((0, 1), (1, 0)):
    if isinstance(inkinds[b], View) and in_mm[o]:
      view = inkinds[b]
      ones = np.ones((1,) * len(view.shape), np.float32)
      interp.stat(view, lambda _: (ones, ones), None)
      return [DATA], [True]
  return [opaque(inkinds, f"`{eqn.primitive.name}`")], [False]
