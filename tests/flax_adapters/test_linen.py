"""Linen capture on unmodified models: coverage, repeated use, lifted transforms.

Statistics are in the keep-rank layout: a Dense kernel (in, out) gets (in, 1),
a conv kernel (kh, kw, C, O) gets (kh, kw, C, 1), a bias (1,) of ones.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaact_optax
from adaact_optax import linen as aa_linen
from conftest import assert_f32_close

COLLECTION = aa_linen.COLLECTION


def _stats(model, x, **kwargs):
  variables = model.init(jax.random.key(0), x)
  _, mutated = aa_linen.apply(model, variables, x, **kwargs)
  return variables, mutated[COLLECTION]


def test_collection_name_and_apply_returns_pair():
  assert COLLECTION == "adaact_stats"
  model = nn.Dense(3)
  x = jnp.ones((2, 4))
  variables = model.init(jax.random.key(0), x)
  out, mutated = aa_linen.apply(model, variables, x)
  assert out.shape == (2, 3) and set(mutated) == {COLLECTION}
  # Stale statistics in the input variables are ignored, not pooled.
  _, again = aa_linen.apply(model, {**variables, **mutated}, 2 * x)
  assert again[COLLECTION]["kernel"].shape == (4, 1)   # keep-rank (in, 1)
  assert_f32_close(again[COLLECTION]["kernel"], 4.0)


def test_dense_any_rank_and_stats_mirror_params():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(5)(x))
      x = nn.LayerNorm()(x)
      return nn.Dense(2, use_bias=False)(x)

  x = jax.random.normal(jax.random.key(1), (2, 3, 4))
  variables, stats = _stats(Model(), x)
  assert set(stats) == {"Dense_0", "Dense_1"}          # LayerNorm is unmatched
  assert_f32_close(stats["Dense_0"]["kernel"],
                   np.mean(np.asarray(x).reshape(6, 4) ** 2, 0)[:, None])
  assert stats["Dense_0"]["kernel"].shape == (4, 1) and stats["Dense_1"]["kernel"].shape == (5, 1)
  np.testing.assert_array_equal(stats["Dense_0"]["bias"], np.ones((1,), np.float32))
  assert "bias" not in stats["Dense_1"]
  # A bias's statistic leads to M_hat / (1 + eps): exactly the bias-corrected momentum.
  tx = adaact_optax.scale_by_adaact()
  grads = jax.tree.map(jnp.ones_like, variables["params"])
  updates, _ = tx.update(grads, tx.init(variables["params"]), activation_stats=stats)
  assert_f32_close(updates["Dense_0"]["bias"], 1 / (1 + 1e-8))
  np.testing.assert_array_equal(updates["LayerNorm_0"]["scale"], 1.0)


def _attention_reference(params, tokens, heads):
  """numpy forward of a self-attention layer up to the input of its 'out' projection."""
  p = jax.tree.map(np.asarray, params)
  t = np.asarray(tokens, np.float64)
  q, k, v = (np.einsum("bld,dhk->blhk", t, p[n]["kernel"]) + p[n]["bias"]
             for n in ("query", "key", "value"))
  logits = np.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def test_dense_general_several_axes_and_attention():
  x = jax.random.normal(jax.random.key(2), (2, 3, 4, 5))
  layer = nn.DenseGeneral(features=(6, 7), axis=(1, -1))
  variables, stats = _stats(layer, x)
  assert variables["params"]["kernel"].shape == (3, 5, 6, 7)
  assert_f32_close(stats["kernel"], np.mean(np.asarray(x) ** 2, axis=(0, 2))[:, :, None, None])
  assert stats["kernel"].shape == (3, 5, 1, 1) and stats["bias"].shape == (1, 1)

  attention = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  tokens = jax.random.normal(jax.random.key(3), (2, 5, 8))
  variables, stats = _stats(attention, tokens)
  assert set(stats) == {"query", "key", "value", "out"}
  for name in ("query", "key", "value"):   # kernel (8, heads, 4): input axis 8
    assert_f32_close(stats[name]["kernel"],
                     np.mean(np.asarray(tokens) ** 2, axis=(0, 1))[:, None, None])
  # 'out' kernel (heads, 4, 8) contracts the per-head attention output: statistics (heads, 4, 1).
  heads_out = _attention_reference(variables["params"], tokens, 2)
  assert_f32_close(stats["out"]["kernel"], np.mean(heads_out ** 2, axis=(0, 1))[:, :, None])
  tx = adaact_optax.adaact(0.1)
  state = tx.init(variables["params"])
  updates, _ = jax.jit(tx.update)(variables["params"], state, variables["params"],
                                  activation_stats=stats)
  assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, variables["params"])


def test_einsum_and_conv_local_are_captured():
  # Layers the interception-based capture() never saw: any dot_general/conv is captured.
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Einsum((2, 3, 4), "bhd,hdk->bk", use_bias=False)(x)        # contracts h and d
      return nn.ConvLocal(2, (2,), padding="VALID", use_bias=False)(h[:, :, None])

  x = jax.random.normal(jax.random.key(11), (5, 2, 3))
  variables, stats = _stats(Model(), x)
  assert_f32_close(stats["Einsum_0"]["kernel"], np.mean(np.asarray(x) ** 2, 0)[:, :, None])
  # ConvLocal: kernel (positions, window * C, O), one statistic per position and window element.
  h = np.asarray(x).reshape(5, 6) @ np.asarray(variables["params"]["Einsum_0"]["kernel"]).reshape(6, 4)
  kernel_shape = variables["params"]["ConvLocal_0"]["kernel"].shape
  assert kernel_shape == (3, 2, 2)
  patches = np.stack([h[:, i:i + 2] for i in range(3)], axis=1)          # (B, positions, window)
  assert_f32_close(stats["ConvLocal_0"]["kernel"], np.mean(patches ** 2, 0)[:, :, None])


def test_repeated_use_averages_all_rows():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x, z):
      layer = nn.Dense(4)
      return layer(x), layer(z)

  x = jax.random.normal(jax.random.key(4), (2, 4))
  z = jax.random.normal(jax.random.key(5), (6, 4))
  model = Twice()
  variables = model.init(jax.random.key(0), x, z)
  _, mutated = aa_linen.apply(model, variables, x, z)
  rows = np.concatenate([np.asarray(x), np.asarray(z)])
  assert_f32_close(mutated[COLLECTION]["Dense_0"]["kernel"], np.mean(rows ** 2, 0)[:, None])


def test_grouped_and_depthwise_convs_train_with_stats_shapes():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), feature_group_count=2)(x)
      x = nn.Conv(8, (3, 3), feature_group_count=8, padding="CIRCULAR")(x)   # depthwise
      return x.mean()

  x = jax.random.normal(jax.random.key(6), (2, 6, 6, 4))
  model = Model()
  variables = model.init(jax.random.key(0), x)
  shapes = aa_linen.stats_shapes(model, variables, x)
  assert variables["params"]["Conv_0"]["kernel"].shape == (3, 3, 2, 8)
  assert shapes["Conv_0"]["kernel"].shape == (3, 3, 2, 2)    # keep-rank (*k, C/G, G)
  assert shapes["Conv_1"]["kernel"].shape == (3, 3, 1, 8)    # depthwise: G == C == O
  tx = adaact_optax.adaact(0.1, stats_shapes=shapes)
  state = tx.init(variables["params"])
  assert state[0].nu["Conv_1"]["kernel"].shape == (3, 3, 1, 8)  # keep-rank (*k, C/G, G)

  @jax.jit
  def step(params, state):
    (_, mutated), grads = jax.value_and_grad(
        lambda p: aa_linen.apply(model, {"params": p}, x), has_aux=True)(params)
    updates, state = tx.update(grads, state, params, activation_stats=mutated[COLLECTION])
    return optax.apply_updates(params, updates), state, mutated[COLLECTION]

  params, state, stats = step(variables["params"], state)
  assert np.isfinite(jax.tree.leaves(params)[0]).all()
  assert stats["Conv_0"]["kernel"].shape == (3, 3, 2, 2)
  # Brute force: group g's statistic for in-channel j is the mean over output positions and batch
  # of the squared zero-padded input at channel g * C/G + j under each window offset.
  xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  windows = np.stack([np.stack([xp[:, i:i + 6, j:j + 6] for j in range(3)], 1) for i in range(3)], 1)
  per_channel = np.mean(windows ** 2, axis=(0, 3, 4))                     # (3, 3, C)
  assert_f32_close(stats["Conv_0"]["kernel"], per_channel.reshape(3, 3, 2, 2).transpose(0, 1, 3, 2))
  one_minus_b2 = 1 - float(np.float32(0.999))  # as the optimizer computes it, in float32
  assert_f32_close(state[0].nu["Conv_0"]["kernel"], one_minus_b2 * stats["Conv_0"]["kernel"])


def test_grouped_convention_matches_flax_connectivity():
  # For each input channel c, the kernel entries that touch it (nonzero gradient) must be
  # exactly those whose scale comes from channel c.
  layer = nn.Conv(6, (1,), feature_group_count=2, use_bias=False)
  x0 = jnp.zeros((1, 1, 4))
  params = layer.init(jax.random.key(0), x0)["params"]
  for c in range(4):
    x = x0.at[0, 0, c].set(1.0)
    grad = jax.grad(lambda p: layer.apply({"params": p}, x).sum())(params)["kernel"]
    marker = jnp.zeros((1, 4)).at[0, c].set(1.0)
    mapped = adaact_optax._src.alignment.apply_scale(jnp.ones((1, 2, 6)), marker, "kernel")
    np.testing.assert_array_equal(np.asarray(grad) != 0, np.asarray(mapped) != 0)


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(4)(h)), None


def test_scan_vmap_and_remat_stack_statistics():
  # No variable_axes entry for COLLECTION is needed: the statistics come from the jaxpr.
  scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      return scanned()(x, None)[0]

  x = jax.random.normal(jax.random.key(7), (5, 4))
  model = Stack()
  variables = model.init(jax.random.key(0), x)
  _, mutated = aa_linen.apply(model, variables, x)
  stats = mutated[COLLECTION]["ScanBlock_0"]["Dense_0"]
  kernels = variables["params"]["ScanBlock_0"]["Dense_0"]["kernel"]
  assert kernels.shape == (3, 4, 4) and stats["kernel"].shape == (3, 4, 1)   # layer axis kept
  h, expected = np.asarray(x), []
  for i in range(3):
    expected.append(np.mean(h ** 2, 0))
    h = np.tanh(h @ np.asarray(kernels[i]) + np.asarray(variables["params"]["ScanBlock_0"]["Dense_0"]["bias"][i]))
  assert_f32_close(stats["kernel"], np.stack(expected)[:, :, None])
  np.testing.assert_array_equal(stats["bias"], np.ones((3, 1), np.float32))
  tx = adaact_optax.adaact(0.1)
  state = tx.init(variables["params"])
  grads = jax.tree.map(jnp.ones_like, variables["params"])
  jax.jit(tx.update)(grads, state, variables["params"], activation_stats=mutated[COLLECTION])

  ensemble = nn.vmap(nn.Dense, variable_axes={"params": 0},
                     split_rngs={"params": True}, in_axes=0, out_axes=0)(features=2)
  xs = jax.random.normal(jax.random.key(8), (3, 5, 4))
  v = ensemble.init(jax.random.key(0), xs)
  _, m = aa_linen.apply(ensemble, v, xs)
  assert v["params"]["kernel"].shape == (3, 4, 2)
  assert_f32_close(m[COLLECTION]["kernel"], np.mean(np.asarray(xs) ** 2, axis=1)[:, :, None])

  remat = nn.remat(Block)
  class Remat(nn.Module):
    @nn.compact
    def __call__(self, x):
      return remat()(x, None)[0]
  v = Remat().init(jax.random.key(0), x)
  _, m = aa_linen.apply(Remat(), v, x)
  assert_f32_close(m[COLLECTION]["CheckpointBlock_0"]["Dense_0"]["kernel"],
                   np.mean(np.asarray(x) ** 2, 0)[:, None])


def test_batchnorm_collections_pass_through_and_init_is_untouched():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=False)(nn.Conv(2, (3,))(x))

  x = jax.random.normal(jax.random.key(9), (2, 5, 3))
  with aa_linen.capture():
    variables = Model().init(jax.random.key(0), x)
  assert COLLECTION not in variables
  _, mutated = aa_linen.apply(Model(), variables, x, mutable=["batch_stats"])
  assert set(mutated) == {"batch_stats", COLLECTION}
  _, mutated = aa_linen.apply(Model(), variables, x, mutable=True)
  assert set(mutated) >= {"batch_stats", COLLECTION}


def test_train_state_passes_statistics():
  model = nn.Dense(3)
  x = jax.random.normal(jax.random.key(10), (4, 5))
  variables = model.init(jax.random.key(0), x)
  tx = adaact_optax.adaact(0.1)
  state = adaact_optax.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)

  def loss_fn(p):
    out, mutated = aa_linen.apply(model, {"params": p}, x)
    return jnp.mean(out ** 2), mutated[COLLECTION]

  (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = jax.jit(lambda s, g, a: s.apply_gradients(grads=g, activation_stats=a))(state, grads, stats)
  updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"], activation_stats=stats)
  assert_f32_close(new_state.params["kernel"],
                   optax.apply_updates(variables["params"], updates)["kernel"])
  assert int(new_state.step) == 1
  with pytest.raises(TypeError):
    state.apply_gradients(grads=grads)   # statistics are required, never silently dropped


class _TiedLM(nn.Module):
  """A language model whose output projection is its embedding table (Embed.attend, as
  lm1b's logits_via_embedding and GPT-2's wte)."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(11, 6)
    h = embed(tokens)
    h = h + nn.Dense(6)(jnp.tanh(nn.Dense(8)(h)))
    return embed.attend(nn.LayerNorm()(h))


def test_tied_embedding_lm_without_stats_shapes_names_the_fix_and_trains_with_it():
  from conftest import assert_names_every_stats_shapes_call

  model = _TiedLM()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (4, 7)), jnp.int32)
  variables = model.init(jax.random.key(0), tokens)

  def train(tx, steps):
    @jax.jit
    def step(params, opt_state):
      def loss_fn(p):
        logits, mutated = aa_linen.apply(model, {"params": p}, tokens[:, :-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return loss, mutated[COLLECTION]
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params, activation_stats=stats)
      return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state, losses = variables["params"], tx.init(variables["params"]), []
    for _ in range(steps):
      params, opt_state, loss = step(params, opt_state)
      losses.append(float(loss))
    return losses, opt_state

  with pytest.raises(ValueError) as info:
    train(adaact_optax.adaact(0.1), 1)
  message = str(info.value)
  assert "'Embed_0/embedding' have shape (1, 6)" in message, message
  assert "(11, 6) has shape (11, 1)" in message and "vary along axis 1" in message
  assert_names_every_stats_shapes_call(message)

  shapes = aa_linen.stats_shapes(model, variables, tokens[:, :-1])
  losses, opt_state = train(adaact_optax.adaact(0.1, stats_shapes=shapes), 30)
  assert opt_state[0].nu["Embed_0"]["embedding"].shape == (1, 6)   # per d feature the head reads
  assert losses[-1] < 0.7 * losses[0]
