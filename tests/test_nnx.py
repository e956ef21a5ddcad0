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
from test_parity import _close, _tree  # the Linen parity test's fixture helpers


def _flat(tree):
  return {adaact_optax.matching.path_name(p): np.asarray(v)
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


@pytest.mark.parametrize("kwargs,shape", CONVS)
def test_conv_statistics_equal_linen(kwargs, shape):
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
    np.testing.assert_allclose(ours[k], ref[k], rtol=1e-6, atol=1e-7)


def test_linear_and_linear_general_statistics():
  x = jax.random.normal(jax.random.key(2), (3, 2, 5, 4))
  lin = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(aa_nnx.apply(lin, x)[1]["kernel"], jnp.mean(x ** 2, (0, 1, 2)),
                             rtol=1e-6)
  # Contract axes (1, -1) of a (3, 2, 5, 4) input: kernel (2, 4, 7, 2), statistics (2, 4).
  gen = nnx.LinearGeneral((2, 4), (7, 2), axis=(1, -1), rngs=nnx.Rngs(0))
  _, stats = aa_nnx.apply(gen, x)
  assert gen.kernel.shape == (2, 4, 7, 2)
  np.testing.assert_allclose(stats["kernel"], jnp.mean(x ** 2, (0, 2)), rtol=1e-6)
  assert stats["bias"].shape == ()
  # batch_axis keeps one statistic per batch index: kernel (3, 4, 5), statistics (3, 4).
  xb = jax.random.normal(jax.random.key(3), (3, 6, 4))
  batched = nnx.LinearGeneral(4, 5, batch_axis={0: 3}, use_bias=False, rngs=nnx.Rngs(0))
  _, stats = aa_nnx.apply(batched, xb)
  assert set(_flat(stats)) == {"kernel"}
  np.testing.assert_allclose(stats["kernel"], jnp.mean(xb ** 2, 1), rtol=1e-6)
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
  np.testing.assert_allclose(stats["alias"]["kernel"], pooled.mean, rtol=1e-5)
  np.testing.assert_allclose(stats["blocks"][1]["kernel"],
                             jnp.mean(model.blocks[0](normed) ** 2, 0), rtol=1e-5)


class _Scaled(nnx.Linear):
  """A subclass whose __call__ reaches nnx.Linear's through super()."""

  def __call__(self, x):
    return 2 * super().__call__(x)


def test_subclass_dtype_and_no_gradient_through_statistics():
  layer = _Scaled(3, 2, rngs=nnx.Rngs(0))
  x = jnp.arange(6.0, dtype=jnp.bfloat16).reshape(2, 3)
  _, stats = aa_nnx.apply(layer, x)
  assert stats["kernel"].dtype == jnp.float32
  np.testing.assert_allclose(stats["kernel"], jnp.mean(jnp.float32(x) ** 2, 0))
  grad = jax.grad(lambda x: jnp.sum(aa_nnx.apply(layer, x)[1]["kernel"]))(x.astype(jnp.float32))
  assert not np.any(np.asarray(grad))


def test_classes_restored_and_unsupported_uses_raise():
  original = nnx.Linear.__dict__["__call__"]
  layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

  def broken(x):
    layer(x)
    raise ZeroDivisionError

  with pytest.raises(ZeroDivisionError):
    aa_nnx.apply(broken, jnp.ones((1, 2)))
  assert nnx.Linear.__dict__["__call__"] is original
  assert layer(jnp.ones((1, 2))).shape == (1, 2)

  outsider = nnx.Linear(2, 2, rngs=nnx.Rngs(1))

  class Leaky(nnx.Module):
    def __init__(self):
      self.lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return self.lin(outsider(x))

  with pytest.raises(ValueError, match="'kernel' of shape \\(2, 2\\) is not among"):
    aa_nnx.apply(Leaky(), jnp.ones((1, 2)))

  class Remat(nnx.Module):
    def __init__(self):
      self.lin = nnx.Linear(2, 2, rngs=nnx.Rngs(0))

    def __call__(self, x):
      return nnx.remat(lambda lin, x: lin(x))(self.lin, x)

  with pytest.raises(ValueError, match="nnx.scan/vmap/remat"):
    aa_nnx.apply(Remat(), jnp.ones((1, 2)))
  assert nnx.Linear.__dict__["__call__"] is original


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
    loss = step(model, optimizer, jnp.asarray(data[f"x/{t}"]), jnp.asarray(data[f"y/{t}"]))
    _close(loss, data["loss"][t], f"loss at step {t}")
    params = _flat(nnx.state(model, nnx.Param))
    for path, value in _flat(_renamed(_tree(data, f"step{t + 1}"), names)).items():
      _close(params[path], value, f"{path} after step {t + 1}")
    nu = _flat(nnx.as_pure(optimizer.opt_state)[0].nu)
    for path, value in _flat(_renamed(_tree(data, f"nu{t + 1}"), names)).items():
      assert nu[path].shape == value.shape + (1,)  # keep-rank (*input axes, 1)
      _close(nu[path][..., 0] / (1 - meta["b2"] ** (t + 1)), value,
             f"V_hat of {path} after step {t + 1}")
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
  assert {adaact_optax.matching.path_name(p): s.shape
          for p, s in jax.tree_util.tree_flatten_with_path(shapes)[0]} == {
      "conv/kernel": (3, 3, 4), "conv/bias": (), "head/kernel": (6,), "head/bias": ()}
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
  expected = adaact_optax.matching.to_keep_rank(stats["conv"]["kernel"], (3, 3, 2, 6), "conv")
  np.testing.assert_allclose(nu["conv/kernel"] / (1 - 0.999 ** 5), expected,
                             rtol=1e-4)  # float32 EMA rounding


def test_layer_moments_for_one_layer():
  x = jnp.arange(12.0).reshape(4, 3)
  stats = aa_nnx.layer_moments(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), x)
  np.testing.assert_allclose(stats["kernel"].mean, jnp.mean(x ** 2, 0))
  assert stats["kernel"].rows == 4 and stats["bias"].rows == 4
  assert aa_nnx.layer_moments(nnx.LayerNorm(3, rngs=nnx.Rngs(0)), x) == {}
  embed = nnx.Embed(5, 2, rngs=nnx.Rngs(0))
  assert aa_nnx.layer_moments(embed, jnp.array([1, 1])) == {}
  np.testing.assert_allclose(aa_nnx.layer_moments(embed, jnp.array([1, 1]), embeddings=0.5)
                             ["embedding"].mean, [0.5, 1.5, 0.5, 0.5, 0.5])
