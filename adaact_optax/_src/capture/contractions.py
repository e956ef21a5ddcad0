"""The statistics of contractions: ``dot_general`` and ``conv_general_dilated``.

Each returns ``(sums, counts)`` of the squared input elements laid over the
weight operand's axes (size 1 where the statistic does not vary).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from adaact_optax import moments
from adaact_optax._src.capture.row_mask import row_weights
from adaact_optax._src.capture.sums import filled, squares


def dot_sums(a, a_contract, a_batch, w_contract, w_batch, w_ndim, mask, tags):
  """``(sums, counts)`` of ``a**2`` laid over the weight operand's axes."""
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
  return sums, filled(count, sums.shape)


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

