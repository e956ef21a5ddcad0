"""The pure-JAX MLP several test folders train: parameters, a loss that reports each
layer's input moments, random batches and a jitted training loop (no Flax)."""

import jax
import jax.numpy as jnp
import optax

from adaact_optax import moments


def mlp_params(key, sizes=(6, 5, 3)):
  keys = jax.random.split(key, len(sizes))
  return {f"layer{i}": {"w": jax.random.normal(keys[i], (a, b)) * 0.5, "b": jnp.zeros((b,))}
          for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def mlp_loss_and_stats(params, x, y):
  """A pure-JAX MLP that reports each layer's input moments next to its loss."""
  stats = {}
  h = x
  for i in range(len(params)):
    p = params[f"layer{i}"]
    stats[f"layer{i}"] = {"w": moments.dense_moments(h).mean, "b": moments.constant_moments().mean}
    h = h @ p["w"] + p["b"]
    if i < len(params) - 1:
      h = jnp.tanh(h)
  return jnp.mean((h - y) ** 2), stats


def train_mlp(tx, params, batches, transform=jax.jit):
  """``tx`` on ``mlp_loss_and_stats`` over ``batches``: ``(params, opt_state)``."""
  state = tx.init(params)

  @transform
  def step(params, state, x, y):
    (_, stats), grads = jax.value_and_grad(mlp_loss_and_stats, has_aux=True)(params, x, y)
    updates, state = tx.update(grads, state, params, activation_stats=stats)
    return optax.apply_updates(params, updates), state

  for x, y in batches:
    params, state = step(params, state, x, y)
  return params, state


def mlp_batches(n, key=jax.random.key(1)):
  out = []
  for k in jax.random.split(key, n):
    kx, ky = jax.random.split(k)
    out.append((jax.random.normal(kx, (8, 6)) * 2.0, jax.random.normal(ky, (8, 3))))
  return out
