"""The multi-host example's data: a synthetic global batch each process feeds its rows of.

Every process generates the same global batch from the step number
(``global_batch``) and feeds only the rows its devices hold (``to_global``,
``jax.make_array_from_process_local_data``).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

# Sizes of the toy task: sequences of TOKENS vectors of FEATURES, CLASSES labels.
TOKENS, FEATURES, CLASSES = 8, 8, 4


def global_batch(seed: int, step: int, size: int):
  """The step's whole batch, identical on every process: ``(size, T, F)``, labels."""
  teacher = np.random.default_rng(seed).normal(size=(FEATURES, CLASSES))
  rng = np.random.default_rng([seed, step])
  x = rng.normal(size=(size, TOKENS, FEATURES)).astype(np.float32)
  y = np.argmax(x.mean(axis=1) @ teacher, axis=-1).astype(np.int32)
  return x, y


def local_rows(sharding: NamedSharding, global_shape) -> slice:
  """The contiguous rows of the global batch this process's devices hold."""
  rows = [idx[0] for idx in sharding.addressable_devices_indices_map(global_shape).values()]
  start = min(r.start or 0 for r in rows)
  stop = max(global_shape[0] if r.stop is None else r.stop for r in rows)
  return slice(start, stop)


def to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Feeds this process's rows of a global batch as one global ``jax.Array``."""
  return jax.make_array_from_process_local_data(
      sharding, array[local_rows(sharding, array.shape)], array.shape)
