"""Donated train steps: every optimizer-state leaf is its own buffer.

The usual large-model step is ``jax.jit(step, donate_argnums=(0, 1))``: XLA
reuses the buffers of the params and the optimizer state for the new ones.
JAX refuses to donate one buffer twice, so ``tx.init`` must never put the
same array object in two leaves (``count`` and ``skipped`` once shared one
zero). The sharded donated step is in test_multidevice.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaact_optax
from _mlp import mlp_batches as _batches, mlp_loss_and_stats, mlp_params

STATS_SHAPES = jax.eval_shape(lambda p: mlp_loss_and_stats(p, *_batches(1)[0])[1],
                              mlp_params(jax.random.key(0)))


def _rms_chain():
  return optax.chain(optax.ema(0.9, debias=True), adaact_optax.scale_by_activation_rms(),
                     optax.scale(-0.1))


def _scale_by_adaact():
  return optax.chain(adaact_optax.scale_by_adaact(), optax.scale(-0.1))


def _unmatched_adamw():
  # Only layer0 has statistics: layer1 goes to the optax optimizer.
  shapes = {"layer0": STATS_SHAPES["layer0"]}
  return adaact_optax.adaact(0.1, unmatched=optax.adamw(1e-3), stats_shapes=shapes)


OPTIMIZERS = {
    "adaact": lambda: adaact_optax.adaact(optax.linear_schedule(0.1, 0.01, 10)),
    "scale_by_adaact": _scale_by_adaact,
    "scale_by_activation_rms": _rms_chain,
    "MultiSteps": lambda: adaact_optax.MultiSteps(adaact_optax.adaact(0.1),
                                                  2).gradient_transformation(),
    "unmatched=adamw": _unmatched_adamw,
    "inject_hyperparams": lambda: optax.inject_hyperparams(adaact_optax.adaact)(
        learning_rate=0.1),
}


def _keep_layer0_stats(tx_name, stats):
  return {"layer0": stats["layer0"]} if tx_name == "unmatched=adamw" else stats


def _buffers(tree):
  return [(jax.tree_util.keystr(path), leaf.unsafe_buffer_pointer())
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if isinstance(leaf, jax.Array)]


def _assert_no_shared_buffers(tree):
  seen = {}
  for name, pointer in _buffers(tree):
    assert pointer not in seen, f"{name} shares its buffer with {seen[pointer]}"
    seen[pointer] = name


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_init_gives_every_state_leaf_its_own_buffer(name):
  params = mlp_params(jax.random.key(0))
  _assert_no_shared_buffers((params, OPTIMIZERS[name]().init(params)))


def test_train_state_create_gives_every_leaf_its_own_buffer():
  model = nn.Dense(3)
  params = model.init(jax.random.key(0), jnp.ones((2, 4)))["params"]
  state = adaact_optax.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=adaact_optax.adaact(0.1))
  _assert_no_shared_buffers(state)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_donated_step_trains(name):
  tx = OPTIMIZERS[name]()
  params = mlp_params(jax.random.key(0))
  opt_state = tx.init(params)

  @jax.jit
  def reference(params, opt_state, x, y):
    _, grads, stats = adaact_optax.value_grad_and_stats(
        lambda p: mlp_loss_and_stats(p, x, y)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   activation_stats=_keep_layer0_stats(name, stats))
    return optax.apply_updates(params, updates), opt_state

  donated = jax.jit(reference.__wrapped__, donate_argnums=(0, 1))
  ref = (params, opt_state)
  for x, y in _batches(3):
    ref = reference(*ref, x, y)
    old_params = params
    params, opt_state = donated(params, opt_state, x, y)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old_params))  # really donated
  # The same program with and without donation: the same numbers.
  jax.tree.map(np.testing.assert_array_equal, (params, opt_state), ref)


def test_a_donated_train_state_step_trains():
  model = nn.Sequential([nn.Dense(5), nn.tanh, nn.Dense(3)])
  x, y = _batches(1)[0]
  params = model.init(jax.random.key(0), x)["params"]
  state = adaact_optax.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=adaact_optax.adaact(0.1))

  @jax.jit
  def step(state, x, y):
    def loss_fn(params):
      out, mutated = adaact_optax.linen.apply(model, {"params": params}, x)
      return jnp.mean((out - y) ** 2), mutated[adaact_optax.linen.COLLECTION]

    grads, stats = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, activation_stats=stats)

  donated = jax.jit(step.__wrapped__, donate_argnums=0)
  ref = step(state, x, y)
  for _ in range(2):
    state = donated(state, x, y)
  ref = step(ref, x, y)
  assert int(state.step) == 2
  jax.tree.map(np.testing.assert_array_equal, state.params, ref.params)
