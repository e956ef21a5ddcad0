"""The multi-host example's model: a scanned transformer whose kernels name their mesh axes.

``LOGICAL_RULES`` maps the kernels' logical axis names to the ``(data, model)``
mesh; ``Transformer(logical=True)`` keeps the logical names,
``logical=False`` the mesh axes they map to.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adaact_optax import linen as aa_linen
from examples.multihost.input_pipeline import CLASSES


# Logical axis names -> mesh axes: FSDP over 'data' on the model width, tensor
# parallelism over 'model' on attention heads and MLP hidden units.
LOGICAL_RULES = (("embed", "data"), ("heads", "model"), ("mlp", "model"), ("kv", None),
                 ("features", None), ("classes", None), ("layers", None))


def _part(logical: bool, *names):
  """A kernel initializer partitioned along the logical ``names``.

  ``logical``: kept as logical names (``nn.with_logical_partitioning``, placed
  on the mesh by ``LOGICAL_RULES`` later); otherwise the mesh axes they map
  to (``nn.with_partitioning``).
  """
  init = nn.initializers.lecun_normal()
  if logical:
    return nn.with_logical_partitioning(init, names)
  return nn.with_partitioning(init, tuple(nn.logical_to_mesh_axes(names, LOGICAL_RULES)))


class Block(nn.Module):
  """Pre-norm transformer block; attention heads and MLP hidden units split over 'model'."""

  dim: int
  heads: int
  mlp_dim: int
  logical: bool = False

  @nn.compact
  def __call__(self, x):
    part = functools.partial(_part, self.logical)
    y = nn.LayerNorm()(x)
    qkv = functools.partial(nn.DenseGeneral, (self.heads, self.dim // self.heads),
                            kernel_init=part("embed", "heads", "kv"))   # (dim, heads, head_dim)
    q, k, v = qkv(name="query")(y), qkv(name="key")(y), qkv(name="value")(y)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]))
    o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
    x = x + nn.DenseGeneral(self.dim, axis=(-2, -1), kernel_init=part("heads", "kv", "embed"),
                            name="out")(o)
    y = nn.LayerNorm()(x)
    y = nn.gelu(nn.Dense(self.mlp_dim, kernel_init=part("embed", "mlp"))(y))
    return x + nn.Dense(self.dim, kernel_init=part("mlp", "embed"))(y)


class Transformer(nn.Module):
  """Embed -> ``depth`` blocks stacked with ``nn.scan`` -> mean over tokens -> head."""

  dim: int = 32
  heads: int = 4
  mlp_dim: int = 64
  depth: int = 2
  logical: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.dim, kernel_init=_part(self.logical, "features", "embed"))(x)
    # AdaAct's statistics stack over the layers exactly like the params; with
    # logical names the stacked axis is named too ('layers', not split).
    stack = nn.scan(lambda block, c, _: (block(c), None),
                    variable_axes={"params": 0, aa_linen.COLLECTION: 0},
                    split_rngs={"params": True}, length=self.depth,
                    metadata_params={nn.PARTITION_NAME: "layers" if self.logical else None})
    x, _ = stack(Block(self.dim, self.heads, self.mlp_dim, self.logical, name="blocks"), x, None)
    head = nn.Dense(CLASSES, kernel_init=_part(self.logical, "embed", "classes"))
    return head(nn.LayerNorm()(x).mean(axis=1))
