"""scale_by_adaact / adaact on their own: no Flax, hand-written statistics trees."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaact_optax
from _mlp import mlp_batches as _batches, mlp_loss_and_stats, mlp_params, train_mlp
from conftest import assert_f32_close, assert_names_every_stats_shapes_call


def numpy_adaact(params, batches, lr, b1, b2, eps, wd, steps):
  """The rule exactly as the README states it, in float64 numpy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  m = jax.tree.map(np.zeros_like, p)
  v = {k: {"w": np.zeros(p[k]["w"].shape[0]), "b": 0.0} for k in p}
  for t in range(1, steps + 1):
    x, y = batches[t - 1]
    (_, stats), g = jax.value_and_grad(mlp_loss_and_stats, has_aux=True)(
        jax.tree.map(jnp.asarray, p), x, y)
    for k in p:
      for name in ("w", "b"):
        gk = np.asarray(g[k][name], np.float64)
        m[k][name] = b1 * m[k][name] + (1 - b1) * gk
        a = np.asarray(stats[k][name], np.float64)
        v[k][name] = b2 * v[k][name] + (1 - b2) * a
        m_hat = m[k][name] / (1 - b1 ** t)
        v_hat = v[k][name] / (1 - b2 ** t)
        scale = np.sqrt(v_hat) + eps
        scale = scale[:, None] if name == "w" else scale
        zero = np.broadcast_to(scale == 0, np.shape(m_hat))
        # eps = 0 and a feature that never carried input: its gradient is 0 too, and
        # the update of 0/0 is 0.
        assert np.all(m_hat[zero] == 0)
        update = np.divide(m_hat, scale, out=np.zeros_like(m_hat), where=~zero)
        p[k][name] = p[k][name] - lr * (update + wd * p[k][name])
  return p


class TransformTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_pure_jax_model_follows_the_rule(self):
    batches = _batches(4)
    tx = adaact_optax.adaact(0.05, b1=0.8, b2=0.9, eps=1e-3, weight_decay=0.01)
    params, state = train_mlp(tx, mlp_params(jax.random.key(0)), batches, self.variant)
    expected = numpy_adaact(mlp_params(jax.random.key(0)), batches, 0.05, 0.8, 0.9, 1e-3, 0.01, 4)
    # float32 against float64, each step with the MLP's forward and backward pass.
    assert_f32_close(params, expected, steps=len(batches), ulps_per_step=64)
    assert int(state[0].count) == 4


def test_jit_and_eager_agree_exactly_enough():
  params = mlp_params(jax.random.key(3))
  tx = adaact_optax.scale_by_adaact()
  (_, stats), grads = jax.value_and_grad(mlp_loss_and_stats, has_aux=True)(params, *_batches(1)[0])
  state = tx.init(params)
  eager = tx.update(grads, state, activation_stats=stats)
  jitted = jax.jit(lambda g, s, a: tx.update(g, s, activation_stats=a))(grads, state, stats)
  assert_f32_close(eager, jitted)


def test_unmatched_parameters_sgd_and_momentum():
  params = {"w": jnp.ones((3, 2)), "norm": jnp.ones((2,))}
  grads = {"w": jnp.full((3, 2), 0.5), "norm": jnp.array([1.0, -2.0])}
  stats = {"w": jnp.array([4.0, 1.0, 0.25])}
  sgd = adaact_optax.scale_by_adaact()
  updates, state = sgd.update(grads, sgd.init(params), activation_stats=stats)
  np.testing.assert_array_equal(updates["norm"], grads["norm"])      # raw gradient
  expected = np.broadcast_to(0.5 / (np.sqrt([4.0, 1.0, 0.25])[:, None] + 1e-8), (3, 2))
  assert_f32_close(updates["w"], expected)
  np.testing.assert_array_equal(state.mu["norm"], 0.0)               # no momentum kept
  mom = adaact_optax.scale_by_adaact(unmatched="momentum")
  state = mom.init(params)
  for _ in range(2):
    updates, state = mom.update(grads, state, activation_stats=stats)
  # Bias-corrected momentum of a constant gradient is the gradient itself.
  assert_f32_close(updates["norm"], grads["norm"], steps=2)
  assert not np.allclose(state.mu["norm"], 0.0)


def test_state_is_per_input_feature_and_dtypes():
  params = {"conv": {"kernel": jnp.zeros((3, 3, 16, 32)), "bias": jnp.zeros((32,))},
            "attn": {"kernel": jnp.zeros((64, 4, 16))}, "scale": jnp.zeros((7,))}
  state = adaact_optax.scale_by_adaact(mu_dtype=jnp.bfloat16).init(params)
  assert state.count.dtype == jnp.int32
  assert jax.tree.map(jnp.shape, state.nu) == {"conv": {"kernel": (3, 3, 16, 1), "bias": (1,)},
                                               "attn": {"kernel": (64, 4, 1)}, "scale": (1,)}
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(state.nu))
  assert all(l.dtype == jnp.bfloat16 for l in jax.tree.leaves(state.mu))
  nu_size = sum(l.size for l in jax.tree.leaves(state.nu))
  assert nu_size < 0.1 * sum(p.size for p in jax.tree.leaves(params))


def test_prefix_statistics_fill_multi_output_kernels():
  # A (in, heads, dim) projection: one statistic per input feature, shared by heads and dims.
  params = {"q": jnp.zeros((4, 2, 3))}
  grads = {"q": jnp.ones((4, 2, 3))}
  tx = adaact_optax.scale_by_adaact(b1=0.0, b2=0.0)
  updates, state = tx.update(grads, tx.init(params), activation_stats={"q": jnp.array([1.0, 4.0, 9.0, 16.0])})
  assert_f32_close(updates["q"][:, 1, 2], 1 / (np.array([1.0, 2.0, 3.0, 4.0]) + 1e-8))
  assert state.nu["q"].shape == (4, 2, 1)


def test_grouped_kernels_broadcast_per_group():
  # kernel (k, C/G, C_out) with C=4, G=2, C_out=6: output j reads input channel (j // 3) * 2 + i.
  v = jnp.arange(1.0, 4 * 2 + 1).reshape(2, 4)
  got = adaact_optax._src.alignment.apply_scale(jnp.ones((2, 2, 6)), v, "conv/kernel")
  expected = np.array([[[v[o, (j // 3) * 2 + i] for j in range(6)] for i in range(2)] for o in range(2)])
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("kwargs,name", [
    ({"b1": 1.0}, "b1"), ({"b1": -0.1}, "b1"), ({"b2": 1.0}, "b2"), ({"eps": -1e-8}, "eps"),
    ({"power": 0.0}, "power"), ({"unmatched": "adam"}, "unmatched"),
])
def test_bad_hyperparameters_raise_at_construction(kwargs, name):
  with pytest.raises(ValueError, match=name):
    adaact_optax.scale_by_adaact(**kwargs)
  with pytest.raises(ValueError, match=name):
    adaact_optax.adaact(0.1, **kwargs)


def test_negative_weight_decay_raises():
  with pytest.raises(ValueError, match="weight_decay"):
    adaact_optax.adaact(0.1, weight_decay=-1e-3)


def test_missing_statistics_say_how_to_pass_them():
  params = {"w": jnp.ones((2, 2))}
  tx = adaact_optax.adaact(0.1)
  with pytest.raises(ValueError, match="activation_stats="):
    tx.update(params, tx.init(params), params)


def test_statistics_at_unknown_path_or_wrong_shape_name_both():
  params = {"dense": {"kernel": jnp.ones((3, 2))}}
  tx = adaact_optax.scale_by_adaact()
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"dense/kernal.*\(3,\)"):
    jax.jit(lambda s: tx.update(params, state, activation_stats=s))({"dense": {"kernal": jnp.ones(3)}})
  with pytest.raises(ValueError, match=r"\(5,\).*dense/kernel.*\(3, 2\)"):
    jax.jit(lambda s: tx.update(params, state, activation_stats=s))({"dense": {"kernel": jnp.ones(5)}})
  grouped = {"conv": {"kernel": jnp.ones((3, 3, 2, 8))}}
  tx_state = tx.init(grouped)
  with pytest.raises(ValueError, match="stats_shapes"):
    tx.update(grouped, tx_state, activation_stats={"conv": {"kernel": jnp.ones((3, 3, 8))}})
  with pytest.raises(ValueError, match=r"\(3, 5\).*conv/kernel.*\(3, 3, 2, 8\)"):
    adaact_optax.scale_by_adaact(stats_shapes={"conv": {"kernel": (3, 5)}}).init(grouped)


def test_apply_if_finite_leaves_params_and_state_unchanged():
  params = mlp_params(jax.random.key(0))
  tx = optax.apply_if_finite(adaact_optax.adaact(0.1), max_consecutive_errors=5)
  x, y = _batches(1)[0]
  (_, stats), grads = jax.value_and_grad(mlp_loss_and_stats, has_aux=True)(params, x, y)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, activation_stats=stats)
  params = optax.apply_updates(params, updates)
  # A NaN input makes NaN statistics and NaN gradients: the step must be dropped.
  (_, bad_stats), bad_grads = jax.value_and_grad(mlp_loss_and_stats, has_aux=True)(
      params, x.at[0, 0].set(jnp.nan), y)
  assert not np.isfinite(bad_stats["layer0"]["w"]).all()
  step = jax.jit(lambda g, s, p, a: tx.update(g, s, p, activation_stats=a))
  updates, new_state = step(bad_grads, state, params, bad_stats)
  chex.assert_trees_all_equal(optax.apply_updates(params, updates), params)
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.notfinite_count) == 1


def test_weight_decay_mask_and_schedule():
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  stats = {"w": jnp.ones((2,)), "b": jnp.ones(())}
  schedule = optax.linear_schedule(0.1, 0.0, 2)
  tx = adaact_optax.adaact(schedule, weight_decay=0.5, mask={"w": True, "b": False})
  state = tx.init(params)
  for lr in (0.1, 0.05):
    # Zero gradients: only the decoupled weight decay moves the (masked) parameters.
    updates, state = tx.update(zeros, state, params, activation_stats=stats)
    assert_f32_close(updates["w"], -lr * 0.5 * np.ones((2, 2)))
    np.testing.assert_array_equal(updates["b"], 0.0)


# --- the 0.2 keep-rank statistics layout (adaact_optax.matching) -------------

def _repeat_reference(x, stat):
  """The contract's reference: repeat the statistic along each axis up to x's size."""
  for ax, (k, s) in enumerate(zip(x.shape, stat.shape)):
    stat = np.repeat(stat, k // s, axis=ax)
  return np.asarray(x) * stat


@pytest.mark.parametrize("param_shape,stat_shape", [
    ((4, 6), (4, 1)),          # Dense kernel
    ((6, 4), (1, 4)),          # an (out, in) weight
    ((4, 6), (4, 3)),          # a fused kernel split 3 ways along the outputs
    ((2, 2, 4, 6), (2, 2, 4, 2)),  # grouped conv (kh, kw, C/G, G)
    ((4, 6), (2, 6)),          # blocks on the input axis too
    ((6,), (1,)), ((), ()),
])
def test_apply_scale_equals_repeating_the_statistics(param_shape, stat_shape):
  x = jax.random.normal(jax.random.key(0), param_shape)
  stat = jax.random.uniform(jax.random.key(1), stat_shape, minval=0.5, maxval=2.0)
  got = adaact_optax._src.alignment.apply_scale(x, stat, "layer/kernel")
  np.testing.assert_array_equal(got, _repeat_reference(x, np.asarray(stat)))


def test_legacy_leaves_convert_to_keep_rank():
  to_keep_rank = adaact_optax.layout.to_keep_rank
  a = jnp.arange(1.0, 5.0)
  assert to_keep_rank(a, (4, 3), "d").shape == (4, 1)                 # K[:-1]
  assert to_keep_rank(a, (4, 2, 3), "q").shape == (4, 1, 1)            # a prefix
  assert to_keep_rank(jnp.ones(()), (3,), "b").shape == (1,)           # 0.1.0 bias ()
  # 0.1.0 grouped conv: kernel (k, C/G, C_out) = (2, 2, 6), stats (k, C) = (2, 4):
  # input channel c = g * C/G + i moves to [..., i, g].
  v = jnp.arange(8.0).reshape(2, 4)
  got = to_keep_rank(v, (2, 2, 6), "conv")
  assert got.shape == (2, 2, 2)
  for o in range(2):
    for g in range(2):
      for i in range(2):
        assert got[o, i, g] == v[o, g * 2 + i]
  with pytest.raises(ValueError, match=r"\(5,\).*'d'.*\(4, 3\)"):
    to_keep_rank(jnp.ones(5), (4, 3), "d")
  with pytest.raises(ValueError, match=r"\(4, 4\).*'d'.*\(4, 6\)"):  # 4 does not divide 6
    to_keep_rank(jnp.ones((4, 4)), (4, 6), "d")


def test_stats_shapes_overrides_in_every_form():
  params = {"dense": jnp.zeros((4, 6)), "qkv": jnp.zeros((4, 9)), "conv": jnp.zeros((3, 2, 8)),
            "prefix": jnp.zeros((4, 2, 3)), "norm": jnp.zeros((6,)),
            "custom": jnp.zeros((5, 5))}
  shapes = {"dense": (4, 1),                              # keep-rank
            "qkv": jax.ShapeDtypeStruct((4, 3), jnp.float32),  # blocks
            "conv": jnp.zeros((3, 4)),                    # 0.1.0 grouped (*k, C), G = 2
            "prefix": (4,),                               # 0.1.0 prefix
            "custom": (0,)}                               # UNCAPTURED
  nu = adaact_optax.scale_by_adaact(stats_shapes=shapes).init(params).nu
  assert jax.tree.map(jnp.shape, nu) == {
      "dense": (4, 1), "qkv": (4, 3), "conv": (3, 2, 2), "prefix": (4, 1, 1),
      "norm": (1,), "custom": (0,)}
  with pytest.raises(ValueError, match=r"stats_shapes.*'nope'.*\(2,\)"):
    adaact_optax.scale_by_adaact(stats_shapes={"nope": (2,)}).init(params)


def test_block_statistics_train_a_fused_kernel_per_block():
  # A (4, 6) kernel split in 3 output blocks of 2 columns, each with its own statistic.
  params = {"qkv": jnp.zeros((4, 6))}
  stats = {"qkv": jnp.array([[1.0, 4.0, 9.0]] * 4)}
  tx = adaact_optax.scale_by_adaact(b1=0.0, b2=0.0, stats_shapes={"qkv": (4, 3)})
  updates, state = tx.update({"qkv": jnp.ones((4, 6))}, tx.init(params), activation_stats=stats)
  assert_f32_close(updates["qkv"][0], 1 / np.array([1, 1, 2, 2, 3, 3]))
  assert state.nu["qkv"].shape == (4, 3)
  # Without stats_shapes the state is (4, 1): block statistics cannot fit, and the error says why.
  plain = adaact_optax.scale_by_adaact()
  with pytest.raises(ValueError, match=r"'qkv'.*\(4, 3\).*\(4, 1\).*stats_shapes="):
    plain.update({"qkv": jnp.ones((4, 6))}, plain.init(params), activation_stats=stats)


def _uncaptured_setup():
  params = {"dense": {"kernel": jnp.ones((3, 2))}, "quant": {"kernel": jnp.ones((3, 2))},
            "norm": {"scale": jnp.ones((2,))}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  stats = {"dense": {"kernel": jnp.ones((3, 1))},
           "quant": {"kernel": jnp.zeros(adaact_optax.layout.UNCAPTURED_SHAPE)}}
  return params, grads, stats


def test_uncaptured_marker_is_unmatched():
  params, grads, stats = _uncaptured_setup()
  assert adaact_optax.layout.is_uncaptured(stats["quant"]["kernel"])
  assert not adaact_optax.layout.is_uncaptured(stats["dense"]["kernel"])
  assert adaact_optax._src.alignment.uncaptured_paths(stats) == ["quant/kernel"]
  tx = adaact_optax.scale_by_adaact()
  updates, state = jax.jit(lambda s: tx.update(grads, tx.init(params), activation_stats=s))(stats)
  np.testing.assert_array_equal(updates["quant"]["kernel"], grads["quant"]["kernel"])  # sgd
  np.testing.assert_array_equal(state.nu["quant"]["kernel"], 0.0)
  assert float(state.nu["dense"]["kernel"].min()) > 0


def test_unmatched_error_names_the_uncaptured_paths_and_the_fixes():
  params, grads, stats = _uncaptured_setup()
  tx = adaact_optax.adaact(0.1, unmatched="error")
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"quant/kernel.*sow.*unmatched='sgd'") as info:
    jax.jit(lambda s: tx.update(grads, state, params, activation_stats=s))(stats)
  assert "dense" not in str(info.value) and "norm" not in str(info.value)
  # Without markers, parameters without statistics (the norm) take the raw gradient.
  del stats["quant"]
  updates, _ = tx.update(grads, state, params, activation_stats=stats)
  assert_f32_close(updates["norm"]["scale"], np.full(2, -0.1 * (0.5 + 2e-3)))
  # A marker in stats_shapes is refused at init already.
  with pytest.raises(ValueError, match=r"quant/kernel.*unmatched='momentum'"):
    adaact_optax.adaact(0.1, unmatched="error",
                        stats_shapes={"quant": {"kernel": (0,)}}).init(params)


# --- unmatched=<an optax transformation> (issue 13) --------------------------

def gain_mlp_loss_and_stats(params, x, y):
  """A per-feature gain (no statistics) in front of the MLP."""
  loss, stats = mlp_loss_and_stats(params["mlp"], x * params["gain"], y)
  return loss, {"mlp": stats}


def _gain_params():
  return {"gain": jnp.linspace(0.5, 1.5, 6), "mlp": mlp_params(jax.random.key(5))}


def _gain_stats_shapes(params):
  x, y = _batches(1)[0]
  return jax.eval_shape(lambda p: gain_mlp_loss_and_stats(p, x, y)[1], params)


def _run(tx, params, steps=3):
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    (_, stats), grads = jax.value_and_grad(gain_mlp_loss_and_stats, has_aux=True)(params, x, y)
    updates, state = tx.update(grads, state, params, activation_stats=stats)
    return optax.apply_updates(params, updates), state

  for x, y in _batches(steps):
    params, state = step(params, state, x, y)
  return params, state


def test_unmatched_optimizer_equals_the_hand_built_partition():
  params = _gain_params()
  shapes = _gain_stats_shapes(params)
  tx = adaact_optax.adaact(0.3, weight_decay=0.01, stats_shapes=shapes,
                           unmatched=optax.adamw(3e-3, weight_decay=0.1))
  labels = {"gain": "other", "mlp": jax.tree.map(lambda _: "adaact", params["mlp"])}
  by_hand = optax.partition({"adaact": adaact_optax.adaact(0.3, weight_decay=0.01),
                             "other": optax.adamw(3e-3, weight_decay=0.1)}, labels)
  got, state = _run(tx, params)
  want, _ = _run(by_hand, params)
  # The same arithmetic, but another program (adaact's step-skipping wrapper around it).
  assert_f32_close(got, want, steps=3)
  # The gain moved as AdamW moves it (its own lr and decay), not by AdaAct's lr 0.3.
  assert 0 < float(jnp.abs(got["gain"] - params["gain"]).max()) < 3 * 3e-3 + 1e-6
  # AdamW's state has moments for the gain only, none for the matrices.
  adam_state = state.inner_states["unmatched"].inner_state
  mus = [s.mu for s in jax.tree.leaves(adam_state, is_leaf=lambda s: hasattr(s, "mu"))
         if hasattr(s, "mu")]
  assert len(mus) == 1 and [jnp.shape(m) for m in jax.tree.leaves(mus[0])] == [(6,)]
  adaact_nu = state.inner_states["adaact"].inner_state[0].nu
  assert not jax.tree.leaves(adaact_nu["gain"]) and len(jax.tree.leaves(adaact_nu["mlp"])) == 4


def test_unmatched_optimizer_needs_stats_shapes_and_consistent_statistics():
  with pytest.raises(ValueError, match="stats_shapes=.*stats_shapes\\(model"):
    adaact_optax.adaact(0.1, unmatched=optax.adam(1e-3))
  with pytest.raises(ValueError, match="scale_by_adaact.*optax.partition"):
    adaact_optax.scale_by_adaact(unmatched=optax.adam(1e-3))
  params = _gain_params()
  shapes = _gain_stats_shapes(params)
  del shapes["mlp"]["layer1"]["w"]  # stale: layer1/w has statistics at update time
  tx = adaact_optax.adaact(0.1, unmatched=optax.adam(1e-3), stats_shapes=shapes)
  with pytest.raises(ValueError, match=r"statistics at \['mlp/layer1/w'\] but stats_shapes"):
    _run(tx, params, steps=1)


def test_unmatched_strings_keep_their_meaning_with_stats_shapes():
  # stats_shapes only sizes the state with the strings: the updates are unchanged.
  params = _gain_params()
  for mode in ("sgd", "momentum"):
    got, _ = _run(adaact_optax.adaact(0.1, unmatched=mode,
                                      stats_shapes=_gain_stats_shapes(params)), params)
    want, _ = _run(adaact_optax.adaact(0.1, unmatched=mode), params)
    chex.assert_trees_all_equal(got, want)


# --- eps=0 and a feature that never carries input ----------------------------

def _dead_feature_batches(n):
  """Batches whose input feature 2 is always 0: layer0's w[2] gets V = 0 and no gradient."""
  return [(x.at[:, 2].set(0.0), y) for x, y in _batches(n)]


def test_eps_zero_dead_feature_gets_zero_update_and_the_rest_follow_the_rule():
  params = mlp_params(jax.random.key(0))
  batches = _dead_feature_batches(5)
  lr, wd = 0.05, 0.01
  tx = adaact_optax.adaact(lr, b1=0.8, b2=0.9, eps=0.0, weight_decay=wd)
  p, state = train_mlp(tx, params, batches)
  assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves((p, state)))
  # The rule in float64 numpy (which checks that the dead row's momentum is exactly 0).
  expected = numpy_adaact(params, batches, lr, 0.8, 0.9, 0.0, wd, 5)
  chex.assert_trees_all_close(p, jax.tree.map(np.float32, expected), rtol=2e-5, atol=1e-6)
  # The dead row: a zero AdaAct update, so weight decay alone moves it.
  np.testing.assert_allclose(p["layer0"]["w"][2], params["layer0"]["w"][2] * (1 - lr * wd) ** 5,
                             rtol=1e-6)
  assert np.all(np.asarray(state[0].nu["layer0"]["w"])[2] == 0)


def test_eps_zero_activation_rms_dead_feature_gets_zero_update():
  tx = adaact_optax.scale_by_activation_rms(b2=0.9, eps=0.0)
  updates = {"w": jnp.arange(1.0, 7.0).reshape(3, 2)}
  state = tx.init(updates)
  v = np.zeros((3, 1))
  for t, a in enumerate([[4.0, 0.0, 1.0], [1.0, 0.0, 9.0], [0.25, 0.0, 4.0]], start=1):
    stats = {"w": jnp.array(a)[:, None]}
    out, state = jax.jit(lambda u, s, st: tx.update(u, s, activation_stats=st))(
        updates, state, stats)
    v = 0.9 * v + 0.1 * np.array(a)[:, None]
    live = [0, 2]
    expected = np.asarray(updates["w"])[live] / np.sqrt(v[live] / (1 - 0.9 ** t))
    np.testing.assert_allclose(np.asarray(out["w"])[live], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["w"][1], 0.0)           # the dead feature, not NaN


def test_zero_update_guard_is_per_feature_not_per_weight():
  """The eps=0 guard acts on the per-input-feature scale: no division, and no select
  beyond the gradient's one (skipping non-finite steps), touches a parameter-sized array."""
  params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
  stats = {"w": jnp.ones((64, 1)), "b": jnp.ones((1,))}
  tx = adaact_optax.scale_by_adaact(eps=0.0)
  jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, activation_stats=stats))(
      params, tx.init(params)).jaxpr

  def eqns(jaxpr):  # with those of nested jits (jnp.where is one)
    for e in jaxpr.eqns:
      yield e
      if "jaxpr" in e.params:
        yield from eqns(getattr(e.params["jaxpr"], "jaxpr", e.params["jaxpr"]))
  big = lambda eqn: any(math.prod(v.aval.shape) >= 64 * 32 for v in eqn.outvars)
  names = [e.primitive.name for e in eqns(jaxpr)]
  assert "div" in names and "select_n" in names                  # the walk sees them
  assert not [e for e in eqns(jaxpr) if e.primitive.name == "div" and big(e)]
  selects = [e for e in eqns(jaxpr) if e.primitive.name == "select_n" and big(e)]
  assert len(selects) == 1, selects                    # jnp.where(ok, g, 0) on w's gradient

# --- statistics on a non-leading axis need stats_shapes, and the error says so ----

def _out_in_loss(params, x, y):
  """Weights stored (out, in) and applied as x @ W.T (Equinox, PyTorch-style code)."""
  h = jnp.tanh(x @ params["hidden"]["w"].T + params["hidden"]["b"])
  return jnp.mean((h @ params["out"]["w"].T - y) ** 2)


def test_out_in_weights_without_stats_shapes_name_the_fix_and_train_with_it():
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"hidden": {"w": jax.random.normal(k1, (5, 6)) * 0.5, "b": jnp.zeros(5)},
            "out": {"w": jax.random.normal(k2, (3, 5)) * 0.5}}
  x, y = _batches(1)[0]
  _, grads, stats = adaact_optax.value_grad_and_stats(_out_in_loss)(params, x, y)
  assert stats["hidden"]["w"].shape == (1, 6)          # varies along the input axis, axis 1
  tx = adaact_optax.adaact(0.1)
  with pytest.raises(ValueError) as info:
    jax.jit(lambda g, s, p, a: tx.update(g, s, p, activation_stats=a))(
        grads, tx.init(params), params, stats)
  message = str(info.value)
  assert "'hidden/w' have shape (1, 6)" in message and "(5, 6) has shape (5, 1)" in message
  assert "vary along axis 1" in message and "sized at init for the default layout" in message
  assert_names_every_stats_shapes_call(message)

  tx = adaact_optax.adaact(0.1, stats_shapes=adaact_optax.stats_shapes(_out_in_loss, params, x, y))
  state = tx.init(params)
  assert state[0].nu["hidden"]["w"].shape == (1, 6) and state[0].nu["out"]["w"].shape == (1, 5)

  @jax.jit
  def step(params, state, x, y):
    loss, grads, stats = adaact_optax.value_grad_and_stats(_out_in_loss)(params, x, y)
    updates, state = tx.update(grads, state, params, activation_stats=stats)
    return optax.apply_updates(params, updates), state, loss, grads, stats, updates

  new_params, state, first_loss, grads, stats, updates = step(params, state, x, y)
  # Step 1: -lr * (g / sqrt(A) + wd * w), A broadcast down the output axis 0.
  expected = -0.1 * (np.asarray(grads["hidden"]["w"]) / (np.sqrt(stats["hidden"]["w"]) + 1e-8)
                     + 2e-3 * np.asarray(params["hidden"]["w"]))
  assert_f32_close(updates["hidden"]["w"], expected)
  losses = [float(first_loss)]
  for _ in range(20):
    new_params, state, loss, *_ = step(new_params, state, x, y)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]


def test_unmatched_optimizer_without_stats_shapes_names_every_capture():
  with pytest.raises(ValueError) as info:
    adaact_optax.adaact(0.1, unmatched=optax.adam(1e-3))
  assert_names_every_stats_shapes_call(str(info.value))
