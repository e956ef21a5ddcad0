"""The authors' parity models and readers of their recorded trajectories
(tests/fixtures/adaact_parity_*.npz), shared by the Linen, NNX and building-block tests."""

import flax.linen as nn
import jax.numpy as jnp

from conftest import assert_f32_close


class ParityMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(10)(x)


class ParityCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, epsilon=1e-5)(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2, padding=((1, 1), (1, 1)))(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


MODELS = {"mlp": ParityMLP, "cnn": ParityCNN}


def fixture_tree(data, prefix):
  out = {}
  for key in data.files:
    if key.startswith(prefix + "/"):
      module, name = key[len(prefix) + 1:].split("/")
      out.setdefault(module, {})[name] = jnp.asarray(data[key])
  return out


# The authors' step is PyTorch's program (its own convolution and reduction orders),
# ours is XLA's: per step, a forward and backward pass and the update round differently
# (the bound the other model-step comparisons use).
PARITY_ULPS = 64


def assert_parity_close(ours, ref, what, steps=1):
  assert_f32_close(ours, ref, steps=steps, ulps_per_step=PARITY_ULPS, err_msg=f"{what}: ")
