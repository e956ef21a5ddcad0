"""FAILING on purpose (engine bugs for the lead, found by helper A): row_mask is matched to a
weight's input by shape only (capture._row_weights: ``a.shape[:mask.ndim] == mask.shape``),
not by following the input's axes from the model's inputs. So an activation whose (B, T) axes
were permuted or sliced before its matmul gets the wrong mask or none, silently:
  - time-major activations with B == T: the mask is applied transposed (wrong rows drop out);
  - a scan over time (lax.scan, nn.RNN, nnx.scan): the body sees (B, d) per step, the mask
    (B, T) does not match, and padded time steps count.
"""

import jax
import jax.numpy as jnp
import numpy as np

import adaact_optax

X = np.asarray(jax.random.normal(jax.random.key(0), (3, 3, 2)))       # (B, T, D), B == T
MASK = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], np.float32)         # (B, T)
EXPECTED = np.mean(X[MASK == 1] ** 2, 0)[:, None]                       # (D, 1)
PARAMS = {"w": jnp.ones((2, 4))}


def test_row_mask_follows_a_transpose_to_time_major():
  def loss(p, x):
    return jnp.sum(jnp.swapaxes(x, 0, 1) @ p["w"])                     # rows are (t, b) here
  _, _, stats = adaact_optax.value_grad_and_stats(loss)(PARAMS, X, row_mask=MASK)
  np.testing.assert_allclose(stats["w"], EXPECTED, rtol=1e-5)


def test_row_mask_reaches_a_scan_over_time():
  def loss(p, x):
    step = lambda h, xt: (jnp.tanh(xt @ p["w"] + h), None)            # xt: (B, D) at step t
    h, _ = jax.lax.scan(step, jnp.zeros((3, 4)), jnp.swapaxes(x, 0, 1))
    return jnp.sum(h)
  _, _, stats = adaact_optax.value_grad_and_stats(loss)(PARAMS, X, row_mask=MASK)
  np.testing.assert_allclose(stats["w"], EXPECTED, rtol=1e-5)
