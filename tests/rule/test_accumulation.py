"""Gradient accumulation: k micro-batches == one step on their concatenation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import adaact_optax
from conftest import assert_f32_close, linen_loss_grads_and_stats


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Dense(16)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
    x = nn.relu(nn.Conv(8, (3, 3), strides=2, padding="SAME")(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


class BNCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(4, (3, 3), padding="SAME", use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def _digits(n, offset=0):
  x, y = load_digits(return_X_y=True)
  x = (x[offset:offset + n] / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(y[offset:offset + n], jnp.int32)


def _make_step(model, tx):
  """A jitted step: grads and statistics of (x, y), then ``tx.update``."""

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    loss, grads, stats, batch_stats = linen_loss_grads_and_stats(model, params, x, y, batch_stats)
    updates, opt_state = tx.update(grads, opt_state, params, activation_stats=stats)
    return optax.apply_updates(params, updates), batch_stats, opt_state, updates, loss, stats

  return step


# k micro-batches against their concatenation: another program, whose means over
# rows and forward and backward passes round differently each step.
STEP_ULPS = 64


def _accumulate(model, k, outer_steps, batch=16, accumulator=adaact_optax.MultiSteps):
  """Trains with ``k`` micro-batches per step; returns the params, opt_state, updates."""
  x, y = _digits(batch * outer_steps)
  variables = model.init(jax.random.key(0), x[:2])
  params, batch_stats = variables["params"], variables.get("batch_stats", {})
  tx = accumulator(adaact_optax.adaact(0.1), every_k_schedule=k)
  step = _make_step(model, tx)
  opt_state, micro = tx.init(params), batch // k
  all_updates = []
  for i in range(outer_steps * k):
    sl = slice(i * micro, (i + 1) * micro)
    params, batch_stats, opt_state, updates, _, _ = step(params, batch_stats, opt_state,
                                                         x[sl], y[sl])
    all_updates.append(updates)
  return params, opt_state, all_updates


@pytest.mark.parametrize("model", [MLP(), CNN()], ids=["mlp", "cnn"])
def test_k_micro_batches_equal_one_step_on_the_concatenated_batch(model):
  k, outer = 4, 2
  params, state, updates = _accumulate(model, k, outer)
  full_params, full_state, _ = _accumulate(model, 1, outer)
  assert_f32_close(params, full_params, steps=outer, ulps_per_step=STEP_ULPS)
  inner = state.inner_opt_state[0]
  full_inner = full_state.inner_opt_state[0]
  assert int(inner.count) == int(full_inner.count) == outer
  assert_f32_close(inner.nu, full_inner.nu, steps=outer, ulps_per_step=STEP_ULPS)
  assert_f32_close(inner.mu, full_inner.mu, steps=outer, ulps_per_step=STEP_ULPS)
  # Between emissions the wrapper proposes nothing and holds running means.
  for i, u in enumerate(updates):
    if i % k != k - 1:
      assert all(not jnp.any(leaf) for leaf in jax.tree.leaves(u))
  assert all(not jnp.any(leaf) for leaf in jax.tree.leaves(state.acc_stats))


def test_optax_multisteps_alone_sees_only_the_last_micro_batch():
  # Why the wrapper exists: optax.MultiSteps forwards the current call's
  # activation_stats, so AdaAct's second moment would follow the last micro-batch.
  _, plain, _ = _accumulate(MLP(), 4, 1, accumulator=optax.MultiSteps)
  _, ours, _ = _accumulate(MLP(), 1, 1)
  x_last = _digits(16)[0][12:16]
  last_only = (1 - np.float32(0.999)) * jnp.mean(jnp.square(x_last.reshape(4, -1)), axis=0)
  last_only = last_only[:, None]  # the state's keep-rank (in, 1) layout
  assert_f32_close(plain.inner_opt_state[0].nu["Dense_0"]["kernel"], last_only)
  assert not np.allclose(plain.inner_opt_state[0].nu["Dense_0"]["kernel"],
                         ours.inner_opt_state[0].nu["Dense_0"]["kernel"], rtol=1e-3)


def test_a_skipped_micro_batch_leaves_the_statistics_untouched():
  model, k = MLP(), 2
  x, y = _digits(8)
  params = model.init(jax.random.key(0), x[:2])["params"]
  tx = adaact_optax.MultiSteps(adaact_optax.adaact(0.1), every_k_schedule=k,
                               should_skip_update_fn=optax.skip_not_finite)
  step = _make_step(model, tx)
  ref_step = _make_step(model, adaact_optax.adaact(0.1))
  state = tx.init(params)
  p, _, state, _, _, _ = step(params, {}, state, x[:4], y[:4])
  before = state.acc_stats
  p, _, state, _, _, _ = step(p, {}, state, x[4:8].at[0, 0, 0, 0].set(jnp.nan), y[4:8])
  assert int(state.mini_step) == 1
  jax.tree.map(np.testing.assert_array_equal, state.acc_stats, before)  # kept as they were
  p, _, state, _, _, _ = step(p, {}, state, x[4:8], y[4:8])
  ref, _, ref_state, _, _, _ = ref_step(params, {}, adaact_optax.adaact(0.1).init(params),
                                        x, y)
  assert_f32_close(p, ref, ulps_per_step=STEP_ULPS)
  assert_f32_close(state.inner_opt_state[0].nu, ref_state[0].nu, ulps_per_step=STEP_ULPS)


def test_statistics_are_averaged_even_when_gradients_are_summed():
  model = MLP()
  x, y = _digits(8)
  params = model.init(jax.random.key(0), x[:2])["params"]
  tx = adaact_optax.MultiSteps(adaact_optax.adaact(0.1), every_k_schedule=3,
                               use_grad_mean=False)
  step = _make_step(model, tx)
  state = tx.init(params)
  _, _, state, _, _, s1 = step(params, {}, state, x[:4], y[:4])
  _, _, state, _, _, s2 = step(params, {}, state, x[4:8], y[4:8])
  expected = (s1["Dense_0"]["kernel"] + s2["Dense_0"]["kernel"]) / 2
  expected = expected.reshape(state.acc_stats["Dense_0"]["kernel"].shape)  # keep-rank (in, 1)
  assert_f32_close(state.acc_stats["Dense_0"]["kernel"], expected)


def test_batchnorm_model_accumulates_the_micro_batch_statistics_and_trains():
  # BatchNorm normalises each micro-batch with its own mean and variance, so
  # k micro-batches are not the concatenated batch (nor with optax alone);
  # the statistics are still exactly the mean of what the layers saw.
  model, k = BNCNN(), 2
  x, y = _digits(64)
  variables = model.init(jax.random.key(0), x[:2])
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = adaact_optax.MultiSteps(adaact_optax.adaact(0.1), every_k_schedule=k)
  step = _make_step(model, tx)
  state = tx.init(params)
  seen, losses = [], []
  for epoch in range(6):
    for i in range(4 * k):
      sl = slice(i * 8, (i + 1) * 8)
      params, batch_stats, state, _, loss, stats = step(params, batch_stats, state,
                                                        x[sl], y[sl])
      losses.append(float(loss))
      if epoch == 0 and i < k:
        seen.append(stats["Dense_0"]["kernel"])
  first = (1 - np.float32(0.999)) * (seen[0] + seen[1]) / 2
  first = first.reshape(-1, 1)  # the state's keep-rank (in, 1) layout
  assert int(state.inner_opt_state[0].count) == 6 * 4
  assert np.mean(losses[-8:]) < 0.3 * np.mean(losses[:8])
  # The first emitted step's nu is (1 - b2) times the mean of the two micro-batches.
  params0 = model.init(jax.random.key(0), x[:2])
  state0 = tx.init(params0["params"])
  step0 = _make_step(model, tx)
  _, _, state0, _, _, _ = step0(params0["params"], params0["batch_stats"], state0, x[:8], y[:8])
  _, _, state0, _, _, _ = step0(params0["params"], params0["batch_stats"], state0, x[8:16],
                                y[8:16])
  assert_f32_close(state0.inner_opt_state[0].nu["Dense_0"]["kernel"], first)


def test_train_state_with_accumulation():
  model = MLP()
  x, y = _digits(8)
  params = model.init(jax.random.key(0), x[:2])["params"]
  tx = adaact_optax.MultiSteps(adaact_optax.adaact(0.1), every_k_schedule=2)
  state = adaact_optax.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=tx.gradient_transformation())

  @jax.jit
  def train_step(state, x, y):
    _, grads, stats, _ = linen_loss_grads_and_stats(model, state.params, x, y)
    return state.apply_gradients(grads=grads, activation_stats=stats)

  state = train_step(train_step(state, x[:4], y[:4]), x[4:], y[4:])
  assert bool(tx.has_updated(state.opt_state))
  ref, _, _, _, _, _ = _make_step(model, adaact_optax.adaact(0.1))(
      params, {}, adaact_optax.adaact(0.1).init(params), x, y)
  assert_f32_close(state.params, ref, ulps_per_step=STEP_ULPS)


def test_nnx_optimizer_with_a_grouped_convolution():
  from flax import nnx
  from adaact_optax import nnx as aa_nnx

  class Grouped(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(4, 8, (3, 3), feature_group_count=2, rngs=rngs)
      self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
      return self.head(nnx.relu(self.conv(x)).mean((1, 2)))

  x = jax.random.normal(jax.random.key(0), (16, 6, 6, 4))
  y = jnp.arange(16) % 10

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(m):
      logits, stats = aa_nnx.apply(m, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats
    grads, stats = nnx.grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, activation_stats=stats)

  def train(k):
    model = Grouped(nnx.Rngs(0))
    shapes = aa_nnx.stats_shapes(model, x[:2])  # per input channel and group, not (3, 3, 2, 1)
    tx = adaact_optax.MultiSteps(adaact_optax.adaact(0.1, stats_shapes=shapes), k,
                                 stats_shapes=shapes)
    optimizer = nnx.Optimizer(model, tx.gradient_transformation(), wrt=nnx.Param)
    micro = 16 // k
    for i in range(2 * k):
      sl = slice((i % k) * micro, (i % k + 1) * micro)
      step(model, optimizer, x[sl], y[sl])
    return nnx.state(model, nnx.Param), nnx.as_pure(optimizer.opt_state)

  params, state = train(4)
  full_params, full_state = train(1)
  assert state.acc_stats["conv"]["kernel"].shape == (3, 3, 2, 2)  # (*k, C/G, G)
  assert_f32_close(params, full_params, steps=2, ulps_per_step=STEP_ULPS)
  assert_f32_close(state.inner_opt_state[0].nu, full_state.inner_opt_state[0].nu, steps=2,
                   ulps_per_step=STEP_ULPS)


def test_state_fields_follow_optax():
  # The state is optax.MultiStepsState's fields (by name) plus acc_stats; if
  # optax adds a field, this fails instead of the wrapper misplacing one.
  assert adaact_optax.MultiStepsState._fields == optax.MultiStepsState._fields + ("acc_stats",)
  tx = adaact_optax.MultiSteps(adaact_optax.adaact(0.1), every_k_schedule=2)
  state = tx.init({"w": jnp.ones((3, 2))})
  assert not isinstance(tx, optax.MultiSteps)   # composed, not subclassed
  assert tx.inner_opt is not None and not bool(tx.has_updated(state))
