"""The sow_input hatch (custom quantized layers), row_mask (padding), capture()'s warning.

References are numpy brute force: the mean of the squared input over the rows
that count, laid out keep-rank (a kernel (in, out) gets (in, 1)).
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaact_optax
from adaact_optax import linen as aa_linen
from adaact_optax import nnx as aa_nnx
from conftest import assert_f32_close, warning_messages

COLLECTION = aa_linen.COLLECTION
X = np.asarray(jax.random.normal(jax.random.key(0), (6, 5)))
TARGET = np.asarray(jax.random.normal(jax.random.key(1), (6, 3)))


def _int8_values(key, shape):
  """A float kernel holding int8 values, as a quantized checkpoint stores it."""
  return jnp.round(127 * jax.random.uniform(key, shape, minval=-1.0))


def _quiet_apply(fn, *args, **kwargs):
  """``fn(*args, **kwargs)`` and the UncapturedWeightWarning messages it emitted."""
  return warning_messages(adaact_optax.UncapturedWeightWarning, fn, *args, **kwargs)


# --- (a) sow_input on a quantized Dense ---------------------------------------

class QuantDense(nn.Module):
  """y = x @ (kernel * scale): the weight is computed before its matmul, no capture sees it."""
  features: int
  sow: tuple = ("kernel", "scale")

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _int8_values, (x.shape[-1], self.features))
    scale = self.param("scale", nn.initializers.constant(0.01), (self.features,))
    if "kernel" in self.sow:
      aa_linen.sow_input(self, "kernel", x)
    if "scale" in self.sow:   # scale[o] multiplies (x @ kernel)[..., o], elementwise
      aa_linen.sow_input(self, "scale", x @ kernel, x_axes=(-1,), param_axes=(0,))
    return x @ (kernel * scale)


class LinenModel(nn.Module):
  sow: tuple = ("kernel", "scale")

  @nn.compact
  def __call__(self, x):
    return QuantDense(3, self.sow)(nn.relu(nn.Dense(4)(x)))


def _quant_reference(dense_kernel, dense_bias, kernel):
  h = np.maximum(X @ np.asarray(dense_kernel) + np.asarray(dense_bias), 0)
  return np.mean(h ** 2, 0)[:, None], np.mean((h @ np.asarray(kernel)) ** 2, 0)


def test_linen_sow_input_replaces_the_warning_and_trains():
  bare = LinenModel(sow=())
  variables = bare.init(jax.random.key(2), X)
  (_, mutated), messages = _quiet_apply(aa_linen.apply, bare, variables, X)
  assert len(messages) == 2
  assert "'QuantDense_0/kernel' (shape (5, 4)" not in messages[0]
  assert "'QuantDense_0/kernel' (shape (4, 3))" in messages[0] and "sow_input" in messages[0]
  assert "'QuantDense_0/scale' (shape (3,))" in messages[1]
  assert mutated[COLLECTION]["QuantDense_0"]["kernel"].shape == (0,)    # the uncaptured marker
  # Sowing only the kernel silences the kernel's warning, not the scale's.
  _, messages = _quiet_apply(aa_linen.apply, LinenModel(sow=("kernel",)), variables, X)
  assert len(messages) == 1 and "'QuantDense_0/scale'" in messages[0]

  model = LinenModel()
  (_, mutated), messages = _quiet_apply(aa_linen.apply, model, variables, X)
  assert messages == []
  p = variables["params"]
  kernel_ref, scale_ref = _quant_reference(p["Dense_0"]["kernel"], p["Dense_0"]["bias"],
                                           p["QuantDense_0"]["kernel"])
  stats = mutated[COLLECTION]["QuantDense_0"]
  assert stats["kernel"].shape == (4, 1) and stats["scale"].shape == (3,)
  assert_f32_close(stats["kernel"], kernel_ref)
  assert_f32_close(stats["scale"], scale_ref)

  shapes = aa_linen.stats_shapes(model, variables, X)
  tx = adaact_optax.adaact(3e-3, stats_shapes=shapes, unmatched="error")

  def loss_fn(params):
    out, mutated = aa_linen.apply(model, {"params": params}, X)
    return jnp.mean((out - TARGET) ** 2), mutated[COLLECTION]

  @jax.jit
  def step(params, state):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, activation_stats=stats)
    return optax.apply_updates(params, updates), state, loss

  params, state = p, tx.init(p)
  losses = []
  for _ in range(5):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]


class NNXQuantDense(nnx.Module):
  def __init__(self, din, dout, rngs, sow=("kernel", "scale")):
    self.kernel = nnx.Param(_int8_values(rngs.params(), (din, dout)))
    self.scale = nnx.Param(jnp.full((dout,), 0.01))
    self.sow = sow

  def __call__(self, x):
    kernel = self.kernel[...]
    if "kernel" in self.sow:
      aa_nnx.sow_input(self, "kernel", x)
    if "scale" in self.sow:
      aa_nnx.sow_input(self, "scale", x @ kernel, x_axes=(-1,), param_axes=(0,))
    return x @ (kernel * self.scale[...])


class NNXModel(nnx.Module):
  def __init__(self, rngs, sow=("kernel", "scale")):
    self.dense = nnx.Linear(5, 4, rngs=rngs)
    self.quant = NNXQuantDense(4, 3, rngs, sow)

  def __call__(self, x):
    return self.quant(nnx.relu(self.dense(x)))


def test_nnx_sow_input_replaces_the_warning_and_trains():
  (_, stats), messages = _quiet_apply(aa_nnx.apply, NNXModel(nnx.Rngs(0), sow=()), X)
  assert len(messages) == 2
  assert "'quant/kernel' (shape (4, 3))" in messages[0] and "'quant/scale' (shape (3,))" in messages[1]
  assert stats["quant"]["kernel"].shape == (0,)

  model = NNXModel(nnx.Rngs(0))
  (_, stats), messages = _quiet_apply(aa_nnx.apply, model, X)
  assert messages == []
  kernel_ref, scale_ref = _quant_reference(model.dense.kernel[...], model.dense.bias[...],
                                           model.quant.kernel[...])
  assert_f32_close(stats["quant"]["kernel"], kernel_ref)
  assert_f32_close(stats["quant"]["scale"], scale_ref)

  tx = adaact_optax.adaact(3e-3, stats_shapes=aa_nnx.stats_shapes(model, X), unmatched="error")
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      out, stats = aa_nnx.apply(model, X)
      return jnp.mean((out - TARGET) ** 2), stats
    (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, activation_stats=stats)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(5)]
  assert losses[-1] < losses[0]


def test_sow_input_checks_axes_and_is_inert_outside_apply():
  model = LinenModel()
  variables = model.init(jax.random.key(2), X)
  out = model.apply(variables, X)              # a plain apply: the hatch does nothing
  assert out.shape == (6, 3)

  class Wrong(nn.Module):
    @nn.compact
    def __call__(self, x):
      kernel = self.param("kernel", nn.initializers.ones, (x.shape[-1], 2))
      aa_linen.sow_input(self, "kernel", x, param_axes=(1,))   # 5 inputs vs 2 outputs
      return x @ kernel

  v = Wrong().init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=r"\(5,\).*\(5, 2\)"):
    aa_linen.apply(Wrong(), v, X)


# --- (b) row_mask -------------------------------------------------------------

B, T, D = 3, 4, 5
SEQ = np.asarray(jax.random.normal(jax.random.key(3), (B, T, D)))
MASK = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], np.float32)   # (B, T) padding


def _masked_mean_sq(a, mask):
  """Mean of a**2 over the rows whose mask is 1 (a: (*mask.shape, features)), brute force."""
  rows = [a[idx] for idx in np.ndindex(*mask.shape) if mask[idx]]
  return np.mean(np.stack(rows) ** 2, 0)


class Tagger(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(4)(x))                      # (B, T, 4): rows are (b, t)
    return nn.Dense(2, name="head")(h.mean(1)), h     # (B, 4) input: not (B, T)-shaped


def _tagger_reference(params):
  p = jax.tree.map(np.asarray, params)
  h = np.tanh(SEQ @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  return (_masked_mean_sq(SEQ, MASK)[:, None],
          _masked_mean_sq(h, MASK)[:, None],
          np.mean(h.mean(1) ** 2, 0)[:, None])            # the head's rows carry no time axis


def test_row_mask_linen_apply_and_value_grad_and_stats():
  model = Tagger()
  variables = model.init(jax.random.key(4), SEQ)
  first, _, head = _tagger_reference(variables["params"])
  _, mutated = aa_linen.apply(model, variables, SEQ, row_mask=MASK)
  stats = mutated[COLLECTION]
  assert_f32_close(stats["Dense_0"]["kernel"], first)
  assert_f32_close(stats["head"]["kernel"], head)
  # The mask changes the statistics (the padded rows are not zeros in SEQ).
  _, unmasked = aa_linen.apply(model, variables, SEQ)
  assert not np.allclose(unmasked[COLLECTION]["Dense_0"]["kernel"], first, rtol=1e-3)

  def loss(params, x):
    out, h = model.apply({"params": params}, x)
    return jnp.mean(out ** 2) + jnp.mean(h ** 2)

  grad_fn = jax.jit(adaact_optax.value_grad_and_stats(loss))
  value, grads, vstats = grad_fn(variables["params"], SEQ, row_mask=jnp.asarray(MASK))
  assert_f32_close(vstats["Dense_0"]["kernel"], first)
  assert_f32_close(vstats["head"]["kernel"], head)
  ref_value, ref_grads = jax.value_and_grad(loss)(variables["params"], SEQ)
  assert_f32_close(value, ref_value)     # the mask touches statistics only
  jax.tree.map(lambda a, b: assert_f32_close(a, b), grads, ref_grads)
  # A boolean mask means the same.
  _, _, bstats = grad_fn(variables["params"], SEQ, row_mask=jnp.asarray(MASK, bool))
  assert_f32_close(bstats["Dense_0"]["kernel"], first)


class NNXTagger(nnx.Module):
  def __init__(self, rngs):
    self.first = nnx.Linear(D, 4, rngs=rngs)
    self.second = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.second(jnp.tanh(self.first(x)))


def test_row_mask_nnx_apply():
  model = NNXTagger(nnx.Rngs(0))
  _, stats = aa_nnx.apply(model, SEQ, row_mask=MASK)
  h = np.tanh(SEQ @ np.asarray(model.first.kernel[...]) + np.asarray(model.first.bias[...]))
  assert_f32_close(stats["first"]["kernel"], _masked_mean_sq(SEQ, MASK)[:, None])
  assert_f32_close(stats["second"]["kernel"], _masked_mean_sq(h, MASK)[:, None])
  np.testing.assert_array_equal(stats["second"]["bias"], np.ones((1,), np.float32))


def test_row_mask_on_the_batch_axis_of_a_conv():
  x = np.asarray(jax.random.normal(jax.random.key(5), (4, 6, 3)))      # (B, length, C)
  mask = np.array([1, 0, 1, 0], np.float32)                            # (B,)
  # Brute force: SAME padding for a width-3 window pads one zero each side; kernel element
  # (k, c) multiplies xp[b, p + k, c] at output position p; average over kept b and all p.
  xp = np.pad(x, ((0, 0), (1, 1), (0, 0)))
  windows = np.stack([xp[:, k:k + 6] for k in range(3)], 1)            # (B, 3, length, C)
  expected = np.mean(windows[mask == 1] ** 2, axis=(0, 2))[:, :, None]  # (3, C, 1)

  layer = nn.Conv(2, (3,), padding="SAME")
  variables = layer.init(jax.random.key(0), x)
  _, mutated = aa_linen.apply(layer, variables, x, row_mask=mask)
  assert_f32_close(mutated[COLLECTION]["kernel"], expected)

  conv = nnx.Conv(3, 2, (3,), padding="SAME", rngs=nnx.Rngs(0))
  _, stats = aa_nnx.apply(conv, x, row_mask=mask)
  assert_f32_close(stats["kernel"], expected)

  def loss(params, x):
    return jnp.sum(layer.apply({"params": params}, x) ** 2)
  _, _, vstats = adaact_optax.value_grad_and_stats(loss)(variables["params"], x, row_mask=mask)
  assert_f32_close(vstats["kernel"], expected)


@pytest.mark.parametrize("mask_shape", [(B + 1,), (T, B), ()])
def test_row_mask_that_matches_no_input_is_an_error_at_every_entry_point(mask_shape):
  """A mask that is no input's leading shape would weigh no rows: even all zeros, it
  must not pass silently. Each entry point raises at trace time, naming row_mask, its
  shape, the inputs' shapes and what a valid mask looks like."""
  mask = np.zeros(mask_shape, np.float32)
  expected = (rf"row_mask of shape {re.escape(str(mask_shape))}.*\({B}, {T}, {D}\)"
              r".*\(batch,\) or \(batch, time\)")
  model = Tagger()
  variables = model.init(jax.random.key(4), SEQ)

  def loss(params, x):
    return jnp.mean(model.apply({"params": params}, x)[0] ** 2)

  def scanned(params, x):  # a scan over time (the weight inside a higher-order primitive)
    step = lambda h, x_t: (jnp.tanh(x_t @ params["Dense_0"]["kernel"]) + h, None)
    return jnp.mean(jax.lax.scan(step, jnp.zeros((B, 4)), jnp.swapaxes(x, 0, 1))[0] ** 2)

  calls = {
      "value_grad_and_stats": lambda: jax.jit(adaact_optax.value_grad_and_stats(loss))(
          variables["params"], SEQ, row_mask=mask),
      "value_grad_and_stats, scan": lambda: adaact_optax.value_grad_and_stats(scanned)(
          variables["params"], SEQ, row_mask=mask),
      "capture_call": lambda: adaact_optax.capture.capture_call(
          loss, variables["params"], (SEQ,), row_mask=mask),
      "linen.apply": lambda: jax.jit(lambda v, x: aa_linen.apply(model, v, x, row_mask=mask))(
          variables, SEQ),
      "nnx.apply": lambda: aa_nnx.apply(NNXTagger(nnx.Rngs(0)), SEQ, row_mask=mask),
  }
  for name, call in calls.items():
    try:
      call()
    except ValueError as e:
      assert re.search(expected, str(e)), (name, str(e))
    else:
      pytest.fail(f"{name}: a row_mask of shape {mask_shape} raised nothing")
  # Masks of the inputs' leading shapes run.
  good = np.ones((B, T), np.float32)
  aa_nnx.apply(NNXTagger(nnx.Rngs(0)), SEQ, row_mask=good)
  adaact_optax.value_grad_and_stats(scanned)(variables["params"], SEQ, row_mask=good[:, 0])


# --- (c) the interception capture() warns about layers it cannot see into -----

def test_interception_capture_warns_for_einsum():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Einsum((5, 4), "bd,dk->bk")(x)
      return nn.Dense(2)(nn.LayerNorm()(h))

  model = Model()
  variables = model.init(jax.random.key(6), X)

  def run():
    with aa_linen.capture():
      return model.apply(variables, X, mutable=[COLLECTION])
  (_, mutated), messages = _quiet_apply(run)
  assert len(messages) == 1                     # the Einsum only: not the LayerNorm, not the Dense
  assert "Einsum at 'Einsum_0'" in messages[0] and "adaact_optax.linen.apply" in messages[0]
  assert set(mutated[COLLECTION]) == {"Dense_0"}
  # apply() (the jaxpr capture) does see into it.
  (_, mutated), messages = _quiet_apply(aa_linen.apply, model, variables, X)
  assert messages == []
  assert_f32_close(mutated[COLLECTION]["Einsum_0"]["kernel"], np.mean(X ** 2, 0)[:, None])


def test_row_mask_applies_to_sown_statistics():
  # A sown layer's input carries the (B, T) axes too: its padded rows must not count either.
  class SeqQuant(nn.Module):
    @nn.compact
    def __call__(self, x):
      return QuantDense(3)(x)

  variables = SeqQuant().init(jax.random.key(7), SEQ)
  _, mutated = aa_linen.apply(SeqQuant(), variables, SEQ, row_mask=MASK)
  kernel = np.asarray(variables["params"]["QuantDense_0"]["kernel"])
  stats = mutated[COLLECTION]["QuantDense_0"]
  assert_f32_close(stats["kernel"], _masked_mean_sq(SEQ, MASK)[:, None])
  assert_f32_close(stats["scale"], _masked_mean_sq(SEQ @ kernel, MASK))

  quant = NNXQuantDense(D, 3, nnx.Rngs(0))
  _, stats = aa_nnx.apply(quant, SEQ, row_mask=jnp.asarray(MASK, bool))
  assert_f32_close(stats["kernel"], _masked_mean_sq(SEQ, MASK)[:, None])
  assert_f32_close(stats["scale"], _masked_mean_sq(SEQ @ np.asarray(quant.kernel[...]), MASK))


def test_interception_capture_around_a_function_traced_outside_warns():
  """A jitted function traced outside capture() is a cache hit inside it: no module runs,
  the collection comes back empty, and the block says so (and what to do) on exit."""
  model = nn.Dense(2)
  variables = model.init(jax.random.key(8), X)
  traced_outside = jax.jit(lambda v, x: model.apply(v, x, mutable=[COLLECTION]))
  traced_outside(variables, X)

  def run(fn):
    with aa_linen.capture():
      return fn(variables, X)
  (_, mutated), messages = _quiet_apply(run, traced_outside)
  assert mutated.get(COLLECTION, {}) == {}
  assert len(messages) == 1, messages
  assert re.search(r"capture\(\): no Linen module ran inside this `with` block.*'adaact_stats'"
                   r".*traced outside the block.*adaact_optax.linen.apply\(model, variables, x\)",
                   messages[0]), messages[0]
  # Traced inside the block: statistics, and no warning, also when the same `with`
  # statement later reuses that trace (a training loop).
  traced_inside = jax.jit(lambda v, x: model.apply(v, x, mutable=[COLLECTION]))
  for _ in range(2):
    (_, mutated), messages = _quiet_apply(run, traced_inside)
    assert set(mutated[COLLECTION]) == {"kernel", "bias"} and messages == []
