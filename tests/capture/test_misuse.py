"""Issue 12: every misuse either works correctly or stops with an error that says what to do."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adaact_optax
from adaact_optax._src.capture import api as capture_api
from conftest import assert_f32_close, warning_messages


def _tiny():
  params = {"dense": {"kernel": jnp.full((3, 2), 0.5), "bias": jnp.zeros((2,))},
            "norm": {"scale": jnp.ones((2,))}}
  grads = {"dense": {"kernel": jnp.full((3, 2), 0.1), "bias": jnp.full((2,), 0.2)},
           "norm": {"scale": jnp.full((2,), 0.3)}}
  stats = {"dense": {"kernel": jnp.array([[1.0], [4.0], [0.25]]), "bias": jnp.ones((1,))}}
  return params, grads, stats


def _update(tx, state, grads, params, stats):
  return jax.jit(lambda s, a: tx.update(grads, s, params, activation_stats=a))(state, stats)


# --- 2. hyperparameters: every concrete value is checked -------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"b2": np.float32(1.0)}, "b2 must be in"),
    ({"b1": np.float64(1.5)}, "b1 must be in"),
    ({"eps": jnp.asarray(-1.0)}, "eps must be finite and >= 0"),
    ({"eps": float("nan")}, "eps"),
    ({"b2": 0.99999999}, r"b2 must be in \[0, 1\) \(also once rounded to float32"),
    ({"power": "0.5"}, "power must be a number, got the string"),
    ({"power": jnp.zeros(())}, "power must be finite and > 0"),
    ({"mu_dtype": jnp.int32}, "mu_dtype must be a floating.*truncate"),
    ({"mu_dtype": bool}, "mu_dtype must be a floating"),
    ({"weight_decay": np.float32(-1e-3)}, "weight_decay"),
])
def test_concrete_hyperparameters_are_checked_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    adaact_optax.adaact(0.1, **kwargs)


def test_learning_rate_string_and_non_scalar():
  with pytest.raises(ValueError, match="learning_rate must be a number, got the string"):
    adaact_optax.adaact("0.1")
  with pytest.raises(ValueError, match="learning_rate must be a real scalar"):
    adaact_optax.adaact(jnp.ones(3))
  with pytest.raises(ValueError, match="learning_rate must be a finite"):
    adaact_optax.adaact(float("inf"))


def test_inject_hyperparams_concrete_values_are_checked_at_init():
  params, _, _ = _tiny()
  tx = optax.inject_hyperparams(adaact_optax.adaact)(learning_rate=0.1, b2=1.0)
  with pytest.raises(ValueError, match="b2 must be in"):
    tx.init(params)


def test_traced_hyperparameters_are_exempt():
  # Under jit the values are tracers: they cannot be checked, and must not be refused.
  params, grads, stats = _tiny()
  tx = optax.inject_hyperparams(adaact_optax.adaact)(learning_rate=0.1, b2=0.9)
  state = jax.jit(tx.init)(params)
  updates, _ = _update(tx, state, grads, params, stats)
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))

  @jax.jit
  def with_traced_b2(b2):
    t = adaact_optax.adaact(0.1, b2=b2)
    return t.update(grads, t.init(params), params, activation_stats=stats)[0]

  assert_f32_close(with_traced_b2(0.9), updates)


# --- 3. non-finite statistics skip the whole step ---------------------------

def test_overflowing_statistics_skip_the_step_and_the_layer_keeps_training():
  params, grads, stats = _tiny()
  schedule = optax.linear_schedule(0.1, 0.05, 10)
  tx = adaact_optax.adaact(schedule, weight_decay=0.1, unmatched="momentum")
  state = tx.init(params)
  _, state = _update(tx, state, grads, params, stats)
  # Activations of 1e20: their squares overflow float32, the gradients stay finite.
  x = jnp.full((4, 3), 1e20)
  bad = {"dense": {"kernel": jnp.mean(x * x, 0)[:, None], "bias": jnp.ones((1,))}}
  assert not np.isfinite(bad["dense"]["kernel"]).any()
  updates, new_state = _update(tx, state, grads, params, bad)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))  # no decay either
  assert int(new_state[0].skipped) == 1
  chex.assert_trees_all_equal(new_state[0]._replace(skipped=0), state[0]._replace(skipped=0))
  chex.assert_trees_all_equal(new_state[1:], state[1:])           # the schedule's count too
  # The next finite step continues from the untouched state and moves the layer.
  updates, final = _update(tx, new_state, grads, params, stats)
  assert int(final[0].count) == 2 and int(final[0].skipped) == 1
  assert np.isfinite(final[0].nu["dense"]["kernel"]).all()
  assert float(jnp.abs(updates["dense"]["kernel"]).min()) > 0
  # The same step without the skip, from the same state: identical.
  ref_updates, _ = _update(tx, state, grads, params, stats)
  chex.assert_trees_all_equal(updates, ref_updates)


def test_nan_statistics_skip_the_step_of_the_building_block_and_the_partition():
  params, grads, stats = _tiny()
  bad = jax.tree.map(lambda a: a * jnp.nan, stats)
  block = adaact_optax.scale_by_activation_rms()
  _, state = _update(block, block.init(params), grads, params, stats)   # a finite step first
  nan_grads = jax.tree.map(lambda g: g * jnp.nan, grads)                # NaN gradients too
  updates, new_state = _update(block, state, nan_grads, params, bad)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))
  assert int(new_state.skipped) == 1 and int(new_state.count) == 1
  chex.assert_trees_all_equal(new_state.nu, state.nu)
  # With an optimizer for the unmatched parameters, its branch skips too.
  tx = adaact_optax.adaact(0.1, unmatched=optax.adam(1e-3),
                           stats_shapes=jax.tree.map(jnp.shape, stats))
  state = tx.init(params)
  updates, new_state = _update(tx, state, grads, params, bad)
  chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))
  adam_state = lambda s: s.inner_states["unmatched"]
  chex.assert_trees_all_equal(adam_state(new_state), adam_state(state))
  assert int(new_state.inner_states["adaact"].inner_state[0].skipped) == 1


# --- 4. complex parameters ---------------------------------------------------

def test_complex_parameters_keep_their_imaginary_part():
  params = {"w": jnp.zeros((3, 2), jnp.complex64)}
  stats = {"w": jnp.array([[1.0], [4.0], [0.25]])}
  g_re = jnp.arange(6.0).reshape(3, 2) / 10
  g_im = jnp.linspace(-1, 1, 6).reshape(3, 2)
  tx = adaact_optax.adaact(0.1, b1=0.5, b2=0.5, eps=1e-3, weight_decay=0.0)

  def run(grads, params, steps=3):
    state = tx.init(params)
    out = []
    for _ in range(steps):
      u, state = tx.update(grads, state, params, activation_stats=stats)
      out.append(u)
    return out, state

  complex_updates, state = run({"w": g_re + 1j * g_im}, params)
  assert state[0].mu["w"].dtype == jnp.complex64
  real = {"w": jnp.zeros((3, 2))}
  re, _ = run({"w": g_re}, real)
  im, _ = run({"w": g_im}, real)
  # The rule is linear in the gradient for fixed statistics: real and imaginary parts
  # follow the real rule separately.
  for t, (c, r, i) in enumerate(zip(complex_updates, re, im)):
    assert_f32_close(c["w"].real, r["w"], steps=t + 1)
    assert_f32_close(c["w"].imag, i["w"], steps=t + 1)
  purely_imaginary, _ = run({"w": 1j * g_im}, params, steps=1)
  assert float(jnp.abs(purely_imaginary[0]["w"]).max()) > 0


def test_real_mu_dtype_with_complex_parameters_names_the_parameter():
  params = {"layer": {"w": jnp.zeros((3, 2), jnp.complex64)}, "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"\['layer/w'\].*mu_dtype=None"):
    adaact_optax.adaact(0.1, mu_dtype=jnp.bfloat16).init(params)


# --- 5. an AdaAct branch with no parameters ---------------------------------

def _empty_branch_cases(params):
  labels = jax.tree.map(lambda _: "adam", params)
  return {
      "partition without an adaact label": (
          optax.partition({"adaact": adaact_optax.adaact(0.1), "adam": optax.adam(1e-3)},
                          labels),
          optax.adam(1e-3)),
      "masked all False": (
          optax.masked(adaact_optax.adaact(0.1), jax.tree.map(lambda _: False, params)),
          optax.identity()),
  }


def test_adaact_branch_without_parameters_works_like_optax():
  params, grads, stats = _tiny()
  for name, (tx, reference) in _empty_branch_cases(params).items():
    updates, _ = _update(tx, tx.init(params), grads, params, stats)
    ref, _ = reference.update(grads, reference.init(params), params)
    assert_f32_close(updates, ref, err_msg=name)
  for tx in (adaact_optax.adaact(0.1), adaact_optax.scale_by_adaact(),
             adaact_optax.scale_by_activation_rms()):
    updates, state = tx.update({}, tx.init({}), {}, activation_stats={})
    assert updates == {}


# --- 6, 7. the wrong train state, the wrong optimizer state -----------------

def test_flax_train_state_error_names_adaact_train_state():
  from flax.training import train_state
  params, grads, stats = _tiny()
  state = train_state.TrainState.create(apply_fn=None, params=params,
                                        tx=adaact_optax.adaact(0.1))
  # Flax's apply_gradients calls tx.update without the statistics, also when given them.
  with pytest.raises(ValueError, match=r"never forwards.*adaact_optax\.TrainState"):
    state.apply_gradients(grads=grads, activation_stats=stats)
  ours = adaact_optax.TrainState.create(apply_fn=None, params=params,
                                        tx=adaact_optax.adaact(0.1))
  assert int(ours.apply_gradients(grads=grads, activation_stats=stats).step) == 1


def test_update_on_a_raw_restored_state_says_what_to_pass():
  params, grads, stats = _tiny()
  tx = adaact_optax.adaact(0.1)
  state = tx.init(params)
  raw = {"0": state[0]._asdict(), "1": {}, "2": {}}   # a checkpoint restored without a target
  with pytest.raises(ValueError, match=r"type dict.*tx\.init\(params\).*migrate_state"):
    tx.update(grads, raw, params, activation_stats=stats)
  scale = adaact_optax.scale_by_adaact()
  with pytest.raises(ValueError, match=r"scale_by_adaact\.update got a state of type dict"):
    scale.update(grads, state[0]._asdict(), activation_stats=stats)


# --- the loss's arguments in the wrong order: fun(x, params) ----------------

def _swapped_mlp(x, params):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"]) ** 2)


def _swapped_mlp_jitted(x, params):  # the first argument enters a jit: the evaluating route
  mlp = jax.jit(lambda x, w1, w2: jnp.tanh(x @ w1) @ w2)
  return jnp.mean(mlp(x, params["w1"], params["w2"]) ** 2)


def _swapped_conv(x, params):
  y = jax.lax.conv_general_dilated(x, params["k"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.mean(y ** 2)


_MLP_PARAMS = {"w1": jnp.full((3, 4), 0.3), "b1": jnp.zeros(4), "w2": jnp.full((4, 2), 0.2)}
_SWAPPED = {
    "mlp": (_swapped_mlp, jnp.ones((5, 3)), _MLP_PARAMS, r"args\[1\]\['w2'\] \(shape \(4, 2\)\)"),
    "jitted mlp": (_swapped_mlp_jitted, jnp.ones((5, 3)), _MLP_PARAMS,
                   r"args\[1\]\['w2'\] \(shape \(4, 2\)\)"),
    "conv": (_swapped_conv, jnp.ones((2, 5, 5, 3)), {"k": jnp.full((3, 3, 3, 4), 0.1)},
             r"args\[1\]\['k'\] \(shape \(3, 3, 3, 4\)\).*kernel of a convolution"),
}


def _argument_order_warnings(fn, *args, **kwargs):
  return warning_messages(adaact_optax.ArgumentOrderWarning, fn, *args, **kwargs)


@pytest.mark.parametrize("name", sorted(_SWAPPED))
def test_data_as_first_argument_warns_in_every_entry_point(name):
  fun, x, params, where = _SWAPPED[name]
  fast = capture_api.capture_differentiated(fun, False, x, (params,), {}, None, None)
  assert (fast is None) == (name == "jitted mlp")       # both routes are exercised
  calls = {"value_grad_and_stats": lambda: adaact_optax.value_grad_and_stats(fun)(x, params),
           "stats_shapes": lambda: adaact_optax.stats_shapes(fun, x, params),
           "coverage": lambda: adaact_optax.coverage(fun, x, params)}
  for entry, call in calls.items():
    out, messages = _argument_order_warnings(call)
    assert len(messages) == 1, (entry, messages)
    assert re.search(f"adaact_optax.{entry}\\(fun\\) differentiates fun's first argument.*"
                     f"{where}.*lambda params, x: fun\\(x, params\\)", messages[0]), messages[0]
  _, grads, _ = adaact_optax.value_grad_and_stats(fun)(x, params)
  assert jax.tree.structure(grads) == jax.tree.structure(x)   # what the warning explains
  # In the intended order the same loss is quiet.
  _, messages = _argument_order_warnings(
      adaact_optax.value_grad_and_stats(lambda p, x: fun(x, p)), params, x)
  assert messages == []


def test_frozen_weights_in_the_other_arguments_do_not_warn_when_parameters_are_weights():
  """Fine-tuning passes frozen weights as data, and they multiply values computed from
  the parameters: quiet as long as some parameter is itself the weight on a computed
  value (LoRA's second factor, a trained body's second layer)."""
  frozen = {"base1": jnp.full((3, 4), 0.3), "base2": jnp.full((4, 2), 0.2)}
  x = jnp.ones((5, 3))

  def lora_then_frozen(params, x, frozen):
    h = jnp.tanh(x @ frozen["base1"] + (x @ params["a"]) @ params["b"])
    return jnp.mean((h @ frozen["base2"]) ** 2)

  def body_then_frozen_head(params, x, frozen):
    h = jnp.tanh(jnp.tanh(x @ params["w1"]) @ params["w2"])
    return jnp.mean((h @ frozen["base2"]) ** 2)

  cases = [(lora_then_frozen, {"a": jnp.full((3, 2), 0.1), "b": jnp.full((2, 4), 0.1)}),
           (body_then_frozen_head, {"w1": jnp.full((3, 4), 0.1), "w2": jnp.full((4, 4), 0.1)})]
  for fun, params in cases:
    _, messages = _argument_order_warnings(adaact_optax.value_grad_and_stats(fun), params, x,
                                           frozen)
    assert messages == [], messages
    _, messages = _argument_order_warnings(adaact_optax.coverage, fun, params, x, frozen)
    assert messages == [], messages


def test_a_one_hot_dispatch_of_expert_outputs_does_not_warn():
  """Capacity dispatch as one-hot contractions: the data's dispatch tensor multiplies
  the experts' outputs, and the experts are the weight of a batched contraction (one
  expert per batch index): a parameter is a weight, so quiet."""
  dispatch = jax.nn.one_hot(jnp.array([[0, 2, 1], [1, 0, 2]]), 3)  # (E, C, B): token per slot

  def fun(params, x, dispatch):
    x_e = jnp.einsum("ecb,bi->eci", dispatch, x)
    return jnp.sum(jnp.einsum("ecb,eco->bo", dispatch,
                              jnp.einsum("eci,eio->eco", x_e, params["experts"])) ** 2)
  params = {"experts": jnp.full((2, 4, 5), 0.1)}
  for call in (adaact_optax.value_grad_and_stats(fun),
               lambda *args: adaact_optax.coverage(fun, *args)):
    _, messages = _argument_order_warnings(call, params, jnp.ones((3, 4)), dispatch)
    assert messages == [], messages
