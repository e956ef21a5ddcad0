"""From contributions to each parameter's keep-rank statistic, and the coverage report."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from adaact_optax._src import alignment
from adaact_optax._src.capture.kinds import Factor, Unsupported, norm
from adaact_optax._src.capture.report import CoverageReport
from adaact_optax._src.capture.sums import Contribution, is_static, pad_zeros, xp

if TYPE_CHECKING:
  from adaact_optax._src.capture.walker import Trace


# ----------------------------------------------------------------------------
# From contributions to statistics in the parameter's keep-rank layout.


def place(c: Contribution, rank: int):
  """``(sums, counts, regions)`` over the parameter's axes; region = (lo, n, block)."""
  piece = c.piece
  # A static count is a scalar: only the axes summed away below change it.
  static = np.ndim(c.counts) == 0
  arrays = [c.sums] if static else [c.sums, c.counts]
  scale = c.counts if static else None
  entries, new_shape = [], []
  for axis, fs in enumerate(piece.axes):
    fs = norm(fs)
    extent = piece.bounds[axis][1] - piece.bounds[axis][0]
    size = c.sums.shape[axis]
    if size == extent:
      sizes = [f.size for f in fs]
    elif size == 1:
      sizes = [1] * len(fs)
    else:  # blocks of `block` consecutive elements along this axis
      new_fs: list = []
      block, sizes = extent // size, []
      for f in reversed(fs):
        if block == 1:
          new_fs.insert(0, f)
          sizes.insert(0, f.size)
        elif block % f.size == 0:
          new_fs.insert(0, f)
          sizes.insert(0, 1)
          block //= f.size
        elif f.size % block == 0:
          new_fs[0:0] = [Factor(f.axis, f.size // block, f.stride * block),
                         Factor(f.axis, block, f.stride)]
          sizes[0:0] = [f.size // block, 1]
          block = 1
        else:
          raise Unsupported("blocks that do not align with the parameter's axes")
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
                [xp(a).squeeze(a, k) * np.float32(f.size) for a in arrays])
      scale = None if scale is None else scale * np.float32(size if size > 1 else f.size)
      del entries[k]
  order, regions = [], []
  groups = []
  for p in range(rank):
    idx = sorted((k for k, (f, _) in enumerate(entries) if f.axis == p),
                 key=lambda k: -abs(entries[k][0].stride))
    groups.append(idx)
    order += idx
  arrays = [xp(a).transpose(a, order) for a in arrays]
  pos = {k: i for i, k in enumerate(order)}
  shape_out: list = []
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
      raise Unsupported("a strided view of the parameter")
    if len({f.stride > 0 for f in fs}) != 1:
      raise Unsupported("a partly reversed view of the parameter")
    n = math.prod(f.size for f in fs)
    lo = pinned_offset[p] + sum(min(0, (f.size - 1) * f.stride) for f in fs)
    if fs[0].stride < 0:
      flip = [pos[k] for k, c in zip(idx, cs) if c > 1]
      arrays = [xp(a).flip(a, flip) if flip else a for a in arrays]
    last = max([i for i, c in enumerate(cs) if c > 1], default=-1)
    block = math.prod(f.size for f in fs[last + 1:])
    for i in range(last + 1):
      if cs[i] == 1:
        arrays = [xp(a).repeat(a, fs[i].size, axis=pos[idx[i]]) for a in arrays]
    regions.append((lo, n, block))
    shape_out.append((idx, n // block))
  # Merge each parameter axis's group into one axis (they are adjacent now).
  final_shape = []
  for p in range(rank):
    final_shape.append(1 if shape_out[p] is None else shape_out[p][1])
  arrays = [a.reshape(final_shape) for a in arrays]
  return arrays[0], (scale if static else arrays[1]), regions


def assemble(placed, shape):
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
        out = [xp(x).broadcast_to(xp(x).expand_dims(x, p + 1), new) for x in for_each]
        out = [x.reshape(x.shape[:p] + (-1,) + x.shape[p + 2:]) for x in out]
        s, n = (out[0], n) if static else out
      pads.append((lo // q[p], (shape[p] - lo - size) // q[p], 0))
    if static:  # the count over its region, size 1 along the axes it covers whole
      small = [shape[p] // q[p] if lo or hi else 1 for p, (lo, hi, _) in enumerate(pads)]
      region = np.zeros(small, np.float32)
      region[tuple(slice(lo, k - hi) for k, (lo, hi, _) in zip(small, pads))] = n
      n = region
    if any(lo or hi for lo, hi, _ in pads):  # a part of the parameter: zeros elsewhere
      s = pad_zeros(s, pads)
      n = n if static else pad_zeros(n, pads)
    total_s = s if total_s is None else total_s + s
    total_n = n if total_n is None else total_n + n
  return mean_or_no_rows(total_s, total_n)


def mean_or_no_rows(sums, counts) -> jax.Array:
  """``sums / counts`` as float32, the no-rows marker ``-0.0`` where ``counts`` is 0
  (a weight in the ``cond`` branch not taken, an expert routed no tokens, the
  part of a parameter no slice used): the transforms keep its second moment."""
  if is_static(counts) and np.all(counts > 0):
    # Counts known at trace time and none zero (the common case): no select to trace.
    return jnp.asarray(sums / counts, jnp.float32)
  denominator = xp(counts).where(counts > 0, counts, np.float32(1))
  return jnp.where(counts > 0, jnp.asarray(sums / denominator, jnp.float32),
                   jnp.float32(alignment.NO_ROWS))


def finalize(trace: Trace, contributions, paths, shapes):
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
        placed = [place(c, len(shape)) for c in uses]
        stat = assemble(placed, tuple(shape))
        if not by_param.get(i):
          stat = stat + jnp.float32(trace.embeddings)
      except Unsupported as e:
        trace.uncaptured[i] = str(e)
    if i in trace.uncaptured:
      stat = jnp.zeros(alignment.UNCAPTURED_SHAPE, jnp.float32)
      unmatched[path] = trace.uncaptured[i]
    elif stat is not None:
      matched[path] = tuple(stat.shape)
    else:
      other.append(path)
    stats.append(stat)
  return stats, CoverageReport(matched, unmatched, tuple(other))

