"""bfloat16 models: float32 statistics and second moment, momentum in mu_dtype."""

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
  """64 -> 64 -> 10; ``dtype`` for activations, ``param_dtype`` for weights."""

  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(nn.Dense(64, **kw)(x.astype(self.dtype)))
    return nn.Dense(10, **kw)(x)


def _digits():
  x, y = load_digits(return_X_y=True)
  perm = np.random.RandomState(0).permutation(len(x))
  x, y = (x[perm] / 16.0).astype(np.float32), y[perm].astype(np.int32)
  return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _step_fn(model, tx):
  @jax.jit
  def step(params, opt_state, x, y):
    _, grads, stats, _ = linen_loss_grads_and_stats(model, params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, activation_stats=stats)
    return optax.apply_updates(params, updates), opt_state, updates, stats
  return step


@pytest.mark.parametrize("mu_dtype", [None, jnp.float32, jnp.bfloat16])
def test_state_and_statistics_dtypes_with_bfloat16_params(mu_dtype):
  model = MLP(jnp.bfloat16, jnp.bfloat16)
  (x, y), _ = _digits()
  params = model.init(jax.random.key(0), x[:2])["params"]
  tx = adaact_optax.adaact(0.1, mu_dtype=mu_dtype)
  params, state, updates, stats = _step_fn(model, tx)(params, tx.init(params), x[:32], y[:32])
  dtypes = lambda tree: set(jax.tree.leaves(jax.tree.map(lambda a: a.dtype, tree)))
  assert dtypes(stats) == {jnp.dtype(jnp.float32)}         # statistics: float32
  scale_state = state[0]
  assert scale_state.count.dtype == jnp.int32
  assert dtypes(scale_state.nu) == {jnp.dtype(jnp.float32)}  # second moment: float32
  assert dtypes(scale_state.mu) == {jnp.dtype(mu_dtype or jnp.bfloat16)}  # params' by default
  assert dtypes(updates) == dtypes(params) == {jnp.dtype(jnp.bfloat16)}
  # The first layer's statistic is the float32 mean of the squared bf16 inputs.
  xb = np.asarray(jnp.asarray(x[:32], jnp.bfloat16).astype(jnp.float32))
  assert_f32_close(stats["Dense_0"]["kernel"][:, 0], np.mean(xb * xb, axis=0))


def _accuracy(model, epochs=10, batch=50, lr=0.1):
  (x, y), (x_test, y_test) = _digits()
  params = model.init(jax.random.key(0), x[:2])["params"]
  tx = adaact_optax.adaact(lr)
  state, step = tx.init(params), _step_fn(model, tx)
  for _ in range(epochs):
    for i in range(0, len(x), batch):
      params, state, _, _ = step(params, state, x[i:i + batch], y[i:i + batch])
  logits = model.apply({"params": params}, x_test)
  return float(np.mean(np.asarray(logits.argmax(-1)) == y_test))


@pytest.fixture(scope="module")
def float32_accuracy():
  return _accuracy(MLP())


@pytest.mark.parametrize("dtype,param_dtype", [
    (jnp.bfloat16, jnp.bfloat16),  # bf16 params and activations
    (jnp.bfloat16, jnp.float32),   # float32 master params, bf16 compute
], ids=["bf16-params", "f32-params-bf16-compute"])
def test_bfloat16_model_trains_within_one_point_of_float32(float32_accuracy, dtype, param_dtype):
  assert float32_accuracy > 0.9
  accuracy = _accuracy(MLP(dtype, param_dtype))
  assert abs(accuracy - float32_accuracy) <= 0.01, (accuracy, float32_accuracy)


def test_inject_hyperparams_with_bfloat16_params_needs_float32_hyperparams():
  # inject_hyperparams casts hyperparameters to the params' dtype by default;
  # in bf16, b2=0.999 rounds to 1.0 and the second moment never moves.
  assert float(jnp.bfloat16(0.999)) == 1.0
  model = MLP(jnp.bfloat16, jnp.bfloat16)
  (x, y), _ = _digits()
  params = model.init(jax.random.key(0), x[:2])["params"]
  tx = optax.inject_hyperparams(adaact_optax.adaact, hyperparam_dtype=jnp.float32)(0.1)
  _, state, _, _ = _step_fn(model, tx)(params, tx.init(params), x[:32], y[:32])
  assert state.hyperparams["b2"].dtype == jnp.float32
  plain = adaact_optax.adaact(0.1)
  _, ref, _, _ = _step_fn(model, plain)(params, plain.init(params), x[:32], y[:32])
  assert_f32_close(state.inner_state[0].nu, ref[0].nu)   # hyperparameters as arrays: another program
