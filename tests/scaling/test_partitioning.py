"""AdaAct's state under Flax partitioning metadata, on 8 CPU devices (2x4 and 4x2 meshes).

The two flows users already write (issue 11):

* Linen: ``jax.eval_shape(tx.init, boxed_params)`` -> ``nn.get_partition_spec``
  -> ``nn.logical_to_mesh_sharding`` -> ``jax.jit(tx.init, out_shardings=...)``;
* NNX: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and
  ``with_sharding_constraint(state, nnx.get_partition_spec(state))`` in ``nnx.jit``;

on an MLP, a CNN with a grouped convolution, a transformer block with
multi-head ``DenseGeneral`` attention and an embedding, and layers stacked
by ``nn.scan`` / ``nnx.scan``. Every state leaf's sharding is checked against
a spec written out by hand below (``mu``: the parameter's; ``nu``: the
tables ``*_NU``), and five sharded steps against the same steps on one
device. ``adaact_optax.sharding`` must agree with the metadata.

conftest.py gives the session 8 simulated CPU devices.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import adaact_optax
from adaact_optax import linen as aa_linen
from adaact_optax import moments
from adaact_optax._src import alignment as matching
from adaact_optax import nnx as aa_nnx
from adaact_optax import sharding as aa_sharding
from conftest import linen_train_step

STEPS, BATCH, CLASSES = 5, 8, 4
D, HIDDEN, HEADS, HEAD_DIM, VOCAB, TOKENS, LAYERS = 8, 16, 4, 2, 16, 4, 2
MESHES = {"2x4": (2, 4), "4x2": (4, 2)}
# Every case checks its state's shardings on both meshes; the five training
# steps (a compile each case) run on one mesh per case, both meshes per flow.
STEP_MESH = {("linen", "mlp"): "4x2", ("linen", "cnn"): "2x4", ("linen", "transformer"): "2x4",
             ("linen", "scan"): "4x2", ("nnx", "mlp"): "2x4", ("nnx", "cnn"): "4x2",
             ("nnx", "transformer"): "4x2", ("nnx", "scan"): "2x4"}
# Logical axis -> mesh axis, the style of large-model codebases.
RULES = (("batch", "data"), ("embed", "data"), ("mlp", "model"), ("heads", "model"),
         ("vocab", "model"), ("kv", None), ("layers", None))
_init = nn.initializers.lecun_normal()


def make_mesh(name):
  return jax.make_mesh(MESHES[name], ("data", "model"), axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:8])


def part(*names):          # Linen, mesh axis names: nn.Partitioned
  return nn.with_partitioning(_init, names)


def logical(*names):       # Linen, logical names: nn.LogicallyPartitioned
  return nn.with_logical_partitioning(_init, names)


def npart(*names):         # NNX, mesh axis names
  return nnx.with_partitioning(_init, names)


# ---------------------------------------------------------------- Linen models


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(HIDDEN, kernel_init=part("data", "model"),
                 bias_init=nn.with_partitioning(nn.initializers.zeros, ("model",)))(x)
    return nn.Dense(CLASSES, kernel_init=part("model", None))(nn.relu(h))


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):                                            # (B, 6, 6, 4)
    x = nn.relu(nn.Conv(8, (3, 3), kernel_init=logical(None, None, "embed", "mlp"))(x))
    # Kernel (3, 3, 4, 8). Its output channels stay whole, here and in the
    # Dense after it: XLA's SPMD partitioner aborts (a CHECK failure in
    # convolution_handler.cc) on a grouped conv whose output channels are
    # split 4 ways, with optax.adam as well.
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=2,
                        kernel_init=logical(None, None, "embed", None))(x))
    return nn.Dense(CLASSES, kernel_init=logical("embed", None))(x.mean(axis=(1, 2)))


class Transformer(nn.Module):
  @nn.compact
  def __call__(self, tokens):                                       # (B, T) int
    x = nn.Embed(VOCAB, D, embedding_init=logical("vocab", "embed"))(tokens)
    y = nn.LayerNorm()(x)
    qkv = functools.partial(nn.DenseGeneral, (HEADS, HEAD_DIM),
                            kernel_init=logical("embed", "heads", "kv"))
    q, k, v = qkv(name="query")(y), qkv(name="key")(y), qkv(name="value")(y)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM))
    o = jnp.einsum("bhqk,bkhd->bqhd", w, v)
    x = x + nn.DenseGeneral(D, axis=(-2, -1), kernel_init=logical("heads", "kv", "embed"),
                            name="out")(o)
    h = nn.gelu(nn.Dense(HIDDEN, kernel_init=logical("embed", "mlp"))(nn.LayerNorm()(x)))
    x = x + nn.Dense(D, kernel_init=logical("mlp", "embed"))(h)
    return nn.Dense(CLASSES, kernel_init=logical("embed", None))(x.mean(axis=1))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(HIDDEN, kernel_init=logical("embed", "mlp"))(x))
    return x + nn.Dense(D, kernel_init=logical("mlp", "embed"))(h)


class ScanNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, kernel_init=logical("embed", "mlp"))(x)
    stack = nn.scan(lambda m, c, _: (m(c), None),
                    variable_axes={"params": 0, aa_linen.COLLECTION: 0},
                    split_rngs={"params": True}, length=LAYERS,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(Block(), x, None)
    return nn.Dense(CLASSES, kernel_init=logical("embed", None))(x)


# nu's expected names (mesh axes for MLP, logical ones elsewhere), by parameter
# path; parameters not listed have unpartitioned nu (biases, norm scales).
MLP_NU = {"Dense_0/kernel": P("data", None), "Dense_0/bias": P(None),
          "Dense_1/kernel": P("model", None)}
CNN_NU = {"Conv_0/kernel": P(None, None, "embed", None),        # (3, 3, 4, 1)
          "Conv_1/kernel": P(None, None, "embed", None),        # (3, 3, 4, 2): 2 groups
          "Dense_0/kernel": P("embed", None)}
# The embedding and norms are AdamW's (unmatched=): parameter-shaped moments.
# With the capture's stats_shapes the attention kernels' nu has their
# statistics' shape: (8, 1, 1) for query (8, 4, 2) (its input only).
TRANSFORMER_NU = {"query/kernel": P("embed", None, None),
                  "key/kernel": P("embed", None, None),
                  "value/kernel": P("embed", None, None),
                  "out/kernel": P("heads", "kv", None),         # (4, 2, 1)
                  "Dense_0/kernel": P("embed", None), "Dense_1/kernel": P("mlp", None),
                  "Dense_2/kernel": P("embed", None)}
SCAN_NU = {"Dense_0/kernel": P("embed", None), "Dense_1/kernel": P("embed", None),
           "Block_0/Dense_0/kernel": P("layers", "embed", None),   # (2, 8, 1)
           "Block_0/Dense_1/kernel": P("layers", "mlp", None)}     # (2, 16, 1)


def _kernels(params):
  return jax.tree_util.tree_map_with_path(lambda p, _: "kernel" in jax.tree_util.keystr(p), params)


def _not_kernels(params):
  return jax.tree.map(lambda m: not m, _kernels(params))


def linen_case(name):
  """(model, inputs for 5 steps, labels, tx factory (of the stats shapes), nu table)."""
  rng = np.random.default_rng(0)
  ys = rng.integers(0, CLASSES, size=(STEPS, BATCH)).astype(np.int32)
  if name == "mlp":
    xs = rng.normal(size=(STEPS, BATCH, D)).astype(np.float32)
    return MLP(), xs, ys, lambda shapes: adaact_optax.adaact(0.1), MLP_NU
  if name == "cnn":
    xs = rng.normal(size=(STEPS, BATCH, 6, 6, 4)).astype(np.float32)
    return CNN(), xs, ys, lambda shapes: adaact_optax.adaact(0.1, stats_shapes=shapes), CNN_NU
  if name == "transformer":
    xs = rng.integers(0, VOCAB, size=(STEPS, BATCH, TOKENS)).astype(np.int32)
    # Embedding and norms (no statistics) with AdamW: an optax.partition inside.
    tx = lambda shapes: adaact_optax.adaact(0.1, unmatched=optax.adamw(1e-2), stats_shapes=shapes)
    return Transformer(), xs, ys, tx, TRANSFORMER_NU
  xs = rng.normal(size=(STEPS, BATCH, D)).astype(np.float32)
  tx = lambda shapes: optax.chain(optax.masked(adaact_optax.adaact(0.1), _kernels),
                                  optax.masked(optax.sgd(0.1), _not_kernels))
  return ScanNet(), xs, ys, tx, SCAN_NU


# ------------------------------------------------------------------ NNX models


class NMLP(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(D, HIDDEN, kernel_init=npart("data", "model"),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("model",)),
                         rngs=rngs)
    self.head = nnx.Linear(HIDDEN, CLASSES, kernel_init=npart("model", None), rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.up(x)))


class NCNN(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(4, 8, (3, 3), kernel_init=npart(None, None, "data", "model"), rngs=rngs)
    self.grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=2,   # see CNN
                            kernel_init=npart(None, None, "data", None), rngs=rngs)
    self.head = nnx.Linear(8, CLASSES, kernel_init=npart("data", None), rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.grouped(nnx.relu(self.conv(x))))
    return self.head(x.mean(axis=(1, 2)))


class NTransformer(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, D, embedding_init=npart("model", "data"), rngs=rngs)
    self.norm1, self.norm2 = nnx.LayerNorm(D, rngs=rngs), nnx.LayerNorm(D, rngs=rngs)
    qkv = functools.partial(nnx.LinearGeneral, D, (HEADS, HEAD_DIM),
                            kernel_init=npart("data", "model", None), rngs=rngs)
    self.query, self.key, self.value = qkv(), qkv(), qkv()
    self.out = nnx.LinearGeneral((HEADS, HEAD_DIM), D, axis=(-2, -1),
                                 kernel_init=npart("model", None, "data"), rngs=rngs)
    self.up = nnx.Linear(D, HIDDEN, kernel_init=npart("data", "model"), rngs=rngs)
    self.down = nnx.Linear(HIDDEN, D, kernel_init=npart("model", "data"), rngs=rngs)
    self.head = nnx.Linear(D, CLASSES, kernel_init=npart("data", None), rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    y = self.norm1(x)
    q, k, v = self.query(y), self.key(y), self.value(y)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HEAD_DIM))
    x = x + self.out(jnp.einsum("bhqk,bkhd->bqhd", w, v))
    x = x + self.down(nnx.gelu(self.up(self.norm2(x))))
    return self.head(x.mean(axis=1))


def nlogical(*names):      # NNX, logical names resolved by RULES
  return nnx.with_partitioning(_init, names, sharding_rules=RULES)


class NBlock(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(D, HIDDEN, kernel_init=nlogical("embed", "mlp"), rngs=rngs)
    self.down = nnx.Linear(HIDDEN, D, kernel_init=nlogical("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    """``(output, statistics)``: ``nnx.scan`` stacks the statistics like the params."""
    h = nnx.relu(self.up(x))
    stats = {"up": {"kernel": moments.dense_moments(x).mean, "bias": jnp.ones(())},
             "down": {"kernel": moments.dense_moments(h).mean, "bias": jnp.ones(())}}
    return x + self.down(h), stats


class NScan(nnx.Module):
  """Blocks made by ``nnx.vmap`` and run by ``nnx.scan`` over a 'layers' axis.

  ``aa_nnx.apply`` does not see through ``nnx.scan``, so the forward pass
  returns its statistics itself, computed with ``adaact_optax.moments``.
  """

  def __init__(self, rngs):
    self.inp = nnx.Linear(D, D, kernel_init=nlogical("embed", "mlp"), rngs=rngs)

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def blocks(rngs):
      return NBlock(rngs)

    self.blocks = blocks(rngs)
    self.head = nnx.Linear(D, CLASSES, kernel_init=nlogical("embed", None), rngs=rngs)

  def forward_with_stats(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0),
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def body(c, block):
      return block(c)

    h = self.inp(x)
    y, block_stats = body(h, self.blocks)
    dense = lambda a: {"kernel": moments.dense_moments(a).mean, "bias": jnp.ones(())}
    return self.head(y), {"inp": dense(x), "blocks": block_stats, "head": dense(y)}

  def __call__(self, x):
    return self.forward_with_stats(x)[0]


NMLP_NU = {"up/kernel": P("data", None), "up/bias": P(None), "head/kernel": P("model", None)}
NCNN_NU = {"conv/kernel": P(None, None, "data", None), "grouped/kernel": P(None, None, "data", None),
           "head/kernel": P("data", None)}
# Built without stats_shapes: nu has the default shape K[:-1] + (1,), e.g.
# (8, 4, 1) for query (8, 4, 2), and the embedding's (16, 1) is AdaAct's.
NTRANSFORMER_NU = {"embed/embedding": P("model", None),
                   "query/kernel": P("data", "model", None), "key/kernel": P("data", "model", None),
                   "value/kernel": P("data", "model", None), "out/kernel": P("model", None, None),
                   "up/kernel": P("data", None), "down/kernel": P("model", None),
                   "head/kernel": P("data", None)}
# NScan's names are logical: its table is in mesh axes ('layers' -> None).
NSCAN_NU = {"inp/kernel": P("data", None), "head/kernel": P("data", None),
            "blocks/up/kernel": P(None, "data", None),
            "blocks/down/kernel": P(None, "model", None)}


def nnx_case(name):
  rng = np.random.default_rng(1)
  ys = rng.integers(0, CLASSES, size=(STEPS, BATCH)).astype(np.int32)
  if name == "mlp":
    xs = rng.normal(size=(STEPS, BATCH, D)).astype(np.float32)
    return NMLP, xs, ys, lambda shapes: adaact_optax.adaact(0.1), NMLP_NU
  if name == "cnn":
    xs = rng.normal(size=(STEPS, BATCH, 6, 6, 4)).astype(np.float32)
    return NCNN, xs, ys, lambda shapes: adaact_optax.adaact(0.1, stats_shapes=shapes), NCNN_NU
  if name == "transformer":
    xs = rng.integers(0, VOCAB, size=(STEPS, BATCH, TOKENS)).astype(np.int32)
    tx = lambda shapes: optax.partition({"adaact": adaact_optax.adaact(0.1),
                                         "adam": optax.adamw(1e-2)}, _nnx_labels)
    return NTransformer, xs, ys, tx, NTRANSFORMER_NU
  xs = rng.normal(size=(STEPS, BATCH, D)).astype(np.float32)
  tx = lambda shapes: optax.chain(optax.masked(adaact_optax.adaact(0.1), _kernels),
                                  optax.masked(optax.sgd(0.1), _not_kernels))
  return NScan, xs, ys, tx, NSCAN_NU


def _nnx_labels(params):
  # Norms with AdamW, the rest (the embedding too) with AdaAct.
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "adam" if "norm" in jax.tree_util.keystr(p) else "adaact", params)


# --------------------------------------------------------------------- checks


def _param_of(state_path, param_names):
  """The parameter path a state leaf sits at (the longest suffix match)."""
  name = matching.path_name(state_path)
  found = [p for p in param_names if name == p or name.endswith("/" + p)]
  return max(found, key=len) if found else None


def expected_specs(state, param_shapes, param_specs, nu_table, to_mesh=lambda s: s):
  """The spec of every state leaf, from the tables: a parameter-shaped leaf
  (``mu``, Adam's moments) gets its parameter's spec; a smaller one
  (AdaAct's ``nu``) the table's (replicated if absent); others ``P()``."""
  def spec(path, leaf):
    name = _param_of(path, param_shapes)
    if name is None:
      return P()
    if tuple(leaf.shape) == param_shapes[name]:
      return param_specs[name]
    return to_mesh(nu_table.get(name, P(*(None,) * len(leaf.shape))))
  return jax.tree_util.tree_map_with_path(spec, state)


def assert_sharded(tree, specs, mesh, got=None):
  """Every leaf of ``tree`` is sharded by ``specs`` (or, given ``got``, a
  tree of its ``PartitionSpec``s / ``NamedSharding``s, those say so)."""
  is_spec = lambda x: isinstance(x, (P, NamedSharding))
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  spec_leaves = jax.tree.leaves(specs, is_leaf=is_spec)
  if got is None:
    got_leaves = [a.sharding for _, a in leaves]
  else:  # a prefix of ``tree``: masked entries (optax.MaskedNode) hold no leaves
    per_leaf = jax.tree.map(lambda g, sub: [g] * len(jax.tree.leaves(sub)), got, tree,
                            is_leaf=lambda x: x is None or is_spec(x))
    got_leaves = [g for gs in jax.tree.leaves(per_leaf, is_leaf=lambda x: isinstance(x, list))
                  for g in gs]
  assert len(leaves) == len(spec_leaves) == len(got_leaves)
  for (path, a), spec, g in zip(leaves, spec_leaves, got_leaves):
    g = g if isinstance(g, NamedSharding) else NamedSharding(mesh, g)
    assert g.is_equivalent_to(NamedSharding(mesh, spec), a.ndim), (
        jax.tree_util.keystr(path), a.shape, g.spec, spec)


def assert_parity(actual, expected):
  # The parity tolerance of tests/rule/test_parity.py.
  def close(path, a, e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    ok = np.abs(a - e) <= 1e-5 + 1e-4 * np.abs(e)
    assert ok.all(), (jax.tree_util.keystr(path), np.abs(a - e).max())
  jax.tree_util.tree_map_with_path(close, actual, expected)


def by_name(tree):
  return {matching.path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# ---------------------------------------------------------------------- Linen


@functools.lru_cache(maxsize=None)
def linen_reference(name):
  """Five steps on one device: unboxed params and state."""
  model, xs, ys, make_tx, _ = linen_case(name)
  params = nn.unbox(model.init(jax.random.key(0), xs[0]))["params"]
  tx = make_tx(aa_linen.stats_shapes(model, {"params": params}, xs[0]))
  opt_state = tx.init(params)
  step = linen_train_step(model, tx)
  for x, y in zip(xs, ys):
    params, opt_state = step(params, opt_state, x, y)
  return params, opt_state


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "scan"])
def test_linen_state_sharded_by_its_own_metadata(name, mesh_name):
  model, xs, ys, make_tx, nu_table = linen_case(name)
  mesh = make_mesh(mesh_name)
  key = jax.random.key(0)
  if name == "mlp":   # nn.Partitioned: mesh axis names
    shardings = lambda tree: nn.get_sharding(tree, mesh)
    to_mesh = lambda spec: spec
  else:               # nn.LogicallyPartitioned
    shardings = lambda tree: nn.logical_to_mesh_sharding(nn.get_partition_spec(tree), mesh, RULES)
    to_mesh = lambda spec: nn.logical_to_mesh_axes(tuple(spec), RULES)
  p_shard = shardings(jax.eval_shape(model.init, key, xs[0])["params"])
  boxed = jax.jit(lambda: model.init(key, xs[0])["params"], out_shardings=p_shard)()
  tx = make_tx(aa_linen.stats_shapes(model, {"params": nn.unbox(boxed)}, xs[0]))

  # The flow of Flax's lm1b example: the state's specs from its own metadata.
  s_shard = shardings(jax.eval_shape(tx.init, boxed))
  opt_state = jax.jit(tx.init, out_shardings=s_shard)(boxed)

  params, opt_state = nn.unbox(boxed), nn.unbox(opt_state)
  shapes = {n: tuple(a.shape) for n, a in by_name(params).items()}
  param_specs = {n: s.spec for n, s in by_name(p_shard).items()}
  want = expected_specs(opt_state, shapes, param_specs, nu_table, to_mesh)
  assert_sharded(opt_state, want, mesh, got=s_shard)
  assert_sharded(opt_state, want, mesh)
  # adaact_optax.sharding agrees with the metadata.
  helper = aa_sharding.state_shardings(tx, p_shard, params)
  assert_sharded(opt_state, jax.tree.map(lambda s: s.spec, helper), mesh)
  if STEP_MESH["linen", name] != mesh_name:
    return

  data = NamedSharding(mesh, P("data"))
  step = jax.jit(linen_train_step(model, tx, jit=False),
                 in_shardings=(p_shard, s_shard, data, data),
                 out_shardings=(p_shard, s_shard), donate_argnums=(0, 1))
  for x, y in zip(xs, ys):
    params, opt_state = step(params, opt_state, x, y)
  assert_sharded(opt_state, want, mesh)
  ref_params, ref_state = linen_reference(name)
  assert_parity(params, ref_params)
  assert_parity(opt_state, ref_state)


# ------------------------------------------------------------------------ NNX


def nnx_stats(model, x):
  if isinstance(model, NScan):
    return model.forward_with_stats(x)
  return aa_nnx.apply(model, x)


@functools.partial(nnx.jit, static_argnames="constrain")
def nnx_step(model, optimizer, x, y, constrain=False):
  def loss_fn(model):
    logits, stats = nnx_stats(model, x)
    return ce(logits, y), stats
  grads, stats = nnx.grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads, activation_stats=stats)
  if constrain:  # keep params and state where their metadata puts them
    state = nnx.state((model, optimizer))
    nnx.update((model, optimizer),
               jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))


def nnx_tx(cls, make_tx, x):
  # Statistics shapes (grouped convs) from an abstract model: no FLOPs.
  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: cls(nnx.Rngs(0)))
  if cls is NScan:
    return make_tx(None)
  return make_tx(aa_nnx.stats_shapes(abstract, x))


@functools.lru_cache(maxsize=None)
def nnx_reference(name):
  cls, xs, ys, make_tx, _ = nnx_case(name)
  tx = nnx_tx(cls, make_tx, xs[0])
  with nnx.use_eager_sharding(False):
    model = cls(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  for x, y in zip(xs, ys):
    nnx_step(model, optimizer, x, y)
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(nnx.state(optimizer))


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "scan"])
def test_nnx_optimizer_state_sharded_by_its_own_metadata(name, mesh_name):
  cls, xs, ys, make_tx, nu_table = nnx_case(name)
  mesh = make_mesh(mesh_name)
  tx = nnx_tx(cls, make_tx, xs[0])

  # The flow of Flax's NNX sharding guide.
  @nnx.jit
  def create():
    model = cls(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    state = nnx.state((model, optimizer))
    nnx.update((model, optimizer),
               jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
    return model, optimizer

  with jax.set_mesh(mesh):
    model, optimizer = create()
    params = nnx.state(model, nnx.Param)
    shapes = {n: tuple(a.shape) for n, a in by_name(params).items()}
    param_specs = {n: s for n, s in by_name(nnx.get_partition_spec(params)).items()}
    opt_state = nnx.state(optimizer)
    want = expected_specs(opt_state, shapes, param_specs, nu_table)
    # The metadata's specs (what users hand to out_shardings), and the arrays.
    assert_sharded(opt_state, want, mesh, got=nnx.get_partition_spec(opt_state))
    assert_sharded(opt_state, want, mesh)
    # adaact_optax.sharding agrees with the metadata.
    helper = aa_sharding.state_partition_specs(tx, nnx.get_partition_spec(params), params)
    assert_sharded(nnx.as_pure(opt_state.opt_state), helper, mesh)
    if STEP_MESH["nnx", name] != mesh_name:
      return

    data = NamedSharding(mesh, P("data"))
    for x, y in zip(xs, ys):
      nnx_step(model, optimizer, jax.device_put(x, data), jax.device_put(y, data),
               constrain=True)
    assert_sharded(nnx.state(optimizer), want, mesh)
  ref_params, ref_state = nnx_reference(name)
  assert_parity(nnx.to_pure_dict(nnx.state(model, nnx.Param)), ref_params)
  assert_parity(nnx.to_pure_dict(nnx.state(optimizer)), ref_state)


# ------------------------------------------------- tree_map_params, helpers


def test_optax_tree_map_params_with_state_leaf_spec_gives_valid_shardings():
  mesh = make_mesh("4x2")
  params = {"dense": {"kernel": jax.ShapeDtypeStruct((8, 16), jnp.float32),
                      "bias": jax.ShapeDtypeStruct((16,), jnp.float32)},
            "dg": {"kernel": jax.ShapeDtypeStruct((8, 2, 4), jnp.float32)}}
  specs = {"dense": {"kernel": P("data", "model"), "bias": P("model")},
           "dg": {"kernel": P("data", "model", None)}}
  tx = optax.inject_hyperparams(adaact_optax.adaact)(learning_rate=0.1)
  state = jax.eval_shape(tx.init, params)
  # optax's documented way, with our per-leaf rule in place of `lambda _, s: s`.
  got = optax.tree_map_params(tx, aa_sharding.state_leaf_spec, state, specs, params,
                              transform_non_params=lambda _: P())
  nu = got.inner_state[0].nu
  assert nu == {"dense": {"kernel": P("data", None), "bias": P(None)},
                "dg": {"kernel": P("data", "model", None)}}
  assert got.inner_state[0].mu == specs
  assert got == aa_sharding.state_partition_specs(tx, specs, params)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), got,
                           is_leaf=lambda x: isinstance(x, P))
  concrete = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), params)
  out = jax.jit(tx.init, out_shardings=shardings)(concrete)
  assert out.inner_state[0].nu["dense"]["kernel"].addressable_shards[0].data.shape == (2, 1)
  # The plain `lambda _, s: s` gives nu the parameter's spec: 'model' on nu's
  # size-1 output axis, which no mesh with a 'model' axis of size 2 can hold.
  naive = optax.tree_map_params(tx, lambda _, s: s, state, specs,
                                transform_non_params=lambda _: P())
  assert naive.inner_state[0].nu["dense"]["kernel"] == P("data", "model")


def test_optax_tree_map_params_with_stats_shapes():
  # init under tree_map_params sees leafless placeholder params; stats_shapes must not
  # be checked against them (a grouped conv needs stats_shapes).
  params = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 2, 8), jnp.float32)},
            "scale": jax.ShapeDtypeStruct((8,), jnp.float32)}
  stats_shapes = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32)}}
  specs = {"conv": {"kernel": P(None, None, None, "model")}, "scale": P("model")}
  tx = adaact_optax.adaact(0.1, stats_shapes=stats_shapes)
  state = jax.eval_shape(tx.init, params)
  got = optax.tree_map_params(tx, aa_sharding.state_leaf_spec, state, specs, params,
                              transform_non_params=lambda _: P())
  assert got == aa_sharding.state_partition_specs(tx, specs, params)
  nus = [x for x in jax.tree.leaves(got, is_leaf=lambda x: isinstance(x, P))]
  assert P(None, None, None, None) in nus  # the grouped conv's (3, 3, 2, 4) nu: 4 blocks != 8


def test_state_axes_rule():
  rule = aa_sharding.state_axes
  assert rule(("embed", "mlp"), (8, 1), (8, 16)) == ("embed", None)          # Dense
  assert rule(("embed", "mlp"), (8, 16), (8, 16)) == ("embed", "mlp")        # mu
  assert rule((None, None, "embed", "mlp"), (3, 3, 4, 2), (3, 3, 4, 8)) == (None, None, "embed", None)
  assert rule(("layers",), (2, 8, 1), (2, 8, 16)) == ("layers", None, None)  # short names
  assert rule(("vocab", "embed"), (1, 8), (16, 8)) == (None, "embed")        # Embed.attend
  assert rule(("embed", "mlp"), (8,), (8, 16)) == ("embed",)                  # 0.1.0 layout
  assert rule(("embed", "mlp"), (0,), (8, 16)) == (None,)                     # uncaptured
  assert rule(("mlp",), (), (16,)) == ()


def test_masked_branches_are_sharded_like_their_params():
  params = {"a": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32)},
            "b": {"kernel": jax.ShapeDtypeStruct((4, 8), jnp.float32),
                  "bias": jax.ShapeDtypeStruct((8,), jnp.float32)}}
  specs = {"a": {"kernel": P("data", "model")},
           "b": {"kernel": P("model", "data"), "bias": P("data")}}
  # A prefix mask: optax.masked puts one MaskedNode where the whole 'b' was.
  tx = optax.chain(optax.masked(adaact_optax.adaact(0.1), {"a": True, "b": False}),
                   optax.masked(optax.adam(0.1), {"a": False, "b": True}))
  out = aa_sharding.state_partition_specs(tx, specs, params)
  ada, adam = out[0].inner_state[0], out[1].inner_state[0]
  assert ada.mu == {"a": {"kernel": P("data", "model")}, "b": optax.MaskedNode()}
  assert ada.nu == {"a": {"kernel": P("data", None)}, "b": optax.MaskedNode()}
  assert adam.mu == {"a": optax.MaskedNode(), "b": specs["b"]}
  assert adam.nu == {"a": optax.MaskedNode(), "b": specs["b"]}
  state = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(state) == jax.tree.structure(out, is_leaf=lambda x: isinstance(x, P))


def test_multihost_example_logical_rules_mode_matches_the_helper_mode():
  from examples.multihost import input_pipeline, models
  from examples.multihost import train as multihost
  mesh, tx = multihost.make_mesh(2), adaact_optax.adaact(0.1)
  x0 = jnp.zeros((2, input_pipeline.TOKENS, input_pipeline.FEATURES))
  runs = []
  for logical, setup in ((True, multihost.init_from_metadata), (False, multihost.init_with_helper)):
    model = models.Transformer(depth=1, logical=logical)
    runs.append(setup(functools.partial(model.init, jax.random.key(0), x0), tx, mesh)[:2])
  (params, state), (h_params, h_state) = runs
  assert_parity(params, h_params)
  jax.tree.map(lambda a, b: np.testing.assert_equal(
      a.sharding.is_equivalent_to(b.sharding, a.ndim), True), (params, state), (h_params, h_state))
  nu = state[0].nu["blocks"]["query"]["kernel"]           # (layers, dim, heads, 1)
  assert nu.shape == (1, 32, 4, 1) and nu.sharding.spec == P(None, "data", "model", None)
  # train() takes the mode from --sharding (no steps: the gathered initial params).
  flat = multihost.train(multihost.parse_args(["--depth", "1", "--steps", "0", "--sharding",
                                               "logical"]))
  assert_parity(flat, {jax.tree_util.keystr(p): np.asarray(a)
                       for p, a in jax.tree_util.tree_flatten_with_path(h_params)[0]})


def test_nnx_optimizer_built_eagerly_under_a_mesh():
  # Outside jit, NNX shards each Variable by its out_sharding as it is made
  # (nnx.Optimizer makes the state's); nu's names must fit its shape.
  mesh = make_mesh("4x2")
  with jax.set_mesh(mesh):
    model = NMLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, adaact_optax.adaact(0.1), wrt=nnx.Param)
  opt_state = nnx.state(optimizer)
  params = nnx.state(model, nnx.Param)
  want = expected_specs(opt_state, {n: tuple(a.shape) for n, a in by_name(params).items()},
                        by_name(nnx.get_partition_spec(params)), NMLP_NU)
  assert_sharded(opt_state, want, mesh)
  assert_sharded(opt_state, want, mesh, got=nnx.get_partition_spec(opt_state))
