"""value_grad_and_stats's two routes agree.

The default route differentiates ``fun`` with ``jax.value_and_grad`` as JAX
does and reads the statistics off the forward part of that jaxpr without
re-binding it; a parameter inside a higher-order primitive (``scan``,
``checkpoint``, ``cond``, a non-inlined ``jit``) falls back to the engine that
evaluates the jaxpr equation by equation under ``value_and_grad``
(``capture.capture_call``). Both must give the same values, gradients and
statistics; the layer-by-layer brute-force checks live in
test_capture_layers.py and test_capture_models.py.
"""

import warnings

import jax
import jax.numpy as jnp
import pytest

import adaact_optax
from adaact_optax._src.capture import api as capture_api
from conftest import assert_f32_close


def _evaluating_engine(fun, params, *args, has_aux=False, embeddings=False, row_mask=None):
  """The fallback route, run explicitly: value_and_grad over capture_call."""
  value, grads, stats, _, _ = capture_api.evaluate_differentiated(
      fun, has_aux, params, args, {}, embeddings, row_mask)
  return value, grads, jax.tree.structure(params).unflatten(stats)


def _keys(n):
  return jax.random.split(jax.random.key(0), n)


def _mlp():
  k = _keys(5)
  p = {"w": jax.random.normal(k[0], (5, 6)), "b": jnp.zeros(6) + 0.1,
       "v": jax.random.normal(k[1], (6, 3))}

  def loss(p, x):
    h = jnp.tanh(x @ p["w"] + p["b"])
    return jnp.mean((h @ p["v"]) ** 2), {"h_norm": jnp.sum(h ** 2)}
  return loss, p, (jax.random.normal(k[2], (7, 5)),), dict(has_aux=True)


def _fused_attention():
  d, heads, k = 8, 2, _keys(4)
  p = {"qkv": jax.random.normal(k[0], (d, 3 * d)) / 3, "qkv_b": jnp.full(3 * d, 0.1),
       "out": jax.random.normal(k[1], (d, d)) / 3}

  def loss(p, x):
    b, t, _ = x.shape
    q, kk, v = jnp.split(x @ p["qkv"] + p["qkv_b"], 3, axis=-1)
    split = lambda z: z.reshape(b, t, heads, d // heads)
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", split(q), split(kk)), axis=-1)
    z = jnp.einsum("bhqk,bkhd->bqhd", att, split(v)).reshape(b, t, d)
    return jnp.mean((z @ p["out"]) ** 2)
  return loss, p, (jax.random.normal(k[2], (2, 5, d)),), {}


def _split_before_matmul():  # the fused kernel is split, each part meets another input
  d, k = 6, _keys(3)
  p = {"qkv": jax.random.normal(k[0], (d, 3 * d))}

  def loss(p, x):
    wq, wk, wv = jnp.split(p["qkv"], 3, axis=1)
    return jnp.sum((x @ wq) * (x @ wk)) + jnp.sum(jnp.tanh(x) @ wv)
  return loss, p, (jax.random.normal(k[1], (4, d)),), {}


def _conv_and_shared_dense():
  k = _keys(5)
  p = {"conv": jax.random.normal(k[0], (3, 3, 2, 4)) / 3, "dense": jax.random.normal(k[1], (4, 4))}

  def loss(p, x):
    y = jax.lax.conv_general_dilated(x, p["conv"], (2, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jnp.tanh(y @ p["dense"])  # the same dense weight twice: pooled by rows
    return jnp.mean((y.mean((1, 2)) @ p["dense"]) ** 2)
  return loss, p, (jax.random.normal(k[2], (2, 6, 5, 2)),), {}


def _tied_embedding():
  k = _keys(3)
  p = {"table": jax.random.normal(k[0], (11, 4)), "other": jax.random.normal(k[1], (9, 4))}

  def loss(p, ids):
    h = jnp.tanh(p["table"][ids] + p["other"][ids % 9])
    return jnp.mean(jax.nn.log_softmax(h @ p["table"].T))  # table: lookup and attend
  return loss, p, (jnp.array([[1, 2, 2, 5], [0, 7, 10, 3]]),), dict(embeddings=True)


def _masked_rows():
  k = _keys(3)
  p = {"w": jax.random.normal(k[0], (3, 4)), "v": jax.random.normal(k[1], (4, 2))}

  def loss(p, x):
    return jnp.mean(jnp.tanh(jnp.swapaxes(x, 0, 1) @ p["w"]) @ p["v"])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]], jnp.float32)
  return loss, p, (jax.random.normal(k[2], (2, 3, 3)),), dict(row_mask=mask)


def _checkpointed_layer():  # the forward of a checkpoint is staged inline when differentiated
  k = _keys(2)
  p = {"w": jax.random.normal(k[0], (4, 4)), "v": jax.random.normal(k[1], (4, 2))}

  def loss(p, x):
    h = jax.checkpoint(lambda x: jnp.tanh(x @ p["w"]))(x)
    return jnp.mean((h @ p["v"]) ** 2)
  return loss, p, (jax.random.normal(k[1], (5, 4)),), {}


def _custom_vjp_layer():  # its fwd is staged inline when differentiated
  k = _keys(3)
  p = {"w": jax.random.normal(k[0], (4, 3))}

  @jax.custom_vjp
  def linear(x, w):
    return x @ w

  def fwd(x, w):
    return x @ w, (x, w)

  def bwd(res, g):
    x, w = res
    return g @ w.T, x.T @ g
  linear.defvjp(fwd, bwd)

  def loss(p, x):
    return jnp.mean(jnp.tanh(linear(x, p["w"])) ** 2)
  return loss, p, (jax.random.normal(k[1], (5, 4)),), {}


def _cell_sum_then_bias():  # biases on a sum of contractions and on a split part of one
  k = _keys(5)
  p = {"w_x": jax.random.normal(k[0], (3, 8)), "w_h": jax.random.normal(k[1], (4, 8)) / 2,
       "b": jnp.full(8, 0.1), "b_h": jnp.full(8, 0.05), "b_n": jnp.full(4, -0.2)}

  def loss(p, xs):
    h = jnp.zeros((xs.shape[1], 4))
    for x_t in xs:  # unrolled: no scan, the differentiated route
      # Two biases, as in torch's LSTM (b_ih, b_hh): the second is added to a biased sum.
      z, n = jnp.split(x_t @ p["w_x"] + h @ p["w_h"] + p["b"] + p["b_h"], 2, axis=-1)
      h_z, h_n = jnp.split(h @ p["w_h"], 2, axis=-1)
      h = jax.nn.sigmoid(z) * jnp.tanh(n + (h_n + p["b_n"]) * h_z)
    return jnp.mean(h ** 2)
  return loss, p, (jax.random.normal(k[2], (3, 2, 3)),), {}


MODELS = {"mlp_with_aux": _mlp, "cell_sum_then_bias": _cell_sum_then_bias, "checkpointed_layer": _checkpointed_layer,
          "custom_vjp_layer": _custom_vjp_layer, "fused_attention": _fused_attention,
          "split_before_matmul": _split_before_matmul, "conv_and_shared_dense": _conv_and_shared_dense,
          "tied_embedding": _tied_embedding, "masked_rows": _masked_rows}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_differentiated_route_is_taken_and_matches_the_evaluating_engine(name):
  loss, p, args, opts = MODELS[name]()
  has_aux, embeddings = opts.get("has_aux", False), opts.get("embeddings", False)
  row_mask = opts.get("row_mask")
  floor = capture_api.embedding_floor(embeddings)
  assert capture_api.capture_differentiated(
      loss, has_aux, p, args, {}, floor, row_mask) is not None
  g = adaact_optax.value_grad_and_stats(loss, has_aux=has_aux, embeddings=embeddings)
  value, grads, stats = jax.jit(lambda p, *a: g(p, *a, row_mask=row_mask))(p, *args)
  ref_value, ref_grads, ref_stats = _evaluating_engine(
      loss, p, *args, has_aux=has_aux, embeddings=embeddings, row_mask=row_mask)
  assert_f32_close((value, grads), (ref_value, ref_grads))
  assert jax.tree.structure(stats) == jax.tree.structure(ref_stats)
  if name == "cell_sum_then_bias":  # both routes give the biases statistics
    for bias in ("b", "b_h", "b_n"):
      assert ref_stats[bias].shape == (1,), (bias, ref_stats[bias])
  for key in p:
    if ref_stats[key] is None:
      assert stats[key] is None, key
    else:
      assert stats[key].shape == ref_stats[key].shape, key
      assert_f32_close(stats[key], ref_stats[key], err_msg=key)


def test_differentiated_route_runs_the_forward_once():
  loss, p, args, _ = _fused_attention()

  def count(jaxpr, name):
    return sum(e.primitive.name == name for e in jaxpr.eqns)
  engine = jax.make_jaxpr(adaact_optax.value_grad_and_stats(loss))(p, *args)
  plain = jax.make_jaxpr(jax.value_and_grad(loss))(p, *args)
  # Not one extra contraction: the statistics reuse the forward's activations.
  assert count(engine.jaxpr, "dot_general") == count(plain.jaxpr, "dot_general")
  # The statistics add a few equations per weight, not another forward pass.
  assert len(engine.jaxpr.eqns) < len(plain.jaxpr.eqns) + 12 * len(p)
  # One squared input per distinct activation: x feeds two slices of the fused
  # kernel, tanh(x) the third.
  loss, p, args, _ = _split_before_matmul()
  engine = jax.make_jaxpr(adaact_optax.value_grad_and_stats(loss))(p, *args)
  plain = jax.make_jaxpr(jax.value_and_grad(loss))(p, *args)
  assert count(engine.jaxpr, "square") - count(plain.jaxpr, "square") == 2


def test_evaluating_route_squares_a_shared_input_once():
  # Both routes share the rules and compute a statistic once per (input, key):
  # x feeds two slices of the fused kernel, tanh(x) the third.
  loss, p, args, _ = _split_before_matmul()

  def squares(fn):
    return sum(e.primitive.name == "square" for e in jax.make_jaxpr(fn)(p, *args).jaxpr.eqns)
  evaluating = squares(lambda p, *a: capture_api.evaluate_differentiated(
      loss, False, p, a, {}, False, None)[:3])
  assert evaluating - squares(jax.value_and_grad(loss)) == 2


def _scan_over_stacked_weights():
  k = _keys(2)
  p = {"w": jax.random.normal(k[0], (3, 4, 4)) / 2}

  def loss(p, x):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])
    return jnp.mean(h ** 2)
  return loss, p, (jax.random.normal(k[1], (5, 4)),)


def _jitted_layer():
  k = _keys(2)
  p = {"w": jax.random.normal(k[0], (4, 4))}
  layer = jax.jit(lambda w, x: jnp.tanh(x @ w))

  def loss(p, x):
    return jnp.mean(layer(p["w"], x) ** 2)
  return loss, p, (jax.random.normal(k[1], (5, 4)),)


def _cond_on_data():
  k = _keys(2)
  p = {"w": jax.random.normal(k[0], (4, 4))}

  def loss(p, x):
    h = jax.lax.cond(x.sum() > 0, lambda: jnp.tanh(x @ p["w"]), lambda: x @ p["w"])
    return jnp.mean(h ** 2)
  return loss, p, (jax.random.normal(k[1], (5, 4)),)


@pytest.mark.parametrize("make", [_scan_over_stacked_weights, _jitted_layer, _cond_on_data])
def test_parameters_inside_higher_order_primitives_use_the_evaluating_engine(make):
  loss, p, args = make()
  assert capture_api.capture_differentiated(
      loss, False, p, args, {}, None, None) is None
  value, grads, stats = adaact_optax.value_grad_and_stats(loss)(p, *args)
  ref_value, ref_grads, ref_stats = _evaluating_engine(loss, p, *args)
  assert_f32_close(value, ref_value)
  assert_f32_close(grads["w"], ref_grads["w"])
  assert_f32_close(stats["w"], ref_stats["w"])
  assert stats["w"].shape[-1] == 1


def test_uncaptured_weight_warns_once_on_the_differentiated_route():
  k = _keys(2)
  p = {"w": jax.random.normal(k[0], (3, 3)), "v": jnp.ones((3, 2))}

  def loss(p, x):
    return jnp.mean((x @ (p["w"] * jnp.tril(jnp.ones((3, 3))))) @ p["v"])
  x = jax.random.normal(k[1], (4, 3))
  assert capture_api.capture_differentiated(
      loss, False, p, (x,), {}, None, None) is not None
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _, _, stats = jax.jit(adaact_optax.value_grad_and_stats(loss))(p, x)
  messages = [str(w.message) for w in caught
              if issubclass(w.category, adaact_optax.UncapturedWeightWarning)]
  assert len(messages) == 1 and "'w'" in messages[0] and "`mul`" in messages[0], messages
  assert stats["w"].shape == (0,) and stats["v"].shape == (3, 1)
