"""Zero rows leave V alone: the capture's ``-0.0`` marker and the transforms that read it.

A weight that met no rows in a step (the ``lax.cond`` branch not taken, an
expert routed no tokens) has no statistic; the capture marks it ``-0.0`` and
AdaAct keeps that feature's second moment instead of decaying it towards 0.
The references below are numpy re-implementations of the rule that update a
weight's ``V`` only on the steps its rows existed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import adaact_optax
from _bruteforce import mean_sq, normal

B1, B2, EPS = 0.9, 0.5, 1e-8   # b2 far from 1 so a wrong decay shows within a few steps
# float32 against float64 over a handful of steps.
RTOL, ATOL = 2e-5, 1e-7


def _branchy(params, x, flag):
  """``a`` meets all 6 rows of x in one branch, ``b`` the first 3 rows (doubled) in the other;
  ``head`` meets the branch output every step."""
  h = lax.cond(flag, lambda x: jnp.tanh(x @ params["a"]),
               lambda x: jnp.tanh(jnp.concatenate([(2.0 * x[:3]) @ params["b"]] * 2)), x)
  return jnp.sum(jnp.sin(h @ params["head"]))


def _branch_rows(x, flag):
  """What each weight met at this step (None: no rows), in numpy."""
  x = np.asarray(x, np.float64)
  return {"a": x if flag else None, "b": None if flag else 2.0 * x[:3]}


def _is_no_rows(a) -> np.ndarray:
  a = np.asarray(a)
  return (a == 0) & np.signbit(a)


def test_capture_marks_the_branch_not_taken():
  params = {"a": normal(1, 4, 3), "b": normal(2, 4, 3), "head": normal(3, 3, 2)}
  x = normal(4, 6, 4)
  g = jax.jit(adaact_optax.value_grad_and_stats(_branchy))
  for flag in (True, False):
    _, _, stats = g(params, x, jnp.asarray(flag))
    rows = _branch_rows(x, flag)
    taken, other = ("a", "b") if flag else ("b", "a")
    np.testing.assert_allclose(stats[taken][:, 0], mean_sq(rows[taken], 0), rtol=RTOL)
    assert stats[other].shape == (4, 1) and _is_no_rows(stats[other]).all(), stats[other]
    assert not np.signbit(np.asarray(stats["head"])).any()
  shapes = adaact_optax.stats_shapes(_branchy, params, x, jnp.asarray(True))
  assert shapes["a"].shape == shapes["b"].shape == (4, 1)


def test_alternating_branches_update_each_weight_only_when_its_branch_ran():
  """Five steps alternating the branches: V (and the updates) of each branch's weight
  against a numpy AdaAct that updates a weight's V only on the steps its branch ran."""
  params = {"a": normal(1, 4, 3), "b": normal(2, 4, 3), "head": normal(3, 3, 2)}
  flags = [True, False, False, True, False]
  xs = [normal(10 + t, 6, 4) for t in range(len(flags))]
  tx = adaact_optax.scale_by_adaact(B1, B2, EPS)
  grad_and_stats = adaact_optax.value_grad_and_stats(_branchy)

  @jax.jit
  def step(params, state, x, flag):
    _, grads, stats = grad_and_stats(params, x, flag)
    updates, state = tx.update(grads, state, params, activation_stats=stats)
    return optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, updates)), state, \
        updates, grads

  state = tx.init(params)
  ref_m = {k: np.zeros(v.shape) for k, v in params.items()}
  ref_v = {k: np.zeros((v.shape[0], 1)) for k, v in params.items()}
  for t, (x, flag) in enumerate(zip(xs, flags), start=1):
    new_params, state, updates, grads = step(params, state, x, jnp.asarray(flag))
    rows = _branch_rows(x, flag)
    h = np.tanh(np.asarray(x, np.float64) @ np.asarray(params["a"], np.float64)) if flag else (
        np.tile(np.tanh(rows["b"] @ np.asarray(params["b"], np.float64)), (2, 1)))
    rows["head"] = h
    for k in params:
      g = np.asarray(grads[k], np.float64)
      ref_m[k] = B1 * ref_m[k] + (1 - B1) * g
      if rows[k] is not None:   # only the steps with rows move V
        ref_v[k] = B2 * ref_v[k] + (1 - B2) * mean_sq(rows[k], 0)[:, None]
      m_hat, v_hat = ref_m[k] / (1 - B1 ** t), ref_v[k] / (1 - B2 ** t)
      np.testing.assert_allclose(state.nu[k], ref_v[k], rtol=RTOL, atol=ATOL,
                                 err_msg=f"nu[{k}] at step {t}")
      np.testing.assert_allclose(updates[k], m_hat / (np.sqrt(v_hat) + EPS), rtol=1e-4,
                                 atol=1e-6, err_msg=f"update[{k}] at step {t}")
    params = new_params


def test_activation_rms_keeps_v_where_a_statistic_is_negative_zero():
  tx = adaact_optax.scale_by_activation_rms(b2=B2)
  params = {"w": jnp.ones((3, 2))}
  state = tx.init(params)
  first = jnp.array([[4.0], [1.0], [0.25]])
  _, state = tx.update({"w": jnp.ones((3, 2))}, state, activation_stats={"w": first})
  second = jnp.array([[-0.0], [0.0], [9.0]])   # feature 0: no rows; feature 1: rows of zeros
  _, state = tx.update({"w": jnp.ones((3, 2))}, state, activation_stats={"w": second})
  v1 = (1 - B2) * np.array([4.0, 1.0, 0.25])
  np.testing.assert_allclose(state.nu["w"][:, 0], [v1[0], B2 * v1[1], B2 * v1[2] + (1 - B2) * 9],
                             rtol=1e-6)


def test_multisteps_keeps_the_marker_only_while_no_micro_batch_had_rows():
  """k=2. Step 1, one micro-batch per branch: each weight's mean counts the other
  micro-batch as 0 (positive). Step 2, both take branch a: b keeps the marker in the
  accumulator and the inner optimizer leaves its V as step 1 left it."""
  params = {"a": normal(1, 4, 3), "b": normal(2, 4, 3), "head": normal(3, 3, 2)}
  x1, x2 = normal(5, 6, 4), normal(6, 6, 4)
  tx = adaact_optax.MultiSteps(adaact_optax.scale_by_adaact(B1, B2, EPS), every_k_schedule=2)
  g = jax.jit(adaact_optax.value_grad_and_stats(_branchy))
  update = jax.jit(lambda grads, state, stats: tx.update(grads, state, params,
                                                         activation_stats=stats))
  state = tx.init(params)
  for x, flag in ((x1, True), (x2, False)):
    _, grads, stats = g(params, x, jnp.asarray(flag))
    _, state = update(grads, state, stats)
    if flag:   # after the first micro-batch: b has met no rows yet
      assert _is_no_rows(state.acc_stats["b"]).all(), state.acc_stats["b"]
  nu1 = state.inner_opt_state.nu
  b_rows = 2.0 * np.asarray(x2, np.float64)[:3]
  np.testing.assert_allclose(nu1["a"][:, 0], (1 - B2) * mean_sq(x1, 0) / 2, rtol=RTOL)
  np.testing.assert_allclose(nu1["b"][:, 0], (1 - B2) * mean_sq(b_rows, 0) / 2, rtol=RTOL)
  for x in (x1, x2):
    _, grads, stats = g(params, x, jnp.asarray(True))
    _, state = update(grads, state, stats)
    if not tx.has_updated(state):
      assert _is_no_rows(state.acc_stats["b"]).all(), state.acc_stats["b"]
  nu2 = state.inner_opt_state.nu
  np.testing.assert_array_equal(nu2["b"], nu1["b"])
  np.testing.assert_allclose(
      nu2["a"][:, 0], B2 * nu1["a"][:, 0] + (1 - B2) * (mean_sq(x1, 0) + mean_sq(x2, 0)) / 2,
      rtol=RTOL)


def test_running_mean_of_the_marker():
  from adaact_optax._src.accumulation import _running_mean
  z, m = jnp.float32(0.0), jnp.float32(-0.0)
  mean = _running_mean(z, m, jnp.float32(0))           # first micro-batch: no rows
  assert _is_no_rows(mean)
  mean = _running_mean(mean, m, jnp.float32(1))        # still none
  assert _is_no_rows(mean)
  mean = _running_mean(mean, jnp.float32(3.0), jnp.float32(2))
  assert float(mean) == 1.0 and not np.signbit(mean)   # (0 + 0 + 3) / 3
  mean = _running_mean(mean, m, jnp.float32(3))
  assert float(mean) == 0.75 and not np.signbit(mean)
  # A NaN with its sign bit set is not the marker: it still makes the step non-finite.
  assert np.isnan(_running_mean(m, -jnp.float32(jnp.nan), jnp.float32(1)))


@pytest.mark.skipif(jax.device_count() < 4, reason="needs the 8 simulated CPU devices")
def test_axis_name_mean_keeps_the_marker_where_no_device_had_rows():
  """pmean reduces a sum of -0.0s to +0.0: the transform keeps the marker itself."""
  tx = adaact_optax.scale_by_adaact(B1, B2, EPS, axis_name="i")
  params = {"w": jnp.ones((2, 3))}
  state = tx.init(params)._replace(nu={"w": jnp.ones((2, 1))})
  # Feature 0: no device had rows; feature 1: one device of four, with mean square 8.
  stats = jnp.array([[[-0.0], [-0.0]], [[-0.0], [-0.0]], [[-0.0], [-0.0]], [[-0.0], [8.0]]])
  states = jax.tree.map(lambda a: jnp.stack([a] * 4), state)
  grads = {"w": jnp.ones((4, 2, 3))}
  _, new = jax.pmap(lambda g, s, a: tx.update(g, s, activation_stats={"w": a}),
                    axis_name="i", devices=jax.devices()[:4])(grads, states, stats)
  nu = np.asarray(new.nu["w"])
  np.testing.assert_array_equal(nu[:, 0, 0], 1.0)                        # kept
  np.testing.assert_allclose(nu[:, 1, 0], B2 + (1 - B2) * 2.0, rtol=1e-6)  # mean of 0, 0, 0, 8
  # A -NaN on one device is no marker: the step is skipped on every device.
  stats = stats.at[0, 1, 0].set(-jnp.nan)
  _, new = jax.pmap(lambda g, s, a: tx.update(g, s, activation_stats={"w": a}),
                    axis_name="i", devices=jax.devices()[:4])(grads, states, stats)
  np.testing.assert_array_equal(new.skipped, 1)


def test_expert_routed_no_rows_keeps_its_v():
  """Three MoE steps with hash routing; expert 1 gets no tokens at step 2 and expert 3
  none at all: their V (weights and biases, ``biases[ids]``) stays as the steps with
  rows left it (numpy reference; a bias's statistic is 1)."""
  n_experts, rows, d_in, d_out = 4, 6, 3, 2
  params = {"experts": normal(1, n_experts, d_in, d_out), "biases": normal(2, n_experts, d_out)}
  routes = [jnp.array([0, 1, 2, 1, 0, 2]), jnp.array([0, 2, 2, 0, 0, 2]),
            jnp.array([1, 1, 0, 2, 2, 0])]
  xs = [normal(20 + t, rows, d_in) for t in range(3)]

  def loss(p, x, ids):
    y = jnp.einsum("bi,bio->bo", x, p["experts"][ids]) + p["biases"][ids]
    return jnp.sum(jnp.sin(y))
  tx = adaact_optax.scale_by_adaact(B1, B2, EPS)
  g = adaact_optax.value_grad_and_stats(loss)

  @jax.jit
  def step(params, state, x, ids):
    _, grads, stats = g(params, x, ids)
    return tx.update(grads, state, params, activation_stats=stats)[1]
  state = tx.init(params)
  ref = {"experts": np.zeros((n_experts, d_in, 1)), "biases": np.zeros((n_experts, 1))}
  for t, (x, ids) in enumerate(zip(xs, routes), start=1):
    state = step(params, state, x, ids)
    for e in range(n_experts):
      routed = np.asarray(x, np.float64)[np.asarray(ids) == e]
      if len(routed):
        ref["experts"][e] = B2 * ref["experts"][e] + (1 - B2) * mean_sq(routed, 0)[:, None]
        ref["biases"][e] = B2 * ref["biases"][e] + (1 - B2) * 1.0
    for k in params:
      np.testing.assert_allclose(state.nu[k], ref[k], rtol=RTOL, atol=ATOL,
                                 err_msg=f"nu[{k}] at step {t}")
  assert (np.asarray(state.nu["biases"][3]) == 0).all()   # never routed: never moved
