"""The run behind tests/fixtures/checkpoint_0_1_0, for adaact-optax 0.1.0 and the current code.

Pure JAX (no Flax) so the same code runs against either version of the package.
"""

import jax
import jax.numpy as jnp
import optax

STEPS = 3


def init_params():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {"dense": {"kernel": jax.random.normal(k1, (6, 4)) * 0.5, "bias": jnp.zeros(4)},
          "conv": {"kernel": jax.random.normal(k2, (2, 2, 6)) * 0.5},   # (k, C/G, C_out), G=2
          "head": {"kernel": jax.random.normal(k3, (6, 3)) * 0.5}}


def loss_and_stats(params, x, y, legacy):
  """Dense -> grouped conv (as a matmul per group) -> head; statistics per weight."""
  h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])   # (B, 4) = C
  # A 1-D "conv" of kernel size 2 on the two halves of h... kept as a plain grouped map:
  # rows (B, k=2, C=4), group g reads channels 2g..2g+1, writes outputs 3g..3g+2.
  rows = jnp.stack([h, h[:, ::-1]], axis=1)                                # (B, 2, 4)
  w = params["conv"]["kernel"]                                             # (2, 2, 6)
  out = jnp.concatenate([jnp.einsum("bkc,kco->bo", rows[:, :, 2 * g:2 * g + 2],
                                    w[:, :, 3 * g:3 * g + 3]) for g in range(2)], -1)
  logits = jnp.tanh(out) @ params["head"]["kernel"]
  loss = jnp.mean((logits - y) ** 2)
  mean_sq = jnp.mean(rows ** 2, axis=0)                                    # (k, C)
  if legacy:  # 0.1.0 layout: K[:-1], () for vectors, (*k, C) for the grouped kernel
    stats = {"dense": {"kernel": jnp.mean(x ** 2, 0), "bias": jnp.ones(())},
             "conv": {"kernel": mean_sq},
             "head": {"kernel": jnp.mean(jnp.tanh(out) ** 2, 0)}}
  else:       # keep-rank
    stats = {"dense": {"kernel": jnp.mean(x ** 2, 0)[:, None], "bias": jnp.ones((1,))},
             "conv": {"kernel": jnp.swapaxes(mean_sq.reshape(2, 2, 2), -1, -2)},  # (k, C/G, G)
             "head": {"kernel": jnp.mean(jnp.tanh(out) ** 2, 0)[:, None]}}
  return loss, stats


def batch(t):
  kx, ky = jax.random.split(jax.random.key(100 + t))
  return jax.random.normal(kx, (8, 6)), jax.random.normal(ky, (8, 3))


def make_tx(package, legacy):
  stats_shapes = jax.eval_shape(lambda p: loss_and_stats(p, *batch(0), legacy)[1], init_params())
  inner = package.adaact(optax.linear_schedule(0.1, 0.05, 4), stats_shapes=stats_shapes)
  return package.MultiSteps(inner, every_k_schedule=2, stats_shapes=stats_shapes)


def run(package, legacy, steps=STEPS, params=None, opt_state=None, first=0):
  """``steps`` steps of the optimizer; returns (params, opt_state)."""
  tx = make_tx(package, legacy)
  params = init_params() if params is None else params
  opt_state = tx.init(params) if opt_state is None else opt_state

  @jax.jit
  def step(params, opt_state, x, y):
    (_, stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(params, x, y, legacy)
    updates, opt_state = tx.update(grads, opt_state, params, activation_stats=stats)
    return optax.apply_updates(params, updates), opt_state

  for t in range(first, first + steps):
    params, opt_state = step(params, opt_state, *batch(t))
  return params, opt_state
