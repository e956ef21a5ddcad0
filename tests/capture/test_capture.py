"""The capture engine's contract beyond single layers (brute-force layer checks live in
test_capture_layers.py / test_capture_models.py)."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaact_optax
from adaact_optax import linen as aa_linen
from adaact_optax import nnx as aa_nnx
from conftest import assert_f32_close


def _mean_sq(a, axis):
  a = np.asarray(a, np.float64)
  return np.mean(a.reshape(-1, a.shape[axis]) ** 2, 0)


def test_gradients_are_those_of_jax_value_and_grad():
  def loss(p, x):
    h = jax.nn.gelu(x @ p["w"] + p["b"])
    h = jax.checkpoint(lambda h: jnp.tanh(h @ p["v"]))(h)
    return jnp.mean(h ** 2) + 1e-3 * jnp.sum(p["w"] ** 2)

  k = jax.random.split(jax.random.key(0), 4)
  p = {"w": jax.random.normal(k[0], (5, 6)), "b": jnp.zeros(6), "v": jax.random.normal(k[1], (6, 3))}
  x = jax.random.normal(k[2], (7, 5))
  value, grads, stats = jax.jit(adaact_optax.value_grad_and_stats(loss))(p, x)
  ref_value, ref_grads = jax.value_and_grad(loss)(p, x)
  # A jitted program against op-by-op evaluation: a forward and backward pass through
  # gelu and tanh round differently (as fused, as vectorised); the model-step bound.
  assert_f32_close(value, ref_value, ulps_per_step=64)
  for name in p:
    assert_f32_close(grads[name], ref_grads[name], ulps_per_step=64)
  assert_f32_close(stats["w"][:, 0], _mean_sq(x, -1))


def test_linen_scan_without_the_collection_in_variable_axes():
  # Issue 12.1: the usual way to stack blocks; the statistics must reach every layer.
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return jnp.tanh(nn.Dense(4)(x)), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
      return scan()(x, None)[0]

  x = jax.random.normal(jax.random.key(1), (2, 5, 4))
  model = Stack()
  variables = model.init(jax.random.key(2), x)
  _, mutated = aa_linen.apply(model, variables, x)
  stats = mutated[aa_linen.COLLECTION]["ScanBlock_0"]["Dense_0"]
  kernel = np.asarray(variables["params"]["ScanBlock_0"]["Dense_0"]["kernel"])
  bias = np.asarray(variables["params"]["ScanBlock_0"]["Dense_0"]["bias"])
  assert stats["kernel"].shape == (3, 4, 1) and stats["bias"].shape == (3, 1)
  h = np.asarray(x, np.float64)
  for layer in range(3):
    assert_f32_close(stats["kernel"][layer, :, 0], _mean_sq(h, -1))
    h = np.tanh(h @ kernel[layer] + bias[layer])


def test_nested_nnx_apply_reaches_the_outer_statistics():
  class Inner(nnx.Module):
    def __init__(self, rngs):
      self.layer = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, x):
      return self.layer(x)

  class Outer(nnx.Module):
    def __init__(self, rngs):
      self.inner, self.head = Inner(rngs), nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
      h, _ = aa_nnx.apply(self.inner, x)
      return self.head(h)

  model = Outer(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (4, 3))
  _, stats = aa_nnx.apply(model, x)
  assert_f32_close(stats["inner"]["layer"]["kernel"][:, 0], _mean_sq(x, -1))
  h = model.inner(x)
  assert_f32_close(stats["head"]["kernel"][:, 0], _mean_sq(h, -1))


def test_uncaptured_weight_is_reported_and_unmatched_error_refuses_it():
  def loss(p, x):
    return jnp.sum(x @ (p["w"] * jnp.tril(jnp.ones((3, 3))))) + jnp.sum(x @ p["v"])

  p = {"w": jnp.ones((3, 3)), "v": jnp.ones((3, 2))}
  x = jnp.ones((4, 3))
  with pytest.warns(adaact_optax.UncapturedWeightWarning, match=r"'w' \(shape \(3, 3\)\).*`mul`"):
    _, grads, stats = adaact_optax.value_grad_and_stats(loss)(p, x)
  assert stats["w"].shape == (0,) and stats["v"].shape == (3, 1)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", adaact_optax.UncapturedWeightWarning)
    shapes = adaact_optax.stats_shapes(loss, p, x)
    tx = adaact_optax.adaact(0.1, unmatched="error", stats_shapes=shapes)
  with pytest.raises(ValueError, match="'w'|w"):
    tx.update(grads, tx.init(p), p, activation_stats=stats)
  # Accepted on purpose, it trains with the authors' rule for unmatched weights.
  tx = adaact_optax.adaact(0.1, stats_shapes=shapes)
  updates, _ = tx.update(grads, tx.init(p), p, activation_stats=stats)
  assert_f32_close(updates["w"], -0.1 * (grads["w"] + 2e-3 * p["w"]))


def test_attend_statistics_win_over_lookup_frequencies_for_a_tied_table():
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
      embed = nn.Embed(11, 4)
      return embed.attend(jnp.tanh(embed(ids)))

  ids = jnp.array([[1, 2, 2, 5]])
  model = Tied()
  variables = model.init(jax.random.key(0), ids)
  _, mutated = aa_linen.apply(model, variables, ids, embeddings=True)
  stat = mutated[aa_linen.COLLECTION]["Embed_0"]["embedding"]
  table = np.asarray(variables["params"]["Embed_0"]["embedding"])
  assert stat.shape == (1, 4)
  assert_f32_close(stat[0], _mean_sq(np.tanh(table[np.asarray(ids)]), -1))


def test_fused_weight_is_tracked_symbolically_without_index_arrays():
  d = 4096  # a 4096 x 12288 fused QKV weight, never allocated: abstract parameters

  def loss(p, x):
    q, k, v = jnp.split(p["qkv"], 3, axis=1)
    return jnp.sum((x @ q) * (x @ k)) + jnp.sum(jnp.tanh(x) @ v)

  p = {"qkv": jax.ShapeDtypeStruct((d, 3 * d), jnp.float32)}
  x = jax.ShapeDtypeStruct((2, d), jnp.float32)
  shapes = adaact_optax.stats_shapes(loss, p, x)
  assert shapes["qkv"].shape == (d, 3)  # q and k read x, v reads tanh(x): one block each
  jaxpr = jax.make_jaxpr(adaact_optax.value_grad_and_stats(loss))(p, x)
  big_consts = [c for c in jaxpr.consts if np.size(c) >= d]
  assert not big_consts, [np.shape(c) for c in big_consts]
  for eqn in jaxpr.jaxpr.eqns:
    for v in eqn.outvars:
      if jnp.issubdtype(v.aval.dtype, jnp.integer):
        assert np.prod(v.aval.shape) < d * 3 * d, eqn


def test_coverage_report_lists_matched_uncaptured_and_other():
  def loss(p, x):
    return jnp.sum(jax.nn.standardize(x @ p["w"]) * p["scale"] @ (p["v"] * 2.0))

  p = {"w": jnp.ones((3, 4)), "v": jnp.ones((4, 2)), "scale": jnp.ones(4)}
  report = adaact_optax.coverage(loss, p, jnp.ones((5, 3)))
  assert report.matched == {"w": (3, 1)}
  assert set(report.unmatched) == {"v"} and "mul" in report.unmatched["v"]
  assert report.other == ("scale",)
  assert "MISS  v" in str(report)


def test_optax_chain_trains_a_plain_jax_model():
  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(jnp.tanh(x @ p["w1"]) @ p["w2"], y).mean()

  k = jax.random.split(jax.random.key(5), 3)
  p = {"w1": jax.random.normal(k[0], (6, 8)) * 0.3, "w2": jax.random.normal(k[1], (8, 3)) * 0.3}
  x, y = jax.random.normal(k[2], (16, 6)), jnp.arange(16) % 3
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   adaact_optax.adaact(0.1, stats_shapes=adaact_optax.stats_shapes(loss, p, x, y)))
  state = tx.init(p)
  grad_fn = jax.jit(adaact_optax.value_grad_and_stats(loss))
  first = None
  for _ in range(30):
    value, grads, stats = grad_fn(p, x, y)
    first = value if first is None else first
    updates, state = tx.update(grads, state, p, activation_stats=stats)
    p = optax.apply_updates(p, updates)
  assert value < 0.85 * first


def test_adapter_stats_shapes_take_abstract_variables_and_inputs():
  model = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
  x = jax.ShapeDtypeStruct((2, 4), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  shapes = aa_linen.stats_shapes(model, variables, x)
  assert jax.tree.map(lambda a: a.shape, shapes) == {
      "layers_0": {"bias": (1,), "kernel": (4, 1)}, "layers_2": {"bias": (1,), "kernel": (3, 1)}}
  net = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  assert aa_nnx.stats_shapes(net, x)["kernel"].shape == (4, 1)
