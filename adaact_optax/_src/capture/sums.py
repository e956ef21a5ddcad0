"""Statistics as ``(sums, counts)``: one use of one parameter piece.

Row counts are static numpy scalars unless a row mask weighs the rows; the
helpers here take either kind.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from adaact_optax._src.capture.kinds import Piece, Unsupported


# ----------------------------------------------------------------------------
# Contributions: one use of one parameter piece, as sums and row counts laid
# out over the value's axes (size 1 where the statistic does not vary).


class Contribution(NamedTuple):
  piece: Piece
  sums: jax.Array
  counts: jax.Array
  lookup: bool = False


def squares(x) -> jax.Array:
  x = lax.stop_gradient(x)
  if jnp.iscomplexobj(x):
    return jnp.real(x * jnp.conj(x)).astype(jnp.float32)
  return jnp.square(x.astype(jnp.float32))


# Row counts are known at trace time unless a row mask weighs the rows. A
# static count is one number per contribution (a numpy float32 scalar), so its
# bookkeeping (placing, padding, pooling) costs nothing in the traced program
# and no memory; a traced count is an array shaped like the sums. Sums are
# traced, except a bias's constant ones (numpy). The helpers take either kind.


def xp(a):
  return np if isinstance(a, (np.ndarray, np.generic)) else jnp


def is_static(a) -> bool:
  return isinstance(a, (np.ndarray, np.generic))


def filled(value, shape) -> Any:
  """A row count: a static scalar, or traced ``value`` broadcast to ``shape``."""
  if isinstance(value, (int, float, np.integer, np.floating)):
    return np.float32(value)
  return jnp.broadcast_to(jnp.asarray(value, jnp.float32), shape)


def materialize(counts, shape) -> jax.Array:
  """Counts as a traced array of ``shape`` (to pass through ``scan``, ``cond``...)."""
  return jnp.broadcast_to(jnp.asarray(counts, jnp.float32), shape)


def slice_axis(a, lo: int, hi: int, axis: int):
  return (a[(slice(None),) * axis + (slice(lo, hi),)] if xp(a) is np
          else lax.slice_in_dim(a, lo, hi, axis=axis))


def pad_zeros(a, pads):
  if xp(a) is np:
    return np.pad(a, [(lo, hi) for lo, hi, _ in pads])
  return lax.pad(a, jnp.zeros((), a.dtype), pads)


def restrict(piece: Piece, shape, sums, counts):
  """The part of value-shaped ``sums``/``counts`` that ``piece`` covers."""
  for axis, (lo, hi) in enumerate(piece.bounds):
    if (lo, hi) == (0, shape[axis]) or sums.shape[axis] == 1:
      continue
    if sums.shape[axis] != shape[axis]:
      raise Unsupported("grouped statistics of a concatenated weight")
    sums = slice_axis(sums, lo, hi, axis)
    counts = counts if np.ndim(counts) == 0 else slice_axis(counts, lo, hi, axis)
  return sums, counts

