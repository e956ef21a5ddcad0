"""row_mask follows the inputs' (B, T) axes through the computation, not by shape alone:
- a time-major activation with B == T gets the mask transposed with it;
- a scan over time (lax.scan, nn.RNN, nnx.scan) sees the mask sliced at each step.
(Found by an adversarial pass: the first version matched the mask to a layer input by shape.)
"""

import jax
import jax.numpy as jnp
import numpy as np

import adaact_optax
from conftest import assert_f32_close

X = np.asarray(jax.random.normal(jax.random.key(0), (3, 3, 2)))       # (B, T, D), B == T
MASK = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], np.float32)         # (B, T)
EXPECTED = np.mean(X[MASK == 1] ** 2, 0)[:, None]                       # (D, 1)
PARAMS = {"w": jnp.ones((2, 4))}


def test_row_mask_follows_a_transpose_to_time_major():
  def loss(p, x):
    return jnp.sum(jnp.swapaxes(x, 0, 1) @ p["w"])                     # rows are (t, b) here
  _, _, stats = adaact_optax.value_grad_and_stats(loss)(PARAMS, X, row_mask=MASK)
  assert_f32_close(stats["w"], EXPECTED)


def test_row_mask_reaches_a_scan_over_time():
  def loss(p, x):
    step = lambda h, xt: (jnp.tanh(xt @ p["w"] + h), None)            # xt: (B, D) at step t
    h, _ = jax.lax.scan(step, jnp.zeros((3, 4)), jnp.swapaxes(x, 0, 1))
    return jnp.sum(h)
  _, _, stats = adaact_optax.value_grad_and_stats(loss)(PARAMS, X, row_mask=MASK)
  assert_f32_close(stats["w"], EXPECTED)
