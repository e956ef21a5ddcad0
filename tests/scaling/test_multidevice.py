"""AdaAct across devices: pmap, sharded jit (FSDP + tensor parallel), shard_map, nn.scan.

conftest.py gives this session 8 simulated CPU devices. Every multi-device
run is compared with the same steps on one device and the concatenated batch.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import adaact_optax
from adaact_optax import linen as aa_linen
from adaact_optax import sharding as aa_sharding
from _models import StridedCNN
from conftest import assert_f32_close, linen_train_step

STEPS = 5
BATCH, FEATURES, CLASSES = 16, 8, 4
_init = nn.initializers.lecun_normal()
# Classic GSPMD jit (jax.make_mesh now defaults to Explicit axes).
AUTO = AxisType.Auto


def part(*names):
  return nn.with_partitioning(_init, names)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(16, kernel_init=part("data", "model"))(x))        # FSDP + TP
    return x + nn.Dense(x.shape[-1], kernel_init=part("model", "data"))(h)


class Net(nn.Module):
  """Dense (FSDP), a residual block, a multi-output DenseGeneral (TP), head."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(FEATURES, kernel_init=part("data", None))(x))
    x = Block()(x)
    x = nn.DenseGeneral((2, 4), kernel_init=part(None, "model", None))(x)   # kernel (8, 2, 4)
    x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
    return nn.Dense(CLASSES, kernel_init=part(None, "model"))(x)


class ScanNet(nn.Module):
  """Three blocks stacked with nn.scan; their statistics stack like their params."""

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(FEATURES, kernel_init=part("data", "model"))(x)
    stack = nn.scan(lambda m, c, _: (m(c), None), variable_axes={"params": 0, aa_linen.COLLECTION: 0},
                    split_rngs={"params": True}, length=3,
                    metadata_params={nn.PARTITION_NAME: None})
    x, _ = stack(Block(), x, None)
    return nn.Dense(CLASSES, kernel_init=part("model", None))(x)


class PlainMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(CLASSES)(nn.relu(nn.Dense(16)(x)))


def batches(steps=STEPS, batch=BATCH):
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(steps, batch, FEATURES)).astype(np.float32)
  ys = rng.integers(0, CLASSES, size=(steps, batch)).astype(np.int32)
  return xs, ys


def init_params(model, x):
  return nn.unbox(model.init(jax.random.key(1), x))["params"]


def reference(model, tx, xs, ys):
  """Five steps on one device with the whole batch."""
  params = init_params(model, xs[0])
  opt_state = tx.init(params)
  step = linen_train_step(model, tx)
  for x, y in zip(xs, ys):
    params, opt_state = step(params, opt_state, x, y)
  return params, opt_state


def assert_trees_close(actual, expected, steps=STEPS):
  """A multi-device run against the one-device reference: another program, whose
  forward and backward passes and means reduce over the devices in another order."""
  assert_f32_close(actual, expected, steps=steps, ulps_per_step=64)


def max_rel_diff(a, b):
  diffs = jax.tree.map(lambda u, v: float(np.max(np.abs(np.asarray(u) - np.asarray(v))
                                                 / (np.abs(np.asarray(v)) + 1e-7))), a, b)
  return max(jax.tree.leaves(diffs))


@pytest.mark.parametrize("use_axis_name", [True, False])
def test_pmap_equals_one_device(use_axis_name):
  model, xs, ys = PlainMLP(), *batches()
  ref_params, ref_state = reference(model, adaact_optax.adaact(0.1), xs, ys)

  tx = adaact_optax.adaact(0.1, axis_name="batch" if use_axis_name else None)
  devices = jax.devices()[:4]
  params = init_params(model, xs[0])
  replicate = lambda t: jax.tree.map(lambda a: np.stack([a] * len(devices)), t)
  params, opt_state = replicate(params), replicate(tx.init(params))
  step = jax.pmap(linen_train_step(model, tx, grad_axis="batch", jit=False), axis_name="batch",
                  devices=devices)
  for x, y in zip(xs, ys):
    params, opt_state = step(params, opt_state, x.reshape(4, -1, FEATURES), y.reshape(4, -1))

  first = lambda t: jax.tree.map(lambda a: a[0], t)
  if use_axis_name:
    assert_trees_close(first(params), ref_params)
    assert_trees_close(first(opt_state), ref_state)
    # Replicas agree exactly with each other.
    jax.tree.map(lambda a: np.testing.assert_array_equal(a, np.broadcast_to(a[0], a.shape)),
                 (params, opt_state))
  else:
    # Local statistics: the replicas' second moments differ and so do the params.
    nu = opt_state[0].nu["Dense_0"]["kernel"]
    assert np.abs(nu - nu[0]).max() > 1e-3
    assert max_rel_diff(first(params), ref_params) > 1e-3


def mesh_4x2():
  return jax.make_mesh((4, 2), ("data", "model"), axis_types=(AUTO,) * 2, devices=jax.devices()[:8])


def sharded_run(model, tx, mesh, xs, ys):
  """Sharded jit: batch over 'data', params and state by their partition specs."""
  abstract = jax.eval_shape(model.init, jax.random.key(1), xs[0])
  p_shard = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                         nn.get_partition_spec(abstract)["params"], is_leaf=lambda x: isinstance(x, P))
  params = jax.jit(lambda: init_params(model, xs[0]), out_shardings=p_shard)()
  s_shard = aa_sharding.state_shardings(tx, p_shard, params)
  opt_state = jax.jit(tx.init, out_shardings=s_shard)(params)
  data = NamedSharding(mesh, P("data"))
  step = jax.jit(linen_train_step(model, tx, jit=False),
                 in_shardings=(p_shard, s_shard, data, data),
                 out_shardings=(p_shard, s_shard), donate_argnums=(0, 1))
  for x, y in zip(xs, ys):
    params, opt_state = step(params, opt_state, jax.device_put(x, data), jax.device_put(y, data))
  return params, opt_state, p_shard, s_shard


def assert_sharded_like(tree, shardings):
  def check(path, a, s):
    assert a.sharding.is_equivalent_to(s, a.ndim), (jax.tree_util.keystr(path), a.sharding, s)
  jax.tree_util.tree_map_with_path(check, tree, shardings)


def test_sharded_jit_fsdp_tp_equals_one_device():
  model, xs, ys = Net(), *batches()
  tx = adaact_optax.adaact(0.1)
  ref_params, ref_state = reference(model, tx, xs, ys)
  params, opt_state, p_shard, s_shard = sharded_run(model, tx, mesh_4x2(), xs, ys)

  assert_trees_close(params, ref_params)
  assert_trees_close(opt_state, ref_state)
  assert_sharded_like(params, p_shard)
  assert_sharded_like(opt_state, s_shard)
  # The rule, spelled out: mu like the parameter; nu (keep-rank, size 1 on
  # the output axis) keeps the parameter's names where its size is the same.
  mu, nu = opt_state[0].mu, opt_state[0].nu
  expected = {
      "Dense_0": (P("data", None), P("data", None)),
      "Block_0/Dense_0": (P("data", "model"), P("data", None)),
      "Block_0/Dense_1": (P("model", "data"), P("model", None)),
      "DenseGeneral_0": (P(None, "model", None), P(None, "model", None)),
      "Dense_1": (P(None, "model"), P(None, None)),
  }
  for name, (mu_spec, nu_spec) in expected.items():
    get = lambda t: functools.reduce(lambda d, k: d[k], name.split("/"), t)["kernel"]
    assert get(mu).sharding.spec == mu_spec, name
    assert get(nu).sharding.is_equivalent_to(NamedSharding(mesh_4x2(), nu_spec), get(nu).ndim)
    assert get(nu).shape == get(mu).shape[:-1] + (1,)
  assert opt_state[0].count.sharding.is_fully_replicated
  # Each device holds only its slice of the state: nothing is gathered.
  kernel_nu = opt_state[0].nu["Block_0"]["Dense_0"]["kernel"]
  assert kernel_nu.addressable_shards[0].data.shape == (FEATURES // 4, 1)


@pytest.mark.parametrize("wrapper", ["adaact", "MultiSteps"])
def test_donated_sharded_step_from_an_eager_init(wrapper):
  # The usual large-model loop: params placed by their partition specs, the state from a
  # plain (eager) tx.init, then a step that donates both. Donation needs every state leaf
  # in its own buffer (test_donation.py checks the buffers on one device).
  model, xs, ys = Net(), *batches()
  tx = adaact_optax.adaact(0.1)
  if wrapper == "MultiSteps":
    tx = adaact_optax.MultiSteps(tx, every_k_schedule=1).gradient_transformation()
  ref_params, ref_state = reference(model, tx, xs, ys)
  mesh = mesh_4x2()
  abstract = jax.eval_shape(model.init, jax.random.key(1), xs[0])
  p_shard = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                         nn.get_partition_spec(abstract)["params"], is_leaf=lambda x: isinstance(x, P))
  params = jax.jit(lambda: init_params(model, xs[0]), out_shardings=p_shard)()
  opt_state = tx.init(params)
  step = jax.jit(linen_train_step(model, tx, jit=False), donate_argnums=(0, 1))
  data = NamedSharding(mesh, P("data"))
  for x, y in zip(xs, ys):
    old = params
    params, opt_state = step(params, opt_state, jax.device_put(x, data), jax.device_put(y, data))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))
  assert all(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(params))
  assert_trees_close(params, ref_params)
  assert_trees_close(opt_state, ref_state)


def test_scan_stacked_partitioned_layers_under_mesh():
  model, xs, ys = ScanNet(), *batches()
  tx = adaact_optax.adaact(0.1)
  ref_params, ref_state = reference(model, tx, xs, ys)
  params, opt_state, p_shard, s_shard = sharded_run(model, tx, mesh_4x2(), xs, ys)
  assert_trees_close(params, ref_params)
  assert_trees_close(opt_state, ref_state)
  assert_sharded_like(opt_state, s_shard)
  nu_leaves = jax.tree_util.tree_flatten_with_path(opt_state[0].nu)[0]
  scanned = {jax.tree_util.keystr(p): a for p, a in nu_leaves if a.ndim == 2 and a.shape[0] == 3}
  assert len(scanned) == 2, list(scanned)          # both scanned kernels: (layers, inputs)
  for name, a in scanned.items():
    assert a.sharding.spec[0] is None, name       # the layer axis stays whole


def test_shard_map_step_equals_one_device():
  model, xs, ys = PlainMLP(), *batches()
  ref_params, ref_state = reference(model, adaact_optax.adaact(0.1), xs, ys)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AUTO,), devices=jax.devices()[:4])
  tx = adaact_optax.adaact(0.1, axis_name="data")
  # Replicated params and state in, local batch per device; grads and (inside
  # tx.update) statistics are averaged over 'data'.
  step = jax.jit(jax.shard_map(linen_train_step(model, tx, grad_axis="data", jit=False), mesh=mesh,
                               in_specs=(P(), P(), P("data"), P("data")),
                               out_specs=(P(), P()), check_vma=False))
  params = init_params(model, xs[0])
  opt_state = tx.init(params)
  for x, y in zip(xs, ys):
    params, opt_state = step(params, opt_state, x, y)
  assert_trees_close(params, ref_params)
  assert_trees_close(opt_state, ref_state)


def test_uneven_batch_shards_under_jit_give_the_global_mean():
  # 6 examples over 4 data shards: GSPMD pads the shards and reduces over the
  # logical batch, so the statistics are the exact global mean.
  model, xs, ys = PlainMLP(), *batches(batch=6)
  tx = adaact_optax.adaact(0.1)
  ref_params, ref_state = reference(model, tx, xs, ys)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AUTO,), devices=jax.devices()[:4])
  spread = lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P("data")))
  inner = linen_train_step(model, tx, jit=False)
  step = jax.jit(lambda p, s, x, y: inner(p, s, spread(x), spread(y)),
                 in_shardings=NamedSharding(mesh, P()), out_shardings=NamedSharding(mesh, P()))
  params = init_params(model, xs[0])
  opt_state = tx.init(params)
  for x, y in zip(xs, ys):
    params, opt_state = step(params, opt_state, x, y)
  assert_trees_close(params, ref_params)
  assert_trees_close(opt_state, ref_state)


def test_unknown_axis_name_error_names_the_axis():
  model, xs, ys = PlainMLP(), *batches()
  tx = adaact_optax.adaact(0.1, axis_name="dta")
  params = init_params(model, xs[0])
  step = jax.pmap(linen_train_step(model, tx, jit=False), axis_name="batch",
                  devices=jax.devices()[:2])
  rep = lambda t: jax.tree.map(lambda a: np.stack([a] * 2), t)
  with pytest.raises(NameError, match="dta"):
    step(rep(params), rep(tx.init(params)), xs[0].reshape(2, -1, FEATURES), ys[0].reshape(2, -1))


def test_spec_with_unknown_mesh_axis_names_path_and_axis():
  model, xs, _ = Net(), *batches()
  params = init_params(model, xs[0])
  specs = jax.tree.map(lambda _: P(), params)
  specs["Dense_0"]["kernel"] = P("batch", None)
  with pytest.raises(ValueError, match=r"Dense_0/kernel.*'batch'"):
    aa_sharding.state_shardings(adaact_optax.adaact(0.1), specs, params, mesh=mesh_4x2())


def test_state_partition_specs_for_chains_hyperparams_and_grouped_convs():
  params = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 2, 8), jnp.float32),
                     "bias": jax.ShapeDtypeStruct((8,), jnp.float32)},
            "dg": {"kernel": jax.ShapeDtypeStruct((6, 2, 4), jnp.float32)},
            "norm": {"scale": jax.ShapeDtypeStruct((6,), jnp.float32)}}
  specs = {"conv": {"kernel": P(None, None, "data", "model"), "bias": P("model")},
           "dg": {"kernel": P("data")},                    # short spec: rest replicated
           "norm": {"scale": None}}
  stats_shapes = {"conv": {"kernel": (3, 3, 2, 4)}}       # 4 groups of 2 input channels
  tx = optax.inject_hyperparams(adaact_optax.adaact)(learning_rate=0.1, stats_shapes=stats_shapes)
  out = aa_sharding.state_partition_specs(tx, specs, params)
  inner = out.inner_state
  assert out.hyperparams["learning_rate"] == P() and out.count == P()
  scale = inner[0]
  assert scale.count == P()
  assert scale.mu == {"conv": {"kernel": P(None, None, "data", "model"), "bias": P("model")},
                      "dg": {"kernel": P("data", None, None)}, "norm": {"scale": P(None)}}
  assert scale.nu == {"conv": {"kernel": P(None, None, "data", None), "bias": P(None)},
                      "dg": {"kernel": P("data", None, None)}, "norm": {"scale": P(None)}}
  # The structures agree with the real state, so the specs can be used as shardings.
  state = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(state) == jax.tree.structure(out, is_leaf=lambda x: isinstance(x, P))


def test_explicit_mesh_data_parallel_and_sharded_state():
  # jax.make_mesh defaults to Explicit axes: data-parallel training needs
  # nothing else, and tx.update takes FSDP/TP-sharded state with replicated
  # statistics. (Linen layers whose contraction is sharded need Auto axes.)
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2,
                       devices=jax.devices()[:8])
  model, xs, ys = PlainMLP(), *batches()
  tx = adaact_optax.adaact(0.1)
  ref_params, ref_state = reference(model, tx, xs, ys)
  params, opt_state, _, _ = sharded_run(model, tx, mesh, xs, ys)
  assert_trees_close(params, ref_params)
  assert_trees_close(opt_state, ref_state)

  params = {"d": {"kernel": jnp.linspace(-1, 1, 32).reshape(8, 4), "bias": jnp.ones((4,))}}
  stats = {"d": {"kernel": jnp.arange(1.0, 9.0), "bias": jnp.ones(())}}
  p_shard = {"d": {"kernel": NamedSharding(mesh, P("data", "model")),
                   "bias": NamedSharding(mesh, P("model"))}}
  s_shard = aa_sharding.state_shardings(tx, p_shard, params)
  update = lambda g, s, a: tx.update(g, s, g, activation_stats=a)
  expected = update(params, tx.init(params), stats)
  sharded = jax.device_put(params, p_shard)
  got = jax.jit(update, out_shardings=(p_shard, s_shard))(
      sharded, jax.jit(tx.init, out_shardings=s_shard)(sharded), stats)
  assert_trees_close(got, expected, steps=1)
  assert jax.typeof(got[1][0].nu["d"]["kernel"]).sharding.spec == P("data", None)


def test_statistics_are_one_collective_under_shard_map():
  # jax.lax.pmean on the statistics tree lowers to one all-reduce per leaf,
  # which XLA's all-reduce combiner merges into one: the compiled module has a
  # single all-reduce for all layers (benchmarks/pmean_forms.py: as few as
  # raveling the tree first, and faster without the concatenate and slices).
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AUTO,), devices=jax.devices()[:4])
  model, xs, _ = Net(), *batches()
  params = init_params(model, xs[0])
  stats = aa_linen.apply(model, {"params": params}, xs[0])[1][aa_linen.COLLECTION]
  assert len(jax.tree.leaves(stats)) > 5
  for axis_name, expected in (("data", 1), (None, 0)):
    tx = adaact_optax.adaact(0.1, axis_name=axis_name)
    update = jax.shard_map(lambda s, a: tx.update(params, s, params, activation_stats=a)[1],
                           mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False)
    hlo = jax.jit(update).lower(tx.init(params), stats).compile().as_text()
    ops = [line for line in hlo.splitlines()
           if " all-reduce(" in line or " all-reduce-start(" in line]
    assert len(ops) == expected, (axis_name, ops)


def test_unknown_mesh_axis_error_names_the_axis():
  with pytest.raises(ValueError, match="bogus"):
    NamedSharding(mesh_4x2(), P("bogus"))


def test_collective_bytes_benchmark_attributes_statistics():
  # benchmarks/collective_bytes.py on small models: the statistics add exactly
  # their own bytes to the all-reduces (conv statistics are reduced after
  # their window sums, never as (H, W, C) sums), and gradients = params.
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "collective_bytes.py"
  spec = importlib.util.spec_from_file_location("collective_bytes", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AUTO,), devices=jax.devices()[:4])
  for name, kwargs in (("mlp", {"hidden": (32,)}), ("cnn", {"features": (8, 16), "hidden": 16})):
    r = bench.report(name, 16, mesh, shape=(8, 8, 3), **kwargs)
    assert r["gradient_allreduce_bytes"] == r["param_bytes"], r
    # Biases' statistics are the constant 1 (a few bytes XLA need not reduce); the
    # rest is reduced once, never as (H, W, C) sums.
    assert 0.9 * r["stats_tree_bytes"] <= r["stats_allreduce_bytes"] <= 1.5 * r["stats_tree_bytes"], r


def test_conv_statistics_under_data_parallel_jit_equal_one_device():
  # Conv statistics sum the batch after their window sums; sharding the batch
  # must not change them (strided and padded convs, BatchNorm-free CNN).
  model = StridedCNN(num_classes=CLASSES, features=(4, 8), hidden=8)
  rng = np.random.default_rng(3)
  xs = rng.normal(size=(STEPS, BATCH, 8, 8, 2)).astype(np.float32)
  ys = rng.integers(0, CLASSES, size=(STEPS, BATCH)).astype(np.int32)
  tx = adaact_optax.adaact(0.1)
  ref_params, ref_state = reference(model, tx, xs, ys)
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AUTO,), devices=jax.devices()[:4])
  data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  step = jax.jit(linen_train_step(model, tx, jit=False), in_shardings=(rep, rep, data, data),
                 out_shardings=rep)
  params = init_params(model, xs[0])
  opt_state = tx.init(params)
  for x, y in zip(xs, ys):
    params, opt_state = step(params, opt_state, x, y)
  assert_trees_close(params, ref_params)
  assert_trees_close(opt_state, ref_state)
