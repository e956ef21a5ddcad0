"""The Flax NNX adapter: statistics like Linen's, paths like nnx.state, parity, training."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import adaact_optax
from adaact_optax import linen as aa_linen
from adaact_optax import moments
from adaact_optax import nnx as aa_nnx
from _parity_models import assert_parity_close as _close, fixture_tree as _tree
from conftest import assert_f32_close


def _flat(tree):
  return {adaact_optax._src.alignment.path_name(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- same statistics as the Linen adapter, layer by layer -------------------

CONVS = [  # (nnx/linen kwargs, input shape)
    (dict(kernel_size=(3, 3), padding="SAME"), (2, 6, 5, 4)),
    (dict(kernel_size=(3, 2), strides=(2, 1), padding="VALID", kernel_dilation=(1, 2)), (2, 7, 6, 4)),
    (dict(kernel_size=(3,), padding="CIRCULAR", strides=2), (3, 5, 4)),
    (dict(kernel_size=(3,), padding=((2, 1),), input_dilation=2), (3, 5, 4)),
    (dict(kernel_size=(2,), padding="CAUSAL", kernel_dilation=2, use_bias=False), (2, 6, 4)),
    (dict(kernel_size=(3, 3), padding=((1, 0), (2, 1)), feature_group_count=2), (1, 5, 5, 4)),
    (dict(kernel_size=(3, 3), padding="REFLECT", strides=2, feature_group_count=4), (2, 6, 6, 4)),
    (dict(kernel_size=(2, 2, 2), padding=1), (4, 3, 3, 4)),  # 3-D, no batch axis
    (dict(kernel_size=(2, 3), padding="SAME_LOWER", strides=(2, 3)), (2, 1, 5, 6, 4)),  # 2 batch axes
]


def _conv_reference(linen_layer, variables, x):
  """Brute force from the Jacobian: d y[..., o] / d kernel[..., c, o] is the input element that
  kernel element multiplies at each output position; for each group's first output channel,
  square and average over every output position (batch and spatial axes)."""
  kernel = variables["params"]["kernel"]
  groups = linen_layer.feature_group_count
  firsts = np.arange(groups) * (kernel.shape[-1] // groups)
  f = lambda w: linen_layer.apply({"params": {**variables["params"], "kernel": w}}, x)[..., firsts]
  jac = np.asarray(jax.jacrev(f)(kernel), np.float64)       # (*out_lead, G, *kernel.shape)
  lead = tuple(range(jac.ndim - kernel.ndim - 1))
  per_group = [np.mean(np.take(jac, g, axis=len(lead))[..., firsts[g]] ** 2, lead)
               for g in range(groups)]
  return np.stack(per_group, -1)                                # (*k, C/G, G)


@pytest.mark.parametrize("kwargs,shape", CONVS)
def test_conv_statistics_equal_linen_and_brute_force(kwargs, shape):
  x = jax.random.normal(jax.random.key(1), shape)
  layer = nnx.Conv(4, 8, rngs=nnx.Rngs(0), **kwargs)
  # Under jit: one compilation per case instead of one per eager op.
  stats = jax.jit(lambda x: aa_nnx.apply(layer, x)[1])(x)
  linen_layer = nn.Conv(8, **kwargs)
  variables = jax.eval_shape(linen_layer.init, jax.random.key(0), x)
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
  mutated = jax.jit(lambda x: aa_linen.apply(linen_layer, variables, x)[1])(x)
  ours, ref = _flat(stats), _flat(mutated[aa_linen.COLLECTION])
  assert ours.keys() == ref.keys() == ({"kernel"} | ({"bias"} if kwargs.get("use_bias", True) else set()))
  for k in ref:
    assert_f32_close(ours[k], ref[k])
  assert_f32_close(ours["kernel"], _conv_reference(linen_layer, variables, x))
  if "bias" in ours:
    np.testing.assert_array_equal(ours["bias"], np.ones((1,), np.float32))


def test_linear_and_linear_general_statistics():
  x = jax.random.normal(jax.random.key(2), (3, 2, 5, 4))
  lin = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
  assert_f32_close(aa_nnx.apply(lin, x)[1]["kernel"], jnp.mean(x ** 2, (0, 1, 2))[:, None])
  # Contract axes (1, -1) of a (3, 2, 5, 4) input: kernel (2, 4, 7, 2), statistics (2, 4, 1, 1).
  gen = nnx.LinearGeneral((2, 4), (7, 2), axis=(1, -1), rngs=nnx.Rngs(0))
  _, stats = aa_nnx.apply(gen, x)
  assert gen.kernel.shape == (2, 4, 7, 2)
  assert_f32_close(stats["kernel"], jnp.mean(x ** 2, (0, 2))[:, :, None, None])
  assert stats["kernel"].shape == (2, 4, 1, 1)
  np.testing.assert_array_equal(stats["bias"], np.ones((1, 1), np.float32))  # bias (7, 2)
  # batch_axis keeps one statistic per batch index: kernel (3, 4, 5), statistics (3, 4, 1).
  xb = jax.random.normal(jax.random.key(3), (3, 6, 4))
  batched = nnx.LinearGeneral(4, 5, batch_axis={0: 3}, use_bias=False, rngs=nnx.Rngs(0))
  _, stats = aa_nnx.apply(batched, xb)
  assert set(_flat(stats)) == {"kernel"}
  assert_f32_close(stats["kernel"], jnp.mean(xb ** 2, 1)[:, :, None])
  tx = adaact_optax.scale_by_adaact()
  params = nnx.as_pure(nnx.state(batched, nnx.Param))
  tx.update(params, tx.init(params), activation_stats=stats)  # shapes line up


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)])
    self.alias = self.blocks[0]        # the same layer at a second path
    self.norm = nnx.LayerNorm(4, rngs=rngs)

  def __call__(self, x):
    h = self.alias(x)                  # rows of x
    h = self.blocks[0](self.norm(h))   # ... and the rows of norm(h), pooled
    return self.blocks[1](h)


def test_paths_mirror_nnx_state_and_repeated_use_pools_rows():
  model = _Net(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(4), (5, 4)) * 3
  _, stats = aa_nnx.apply(model, x)
  names = set(_flat(stats))
  # nnx.state lists the shared layer once, at its first path in key order: 'alias'.
  assert names == {"alias/kernel", "alias/bias", "blocks/1/kernel", "blocks/1/bias"}
  assert names < set(_flat(nnx.state(model, nnx.Param)))  # the LayerNorm is unmatched
  normed = model.norm(model.blocks[0](x))
  pooled = moments.dense_moments(jnp.concatenate([x, normed]))  # both uses of blocks[0]
  assert_f32_close(stats["alias"]["kernel"], pooled.mean[:, None])
  assert_f32_close(stats["blocks"][1]["kernel"], jnp.mean(model.blocks[0](normed) ** 2, 0)[:, None])


class _Scaled(nnx.Linear):
  """A subclass whose __call__ reaches nnx.Linear's through super()."""

  def __call__(self, x):
    return 2 * super().__call__(x)


def test_subclass_dtype_and_no_gradient_through_statistics():
  layer = _Scaled(3, 2, rngs=nnx.Rngs(0))
  x = jnp.arange(6.0, dtype=jnp.bfloat16).reshape(2, 3)
  _, stats = aa_nnx.apply(layer, x)
  assert stats["kernel"].dtype == jnp.float32
  assert_f32_close(stats["kernel"], jnp.mean(jnp.float32(x) ** 2, 0)[:, None])
  grad = jax.grad(lambda x: jnp.sum(aa_nnx.apply(layer, x)[1]["kernel"]))(x.astype(jnp.float32))
  assert not np.any(np.asarray(grad))


def test_errors_propagate_and_outside_layers_are_constants():
  layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

  def broken(x):
    layer(x)
    raise ZeroDivisionError

  with pytest.raises(ZeroDivisionError):
    aa_nnx.apply(broken, jnp.ones((1, 2)))
  assert layer(jnp.ones((1, 2))).shape == (1, 2)    # the layer still works afterwards

  # A layer the model closes over is not among its parameters: its weights are constants,
  # and the model's own layer gets the statistics of what that outsider feeds it.
  outsider = nnx.Linear(2, 2, rngs=nnx.Rngs(1))

  class Leaky(nnx.Module):
    def __init__(self):
      self.lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.lin(outsider(x))

  x = jax.random.normal(jax.random.key(12), (4, 2))
  _, stats = aa_nnx.apply(Leaky(), x)
  assert set(_flat(stats)) == {"lin/kernel", "lin/bias"}
  assert_f32_close(stats["lin"]["kernel"], np.mean(np.asarray(outsider(x)) ** 2, 0)[:, None])


class _ScanStack(nnx.Module):
  """Three Linear layers created by nnx.vmap and applied in sequence by nnx.scan."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return nnx.Linear(4, 4, rngs=rngs)
    self.layers = create(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(layer, h):
      return jnp.tanh(layer(h))
    return body(self.layers, x)


def test_scan_vmap_and_remat_in_the_forward_give_per_slice_statistics():
  x = jax.random.normal(jax.random.key(13), (5, 4))
  stack = _ScanStack(nnx.Rngs(0))
  kernels, biases = np.asarray(stack.layers.kernel[...]), np.asarray(stack.layers.bias[...])
  assert kernels.shape == (3, 4, 4)
  _, stats = aa_nnx.apply(stack, x)
  h, expected = np.asarray(x), []
  for i in range(3):                      # brute force: each layer's own input rows
    expected.append(np.mean(h ** 2, 0))
    h = np.tanh(h @ kernels[i] + biases[i])
  assert stats["layers"]["kernel"].shape == (3, 4, 1)    # the layer axis is kept
  assert_f32_close(stats["layers"]["kernel"], np.stack(expected)[:, :, None])
  np.testing.assert_array_equal(stats["layers"]["bias"], np.ones((3, 1), np.float32))
  assert aa_nnx.stats_shapes(stack, x)["layers"]["kernel"].shape == (3, 4, 1)

  class Ensemble(nnx.Module):
    """vmap over members (per-member rows) and a shared layer vmapped over chunks (pooled)."""

    def __init__(self, rngs):
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create(rngs):
        return nnx.Linear(4, 2, rngs=rngs)
      self.members = create(rngs)
      self.shared = nnx.Linear(2, 2, rngs=rngs)

    def __call__(self, xs):
      h = nnx.vmap(lambda m, x: m(x), in_axes=(0, 0))(self.members, xs)          # (3, 5, 2)
      return nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(self.shared, h), h

  xs = jax.random.normal(jax.random.key(14), (3, 5, 4))
  model = Ensemble(nnx.Rngs(0))
  (_, h), stats = aa_nnx.apply(model, xs)
  assert_f32_close(stats["members"]["kernel"], np.mean(np.asarray(xs) ** 2, 1)[:, :, None])
  assert_f32_close(stats["shared"]["kernel"],
                   np.mean(np.asarray(h).reshape(15, 2) ** 2, 0)[:, None])

  class Remat(nnx.Module):
    def __init__(self):
      self.lin = nnx.Linear(4, 2, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return nnx.remat(lambda lin, x: lin(x))(self.lin, x)

  _, stats = aa_nnx.apply(Remat(), x)
  assert_f32_close(stats["lin"]["kernel"], np.mean(np.asarray(x) ** 2, 0)[:, None])


def test_wrt_lora_params_only():
  layer = nnx.LoRALinear(4, 3, lora_rank=2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(15), (6, 4))
  _, stats = aa_nnx.apply(layer, x, wrt=nnx.LoRAParam)
  paths = set(_flat(stats))
  assert paths == set(_flat(nnx.state(layer, nnx.LoRAParam))) and "kernel" not in paths
  a = np.asarray(layer.lora.lora_a[...])
  assert_f32_close(stats["lora"]["lora_a"], np.mean(np.asarray(x) ** 2, 0)[:, None])
  assert_f32_close(stats["lora"]["lora_b"], np.mean((np.asarray(x) @ a) ** 2, 0)[:, None])



# --- training part of the model: statistics of the others are ignored --------

class _LoRAMLP(nnx.Module):
  def __init__(self, rngs):
    b_init = nnx.initializers.normal(0.5)   # nonzero lora_b: lora_a gets a gradient at step 1
    self.hidden = nnx.LoRALinear(5, 6, lora_rank=2, b_initializer=b_init, rngs=rngs)
    self.head = nnx.LoRALinear(6, 3, lora_rank=2, b_initializer=b_init, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.hidden(x)))


def _lora_reference_stats(model, x):
  """numpy, float64: lora_a multiplies the layer's input h, lora_b multiplies h @ lora_a."""
  w = {k: np.asarray(v, np.float64) for k, v in _flat(nnx.state(model, nnx.Param)).items()}
  layer = lambda name, h: (h @ w[f"{name}/kernel"] + w[f"{name}/bias"]
                           + h @ w[f"{name}/lora/lora_a"] @ w[f"{name}/lora/lora_b"])
  h0 = np.asarray(x, np.float64)
  h1 = np.tanh(layer("hidden", h0))
  out = {}
  for name, h in (("hidden", h0), ("head", h1)):
    out[f"{name}/lora/lora_a"] = np.mean(h ** 2, 0)[:, None]
    out[f"{name}/lora/lora_b"] = np.mean((h @ w[f"{name}/lora/lora_a"]) ** 2, 0)[:, None]
  return out


def test_lora_optimizer_ignores_the_frozen_kernels_statistics():
  model = _LoRAMLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(20), (16, 5))
  y = jax.random.normal(jax.random.key(21), (16, 3))
  frozen = _flat(nnx.state(model, nnx.Not(nnx.LoRAParam)))
  optimizer = nnx.Optimizer(model, adaact_optax.adaact(0.1), wrt=nnx.LoRAParam)

  def loss_fn(model):
    out, stats = aa_nnx.apply(model, x)       # no wrt: every nnx.Param's statistics
    return jnp.mean((out - y) ** 2), stats

  @nnx.jit
  def step(model, optimizer):
    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)
    (loss, stats), grads = grad_fn(model)
    optimizer.update(model, grads, activation_stats=stats)
    return loss, stats, grads

  expected = _lora_reference_stats(model, x)
  before = _flat(nnx.state(model, nnx.LoRAParam))
  loss0, stats, grads = step(model, optimizer)
  stats, grads = _flat(stats), _flat(grads)
  assert {"hidden/kernel", "head/bias"} <= stats.keys()   # the frozen ones' are there...
  assert set(grads) == set(expected)                       # ... but not in the optimizer's tree
  after = _flat(nnx.state(model, nnx.LoRAParam))
  for path, a in expected.items():
    np.testing.assert_allclose(stats[path], a, rtol=1e-5, err_msg=path)
    # Step 1: M_hat = g, V_hat = A: theta - lr (g / (sqrt(A) + eps) + wd theta).
    step1 = before[path] - 0.1 * (grads[path] / (np.sqrt(a) + 1e-8) + 2e-3 * before[path])
    np.testing.assert_allclose(after[path], step1, rtol=1e-5, atol=1e-7, err_msg=path)
  losses = [float(loss0)] + [float(step(model, optimizer)[0]) for _ in range(15)]
  assert losses[-1] < 0.9 * losses[0]
  now = _flat(nnx.state(model, nnx.Not(nnx.LoRAParam)))
  assert all(np.array_equal(frozen[k], now[k]) for k in frozen)  # the base weights never moved


def test_diffstate_trains_one_submodule_with_the_whole_models_statistics():
  model = _Net(nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(22), (8, 4))
  head = nnx.All(nnx.Param, nnx.PathContains("blocks"), nnx.PathContains(1))
  before = _flat(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, adaact_optax.adaact(0.1), wrt=head)

  def loss_fn(model):
    out, stats = aa_nnx.apply(model, x)
    return jnp.mean(out ** 2), stats

  (_, stats), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, head),
                                         has_aux=True)(model)
  assert set(_flat(grads)) == {"blocks/1/kernel", "blocks/1/bias"} < set(_flat(stats))
  optimizer.update(model, grads, activation_stats=stats)
  after, g = _flat(nnx.state(model, nnx.Param)), _flat(grads)
  assert all(np.array_equal(before[k], after[k]) for k in before if not k.startswith("blocks/1"))
  # The head's input: blocks[0](norm(alias(x))), its statistic the mean of its square.
  h = np.asarray(model.blocks[0](model.norm(model.alias(x))), np.float64)
  a = np.mean(h ** 2, 0)[:, None]
  np.testing.assert_allclose(stats["blocks"][1]["kernel"], a, rtol=1e-5)
  k = "blocks/1/kernel"
  np.testing.assert_allclose(after[k], before[k] - 0.1 * (g[k] / (np.sqrt(a) + 1e-8)
                                                          + 2e-3 * before[k]), rtol=1e-5, atol=1e-7)


def test_statistics_keyed_unlike_the_optimizers_tree_are_an_error():
  model = _LoRAMLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(23), (4, 5))
  # The optimizer of a submodule: its paths ('lora/lora_a') are not the model's ('head/lora/...').
  optimizer = nnx.Optimizer(model.head, adaact_optax.adaact(0.1), wrt=nnx.LoRAParam)
  _, stats = aa_nnx.apply(model, x)
  grads = nnx.state(model.head, nnx.LoRAParam)
  with pytest.raises(ValueError, match=r"matches no parameter.*'head/lora/lora_a'.*"
                                       r"parameters: \['lora/lora_a', 'lora/lora_b'\]"):
    optimizer.update(model.head, grads, activation_stats=stats)
  # A statistic at a trained parameter's path that cannot scale it stays an error, named.
  optimizer = nnx.Optimizer(model, adaact_optax.adaact(0.1), wrt=nnx.LoRAParam)
  bad = nnx.to_pure_dict(stats)
  bad["head"]["lora"]["lora_b"] = jnp.ones((5, 1))
  with pytest.raises(ValueError, match=r"\(5, 1\).*'head/lora/lora_b'.*\(2, 3\)"):
    optimizer.update(model, nnx.state(model, nnx.LoRAParam), activation_stats=bad)


def test_stats_shapes_of_the_whole_model_size_a_lora_optimizer():
  model = nnx.Sequential(nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0)),
                         lambda h: h.mean(axis=(1, 2)),
                         nnx.LoRALinear(6, 2, lora_rank=3, rngs=nnx.Rngs(1)))
  x = jnp.ones((2, 5, 5, 4))
  shapes = aa_nnx.stats_shapes(model, x)                  # every nnx.Param, the conv's too
  assert shapes["layers"][0]["kernel"].shape == (3, 3, 2, 2)
  optimizer = nnx.Optimizer(model, adaact_optax.adaact(0.1, stats_shapes=shapes),
                            wrt=nnx.LoRAParam)
  nu = _flat(nnx.as_pure(optimizer.opt_state)[0].nu)
  assert {k: v.shape for k, v in nu.items()} == {"layers/2/lora/lora_a": (6, 1),
                                                 "layers/2/lora/lora_b": (3, 1)}
  with pytest.raises(ValueError, match=r"stats_shapes matches no parameter.*'conv/kernel'"):
    adaact_optax.adaact(0.1, stats_shapes={"conv": {"kernel": (3, 3, 2, 2)}}).init(
        nnx.as_pure(nnx.state(model, nnx.LoRAParam)))


# --- parity with the authors' trajectories, through nnx.Optimizer -----------

class ParityMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(64, 32, rngs=rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.hidden(x.reshape((x.shape[0], -1)))))


class ParityCNN(nnx.Module):
  def __init__(self, rngs):
    pad = ((1, 1), (1, 1))
    self.conv_a = nnx.Conv(1, 8, (3, 3), padding=pad, use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(8, epsilon=1e-5, use_running_average=False, rngs=rngs)
    self.conv_b = nnx.Conv(8, 16, (3, 3), strides=2, padding=pad, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm(self.conv_a(x)))
    x = nnx.relu(self.conv_b(x))
    return self.head(x.mean(axis=(1, 2)))


# The fixtures use Linen's auto-names; these are the NNX attributes they map to.
PARITY = {
    "mlp": (ParityMLP, {"Dense_0": "hidden", "Dense_1": "head"}),
    "cnn": (ParityCNN, {"Conv_0": "conv_a", "BatchNorm_0": "norm", "Conv_1": "conv_b",
                        "Dense_0": "head"}),
}


def _renamed(tree, names):
  return nnx.from_flat_state({(names[m], p): v for m, leaves in tree.items()
                              for p, v in leaves.items()})


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_nnx_matches_authors_trajectory(fixtures_dir, name):
  data = np.load(fixtures_dir / f"adaact_parity_{name}.npz")
  meta = json.loads(str(data["meta"]))
  cls, names = PARITY[name]
  model = cls(nnx.Rngs(0))
  init = _renamed(_tree(data, "init"), names)
  assert set(_flat(init)) == set(_flat(nnx.state(model, nnx.Param)))
  nnx.update(model, init)
  lrs = jnp.asarray([data[f"lr/{t}"] for t in range(meta["steps"])], jnp.float32)
  tx = adaact_optax.adaact(lambda count: lrs[count], b1=meta["b1"], b2=meta["b2"],
                           eps=meta["eps"], weight_decay=meta["weight_decay"])
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      logits, stats = aa_nnx.apply(model, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats
    (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, activation_stats=stats)
    return loss

  for t in range(meta["steps"]):
    if t:  # each step from the authors' parameters, as in test_parity
      nnx.update(model, _renamed(_tree(data, f"step{t}"), names))
    loss = step(model, optimizer, jnp.asarray(data[f"x/{t}"]), jnp.asarray(data[f"y/{t}"]))
    _close(loss, data["loss"][t], f"loss at step {t}")
    params = _flat(nnx.state(model, nnx.Param))
    for path, value in _flat(_renamed(_tree(data, f"step{t + 1}"), names)).items():
      _close(params[path], value, f"{path} after step {t + 1}", t + 1)
    nu = _flat(nnx.as_pure(optimizer.opt_state)[0].nu)
    for path, value in _flat(_renamed(_tree(data, f"nu{t + 1}"), names)).items():
      assert nu[path].shape == value.shape + (1,)  # keep-rank (*input axes, 1)
      _close(nu[path][..., 0] / (1 - float(np.float32(meta["b2"])) ** (t + 1)), value,
             f"V_hat of {path} after step {t + 1}", t + 1)
  assert int(optimizer.step[...]) == meta["steps"]


class _Grouped(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(4, 6, (3, 3), feature_group_count=2, rngs=rngs)
    self.norm = nnx.BatchNorm(6, use_running_average=False, rngs=rngs)
    self.head = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.conv(x))).mean(axis=(1, 2)))


def test_stats_shapes_for_grouped_convs_and_training_step():
  model = _Grouped(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(5), (3, 5, 5, 4))
  before = _flat(nnx.state(model))
  shapes = aa_nnx.stats_shapes(model, x)
  assert {adaact_optax._src.alignment.path_name(p): s.shape
          for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]} == {
      "conv/kernel": (3, 3, 2, 2), "conv/bias": (1,), "head/kernel": (6, 1), "head/bias": (1,)}
  after = _flat(nnx.state(model))
  assert all(np.array_equal(before[k], after[k]) for k in before)  # BatchNorm stats untouched

  def loss_fn(model):
    out, stats = aa_nnx.apply(model, x)
    return jnp.mean(out ** 2), stats

  plain = nnx.Optimizer(model, adaact_optax.adaact(0.1), wrt=nnx.Param)
  (_, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  with pytest.raises(ValueError, match="conv/kernel.*adaact_optax.nnx.stats_shapes"):
    plain.update(model, grads, activation_stats=stats)

  optimizer = nnx.Optimizer(model, adaact_optax.adaact(0.1, stats_shapes=shapes), wrt=nnx.Param)
  assert optimizer.opt_state[0].nu["conv"]["kernel"].shape == (3, 3, 2, 2)  # (*k, C/G, G)

  @nnx.jit
  def step(model, optimizer):
    (loss, stats), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, activation_stats=stats)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(5)]
  assert losses[-1] < losses[0]
  # The state's V equals the EMA of this step's statistics (constant input: V_hat == A).
  _, stats = aa_nnx.apply(model, x)
  nu = _flat(nnx.as_pure(optimizer.opt_state)[0].nu)
  b2 = float(np.float32(0.999))  # the optimizer's b2, in float32
  assert_f32_close(nu["conv/kernel"] / (1 - b2 ** 5), stats["conv"]["kernel"], steps=5)
