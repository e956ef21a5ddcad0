"""AdaAct inside the usual Optax wrappers: chain, schedules, inject_hyperparams,
partition, apply_if_finite. The statistics must reach the AdaAct transform
through every wrapper, and the wrappers must change nothing else."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaact_optax
from adaact_optax import linen as aa_linen
from conftest import assert_f32_close
from _mlp import mlp_batches, mlp_loss_and_stats, mlp_params


class TokenMLP(nn.Module):
  """Embedding + LayerNorm (no statistics) and two Dense layers (statistics)."""

  @nn.compact
  def __call__(self, tokens, x):
    h = jnp.concatenate([nn.Embed(20, 8)(tokens).mean(1), x], -1)
    h = nn.relu(nn.Dense(16)(nn.LayerNorm()(h)))
    return nn.Dense(5)(h)


MODEL = TokenMLP()


def _batch(seed):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.randint(k1, (8, 3), 0, 20), jax.random.normal(k2, (8, 6)),
          jax.random.randint(k3, (8,), 0, 5))


def _init():
  tokens, x, _ = _batch(0)
  return MODEL.init(jax.random.key(0), tokens, x)["params"]


def _grads_and_stats(params, batch, loss_scale=1.0):
  tokens, x, y = batch

  def loss_fn(p):
    logits, mutated = aa_linen.apply(MODEL, {"params": p}, tokens, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss_scale * loss, mutated[aa_linen.COLLECTION]

  grads, stats = jax.grad(loss_fn, has_aux=True)(params)
  return grads, stats


def _train(tx, steps=3, params=None, opt_state=None, loss_scale=1.0, first_batch=1):
  """``steps`` jitted steps; returns params, the last opt_state and all updates."""
  params = _init() if params is None else params
  opt_state = tx.init(params) if opt_state is None else opt_state

  @jax.jit
  def step(params, opt_state, batch):
    grads, stats = _grads_and_stats(params, batch, loss_scale)
    updates, opt_state = tx.update(grads, opt_state, params, activation_stats=stats)
    return optax.apply_updates(params, updates), opt_state

  for t in range(steps):
    params, opt_state = step(params, opt_state, _batch(first_batch + t))
  return params, opt_state


def _assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_chain_with_clipping_and_warmup_cosine_schedule():
  schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, warmup_steps=2, decay_steps=6)
  tx = optax.chain(optax.clip_by_global_norm(1.0), adaact_optax.adaact(schedule))
  # Reference, by hand: clip to norm 1, AdaAct's scaling, decoupled decay, -lr(t).
  scale = adaact_optax.scale_by_adaact()
  params = _init()
  state, ref_state = tx.init(params), scale.init(params)

  @jax.jit
  def step(params, state, ref_state, t, batch):
    grads, stats = _grads_and_stats(params, batch, loss_scale=50.0)
    norm = optax.tree.norm(grads)
    updates, state = tx.update(grads, state, params, activation_stats=stats)
    clipped = jax.tree.map(lambda g: g / norm, grads)
    ref_updates, ref_state = scale.update(clipped, ref_state, activation_stats=stats)
    ref_updates = jax.tree.map(lambda u, p: -schedule(t) * (u + 2e-3 * p), ref_updates, params)
    return norm, updates, state, ref_updates, ref_state

  for t in range(4):
    norm, updates, state, ref_updates, ref_state = step(params, state, ref_state, t,
                                                        _batch(1 + t))
    assert norm > 1.0  # the clip is active
    assert_f32_close(updates, ref_updates, err_msg=f"step {t + 1}: ")
    params = optax.apply_updates(params, updates)
  assert float(schedule(0)) == 0.0  # warmup: the first step did not move the params


def test_inject_hyperparams_reads_changes_and_equals_the_plain_optimizer():
  injected = optax.inject_hyperparams(adaact_optax.adaact)(learning_rate=0.1, weight_decay=2e-3)
  params, state = _train(injected, steps=2)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)
  assert float(state.hyperparams["weight_decay"]) == pytest.approx(2e-3)
  state.hyperparams["learning_rate"] = jnp.float32(0.05)
  state.hyperparams["weight_decay"] = jnp.float32(0.0)
  params, state = _train(injected, steps=2, params=params, opt_state=state, first_batch=3)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.05)

  # Plain optimizers with the same values; adaact's state does not depend on
  # lr or weight decay, so it carries over from the first to the second.
  ref, ref_state = _train(adaact_optax.adaact(0.1, weight_decay=2e-3), steps=2)
  ref, ref_state = _train(adaact_optax.adaact(0.05, weight_decay=0.0), steps=2, params=ref,
                          opt_state=ref_state, first_batch=3)
  # The same arithmetic in float32, but another program: hyperparameters as arguments.
  assert_f32_close(params, ref, steps=4)
  assert_f32_close(state.inner_state, ref_state, steps=4)


def test_inject_hyperparams_with_a_schedule_exposes_its_current_value():
  schedule = optax.linear_schedule(0.1, 0.0, transition_steps=4)
  injected = optax.inject_hyperparams(adaact_optax.adaact)(learning_rate=schedule)
  params, state = _train(injected, steps=2)
  ref, _ = _train(adaact_optax.adaact(schedule), steps=2)
  assert_f32_close(params, ref, steps=2)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(float(schedule(1)))


def _label_by_module(owner):
  return lambda params: {m: jax.tree.map(lambda _: owner(m), sub) for m, sub in params.items()}


@pytest.mark.parametrize("adamw_modules", [
    ("Embed_0", "LayerNorm_0"),             # AdaAct owns every layer it has statistics for
    ("Embed_0", "LayerNorm_0", "Dense_1"),  # statistics of Dense_1 reach a masked path
])
def test_partition_routes_statistics_to_the_adaact_branch(adamw_modules):
  owner = lambda m: "adamw" if m in adamw_modules else "adaact"
  tx = optax.partition({"adaact": adaact_optax.adaact(0.1), "adamw": optax.adamw(1e-3)},
                       _label_by_module(owner))
  full_adaact, full_adamw = adaact_optax.adaact(0.1), optax.adamw(1e-3)
  params = _init()
  state, s_act, s_adam = tx.init(params), full_adaact.init(params), full_adamw.init(params)

  @jax.jit
  def step(params, state, s_act, s_adam, batch):
    grads, stats = _grads_and_stats(params, batch)
    updates, state = tx.update(grads, state, params, activation_stats=stats)
    u_act, s_act = full_adaact.update(grads, s_act, params, activation_stats=stats)
    u_adam, s_adam = full_adamw.update(grads, s_adam, params)
    return updates, state, u_act, s_act, u_adam, s_adam

  for t in range(3):
    updates, state, u_act, s_act, u_adam, s_adam = step(params, state, s_act, s_adam,
                                                        _batch(1 + t))
    # Each parameter moves as the optimizer that owns it would move it alone.
    for module in params:
      expected = u_adam if owner(module) == "adamw" else u_act
      assert_f32_close(updates[module], expected[module], steps=t + 1, err_msg=module)
    params = optax.apply_updates(params, updates)
  nu = state.inner_states["adaact"].inner_state[0].nu
  assert not jax.tree.leaves(nu["Embed_0"])  # masked: no state
  assert float(jnp.min(nu["Dense_0"]["kernel"])) > 0  # the statistics arrived
  assert (not jax.tree.leaves(nu["Dense_1"])) == ("Dense_1" in adamw_modules)


def test_partition_with_prefix_labels_and_a_wrong_statistics_path():
  labels = {"Dense_0": "adaact", "Dense_1": "adamw", "Embed_0": "adamw", "LayerNorm_0": "adamw"}
  tx = optax.partition({"adaact": adaact_optax.adaact(0.1), "adamw": optax.adamw(1e-3)}, labels)
  params = _init()
  state = tx.init(params)
  grads, stats = _grads_and_stats(params, _batch(1))
  _, state = tx.update(grads, state, params, activation_stats=stats)
  assert float(jnp.min(state.inner_states["adaact"].inner_state[0].nu["Dense_0"]["kernel"])) > 0
  # A path outside the params is a parameter this optimizer does not train: ignored.
  extra, _ = tx.update(grads, state, params, activation_stats=dict(stats, Nope={"kernel": jnp.ones(3)}))
  plain, _ = tx.update(grads, state, params, activation_stats=stats)
  _assert_trees_equal(extra, plain)
  # Statistics with no path of the params at all are not keyed like them: an error, named.
  with pytest.raises(ValueError, match=r"matches no parameter.*adaact_stats/Dense_0/kernel"):
    tx.update(grads, state, params, activation_stats={aa_linen.COLLECTION: stats})


def test_frozen_backbone_statistics_are_ignored_with_or_without_a_partition():
  """Dense_0, the Embed and the LayerNorm are a frozen backbone; only Dense_1 trains."""
  labels = {"Dense_0": "frozen", "Dense_1": "train", "Embed_0": "frozen", "LayerNorm_0": "frozen"}
  partitioned = optax.partition({"train": adaact_optax.adaact(0.1), "frozen": optax.set_to_zero()},
                                labels)
  head_only = adaact_optax.adaact(0.1)      # an optimizer that never sees the backbone
  params = _init()
  s_part, s_head = partitioned.init(params), head_only.init({"Dense_1": params["Dense_1"]})
  head = params["Dense_1"]

  @jax.jit
  def step(params, head, s_part, s_head, batch):
    grads, stats = _grads_and_stats(params, batch)       # statistics of every layer
    u_part, s_part = partitioned.update(grads, s_part, params, activation_stats=stats)
    g_head = {"Dense_1": _grads_and_stats({**params, "Dense_1": head}, batch)[0]["Dense_1"]}
    u_head, s_head = head_only.update(g_head, s_head, {"Dense_1": head}, activation_stats=stats)
    return (optax.apply_updates(params, u_part), optax.apply_updates({"Dense_1": head}, u_head),
            s_part, s_head, stats)

  tokens, x, _ = _batch(1)
  for t in range(3):
    new_params, new_head, s_part, s_head, stats = step(params, head, s_part, s_head,
                                                       _batch(1 + t))
    if t == 0:  # step 1 by hand: Dense_1's input is relu(Dense_0(LayerNorm(h)))
      p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
      h = np.concatenate([p["Embed_0"]["embedding"][np.asarray(tokens)].mean(1), x], -1)
      h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
      h = h * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]
      a = np.mean(np.maximum(h @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0) ** 2, 0)
      np.testing.assert_allclose(stats["Dense_1"]["kernel"][:, 0], a, rtol=1e-5)
      g = _grads_and_stats(params, _batch(1))[0]["Dense_1"]["kernel"]
      w = params["Dense_1"]["kernel"]
      np.testing.assert_allclose(
          new_params["Dense_1"]["kernel"],
          w - 0.1 * (g / (np.sqrt(a)[:, None] + 1e-8) + 2e-3 * w), rtol=1e-5, atol=1e-7)
    for module in ("Dense_0", "Embed_0", "LayerNorm_0"):
      _assert_trees_equal(new_params[module], params[module])   # frozen
    jax.tree.map(lambda u, r: np.testing.assert_allclose(u, r, rtol=1e-6, atol=1e-7),
                 new_params["Dense_1"], new_head["Dense_1"])
    params, head = new_params, new_head["Dense_1"]


def test_masked_adaact_ignores_the_statistics_of_masked_parameters():
  mask = {"Dense_0": True, "Dense_1": False, "Embed_0": False, "LayerNorm_0": False}
  tx = optax.masked(adaact_optax.adaact(0.1), mask)
  params = _init()
  grads, stats = _grads_and_stats(params, _batch(1))
  updates, state = jax.jit(lambda g, s, p, a: tx.update(g, s, p, activation_stats=a))(
      grads, tx.init(params), params, stats)
  _assert_trees_equal(updates["Dense_1"], grads["Dense_1"])  # masked: passed through
  ref, _ = adaact_optax.adaact(0.1).update(grads, adaact_optax.adaact(0.1).init(params), params,
                                           activation_stats=stats)
  assert_f32_close(updates["Dense_0"], ref["Dense_0"])
  assert float(jnp.min(state.inner_state[0].nu["Dense_0"]["kernel"])) > 0


def test_apply_if_finite_skips_a_nan_step():
  tx = optax.apply_if_finite(adaact_optax.adaact(0.1), max_consecutive_errors=3)
  params, state = _train(tx, steps=2)
  tokens, x, y = _batch(9)
  nan_batch = (tokens, x.at[0, 0].set(jnp.nan), y)
  grads, stats = _grads_and_stats(params, nan_batch)
  assert not bool(jnp.isfinite(grads["Dense_0"]["kernel"]).all())
  updates, new_state = jax.jit(
      lambda g, s, p, a: tx.update(g, s, p, activation_stats=a))(grads, state, params, stats)
  _assert_trees_equal(optax.apply_updates(params, updates), params)
  _assert_trees_equal(new_state.inner_state, state.inner_state)
  assert int(new_state.total_notfinite) == 1
  # The next finite step continues from the untouched state.
  after, final = _train(tx, steps=1, params=params, opt_state=new_state, first_batch=10)
  assert int(final.inner_state[0].count) == 3
  assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(after))


# --- optax.lookahead: adaact_optax.lookahead passes the statistics on --------

def _lookahead_reference(params, batches, sync_period, slow_step_size, reset_state):
  """Lookahead by hand: AdaAct on the fast weights; every ``sync_period`` steps the slow
  weights move ``slow_step_size`` towards them and the fast ones restart there."""
  tx = adaact_optax.adaact(0.1)
  step = jax.jit(lambda p, s, x, y: _tx_step(tx, p, s, x, y))
  fast, slow, state = params, params, tx.init(params)
  for t, (x, y) in enumerate(batches):
    fast, state = step(fast, state, x, y)
    if (t + 1) % sync_period == 0:
      slow = jax.tree.map(lambda s, f: s + slow_step_size * (f - s), slow, fast)
      fast = slow
      state = tx.init(fast) if reset_state else state
  return fast, slow


def _tx_step(tx, params, state, x, y):
  (_, stats), grads = jax.value_and_grad(mlp_loss_and_stats, has_aux=True)(params, x, y)
  updates, state = tx.update(grads, state, params, activation_stats=stats)
  return optax.apply_updates(params, updates), state


@pytest.mark.parametrize("reset_state", [False, True])
def test_lookahead_passes_the_statistics_to_adaact(reset_state):
  params, batches = mlp_params(jax.random.key(0)), mlp_batches(7)
  tx = adaact_optax.lookahead(adaact_optax.adaact(0.1), sync_period=3, slow_step_size=0.5,
                              reset_state=reset_state)
  pair = optax.LookaheadParams.init_synced(params)
  state = tx.init(pair)
  step = jax.jit(lambda p, s, x, y: _pair_step(tx, p, s, x, y))
  for x, y in batches:
    pair, state = step(pair, state, x, y)
  assert int(state.fast_state[0].count) == (1 if reset_state else 7)
  fast, slow = _lookahead_reference(params, batches, 3, 0.5, reset_state)
  assert_f32_close(pair.slow, slow, steps=len(batches))
  assert_f32_close(pair.fast, fast, steps=len(batches))


def _pair_step(tx, pair, state, x, y):
  (_, stats), grads = jax.value_and_grad(mlp_loss_and_stats, has_aux=True)(pair.fast, x, y)
  updates, state = tx.update(grads, state, pair, activation_stats=stats)
  return optax.apply_updates(pair, updates), state


def test_optax_lookahead_cannot_pass_the_statistics_and_the_error_says_what_to_use():
  params = mlp_params(jax.random.key(0))
  pair = optax.LookaheadParams.init_synced(params)
  x, y = mlp_batches(1)[0]
  (_, stats), grads = jax.value_and_grad(mlp_loss_and_stats, has_aux=True)(params, x, y)
  plain = optax.lookahead(adaact_optax.adaact(0.1), sync_period=3, slow_step_size=0.5)
  with pytest.raises(TypeError, match="activation_stats"):   # optax's own signature
    plain.update(grads, plain.init(pair), pair, activation_stats=stats)
  chained = optax.chain(plain)   # drops the statistics: AdaAct says where they went
  with pytest.raises(ValueError, match="optax.lookahead.*adaact_optax.lookahead"):
    chained.update(grads, chained.init(pair), pair, activation_stats=stats)
  ours = adaact_optax.lookahead(adaact_optax.adaact(0.1), sync_period=3, slow_step_size=0.5)
  with pytest.raises(ValueError, match="LookaheadParams.*init_synced"):
    ours.update(grads, ours.init(params), params, activation_stats=stats)
