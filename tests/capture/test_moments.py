"""Input statistics against brute force: real patches built with numpy loops."""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from adaact_optax import linen as aa_linen
from adaact_optax import moments
from conftest import assert_f32_close


def _same_pads(n, k_eff, stride, lower=False):
  # lax's SAME: resolved against the undilated input length.
  out = -(-n // stride)
  total = max((out - 1) * stride + k_eff - n, 0)
  lo = total - total // 2 if lower else total // 2
  return lo, total - lo


def brute_patches(x, kernel_size, strides, padding, input_dilation, kernel_dilation):
  """Every patch the convolution multiplies, as (B, positions, *kernel_size, C)."""
  x = np.asarray(x, np.float64)
  rank = len(kernel_size)
  k_eff = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
  if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
    if padding == "CAUSAL":
      pre = [(k_eff[0] - 1, 0)]
      x = np.pad(x, [(0, 0)] + pre + [(0, 0)])
    else:
      pre = [((k - 1) // 2, k // 2) for k in k_eff]
      x = np.pad(x, [(0, 0)] + pre + [(0, 0)], mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
    pads = [(0, 0)] * rank
  elif padding in ("SAME", "SAME_LOWER"):
    pads = [_same_pads(n, ke, s, padding == "SAME_LOWER")
            for n, ke, s in zip(x.shape[1:-1], k_eff, strides)]
  elif padding == "VALID":
    pads = [(0, 0)] * rank
  elif isinstance(padding, int):
    pads = [(padding, padding)] * rank
  else:
    pads = list(padding)
  # Input dilation inserts zeros between input elements, then padding adds zeros.
  dil_shape = [(n - 1) * d + 1 for n, d in zip(x.shape[1:-1], input_dilation)]
  xd = np.zeros((x.shape[0], *dil_shape, x.shape[-1]))
  xd[(slice(None),) + tuple(slice(None, None, d) for d in input_dilation)] = x
  xp = np.pad(xd, [(0, 0)] + pads + [(0, 0)])
  out = [(n - ke) // s + 1 for n, ke, s in zip(xp.shape[1:-1], k_eff, strides)]
  patches = np.zeros((x.shape[0], math.prod(out), *kernel_size, x.shape[-1]))
  for pi, p in enumerate(itertools.product(*map(range, out))):
    for o in itertools.product(*map(range, kernel_size)):
      idx = tuple(pp * s + oo * d for pp, s, oo, d in zip(p, strides, o, kernel_dilation))
      patches[(slice(None), pi) + o] = xp[(slice(None),) + idx]
  return patches, out


def brute_moments(*args):
  patches, _ = brute_patches(*args)
  return np.mean(np.square(patches), axis=(0, 1))


pad_choice = st.one_of(
    st.sampled_from(["SAME", "VALID", "CIRCULAR", "REFLECT", "SAME_LOWER"]),
    st.integers(0, 2),
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), min_size=2, max_size=2),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rank=st.sampled_from([1, 2]),
    spatial=st.lists(st.integers(1, 9), min_size=2, max_size=2),
    channels=st.integers(1, 4),
    batch=st.integers(1, 3),
    kernel=st.lists(st.integers(1, 3), min_size=2, max_size=2),
    strides=st.lists(st.integers(1, 3), min_size=2, max_size=2),
    in_dil=st.lists(st.integers(1, 2), min_size=2, max_size=2),
    k_dil=st.lists(st.integers(1, 2), min_size=2, max_size=2),
    padding=pad_choice,
    seed=st.integers(0, 2**16),
)
def test_conv_moments_equal_brute_force_patches(rank, spatial, channels, batch, kernel, strides,
                                                in_dil, k_dil, padding, seed):
  spatial, kernel, strides, in_dil, k_dil = (tuple(v[:rank]) for v in
                                              (spatial, kernel, strides, in_dil, k_dil))
  if isinstance(padding, list):
    padding = [tuple(p) for p in padding[:rank]]
  k_eff = [(k - 1) * d + 1 for k, d in zip(kernel, k_dil)]
  if padding in ("CIRCULAR", "REFLECT"):
    # Flax pads the undilated input; wrap/reflect need enough input to copy from.
    assume(all(k // 2 < n for k, n in zip(k_eff, spatial)))
    if padding == "REFLECT":
      assume(all(k // 2 <= n - 1 and (k - 1) // 2 <= n - 1 for k, n in zip(k_eff, spatial)))
  x = np.random.default_rng(seed).normal(size=(batch, *spatial, channels)).astype(np.float32)
  try:
    patches, out_shape = brute_patches(x, kernel, strides, padding, in_dil, k_dil)
  except ValueError:
    assume(False)  # numpy rejects the padding (e.g. reflect of a length-1 axis)
  assume(np.all(np.array(out_shape) > 0))  # a conv with no output positions has no rows
  expected = np.mean(np.square(patches), axis=(0, 1))

  layer = nn.Conv(3, kernel, strides=strides, padding=padding, input_dilation=in_dil,
                  kernel_dilation=k_dil)
  try:
    variables = jax.jit(layer.init)(jax.random.key(0), x)
  except ValueError:
    assume(False)  # lax has no string padding with input dilation; Flax fails too
  y, mutated = jax.jit(lambda v, x: aa_linen.apply(layer, v, x))(variables, x)
  stats = mutated[aa_linen.COLLECTION]
  assert_f32_close(stats["kernel"][..., 0], expected)  # keep-rank (*k, C, 1)
  assert stats["bias"] == 1.0
  # The brute-force patches are the ones the real convolution uses: patches . kernel == Flax's output.
  kernel_value = np.asarray(variables["params"]["kernel"], np.float64)
  y_brute = np.tensordot(patches, kernel_value, axes=(list(range(2, 3 + rank)), list(range(rank + 1))))
  assert_f32_close(np.asarray(y).reshape(batch, -1, 3), y_brute + np.asarray(variables["params"]["bias"]))


def test_conv3d_causal1d_and_extra_batch_axes():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 4, 3, 2)).astype(np.float32)
  got = moments.conv_moments(x, (2, 3, 2), strides=(2, 1, 1), padding="SAME", kernel_dilation=(1, 1, 2))
  assert_f32_close(got.mean, brute_moments(x, (2, 3, 2), (2, 1, 1), "SAME", (1, 1, 1), (1, 1, 2)))
  x1 = rng.normal(size=(3, 7, 2)).astype(np.float32)
  got = moments.conv_moments(x1, (3,), padding="CAUSAL", kernel_dilation=2)
  assert_f32_close(got.mean, brute_moments(x1, (3,), (1,), "CAUSAL", (1,), (2,)))
  assert got.rows == 3 * 7
  # Several leading batch axes pool like one; no batch axis is one example.
  x4 = rng.normal(size=(2, 3, 6, 6, 2)).astype(np.float32)
  assert_f32_close(moments.conv_moments(x4, (3, 3)).mean,
                   moments.conv_moments(x4.reshape(6, 6, 6, 2), (3, 3)).mean)
  single = moments.conv_moments(x4[0, 0], (3, 3))
  assert_f32_close(single.mean, moments.conv_moments(x4[0, :1], (3, 3)).mean)
  assert single.rows == 36


def test_conv_moments_are_float32_from_low_precision_and_stop_gradient():
  x = jnp.ones((2, 4, 4, 3), jnp.bfloat16) * 3
  got = moments.conv_moments(x, (3, 3), padding="VALID")
  assert got.mean.dtype == jnp.float32
  assert_f32_close(got.mean, np.full(got.mean.shape, 9.0))
  grad = jax.grad(lambda x: moments.conv_moments(x, (3, 3)).mean.sum())(jnp.ones((1, 4, 4, 1)))
  assert not np.any(grad)


def test_conv_moments_never_build_patches():
  # batch x positions x kh*kw*C would be 64*32*32*9*16 floats; nothing that size may be
  # allocated (a copy of x**2, 9x smaller, is allowed).
  x = jax.ShapeDtypeStruct((64, 32, 32, 16), jnp.float32)
  compiled = jax.jit(lambda x: moments.conv_moments(x, (3, 3), padding="SAME").mean).lower(x).compile()
  patch_bytes = 64 * 32 * 32 * 9 * 16 * 4
  assert compiled.memory_analysis().temp_size_in_bytes < patch_bytes / 4


def test_dense_moments_rank3_and_general_axes():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 5, 3)).astype(np.float32)
  got = moments.dense_moments(x)
  assert_f32_close(got.mean, np.mean(x.reshape(-1, 3) ** 2, axis=0))
  assert got.rows == 10
  # DenseGeneral contracting axes (1, 3) of (B, H, T, D): statistics (H, D) over B and T.
  x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  got = moments.dense_moments(x, contracting_axes=(3, 1))
  assert_f32_close(got.mean, np.mean(x ** 2, axis=(0, 2)).T)
  assert got.rows == 8
  # batch_dims keep their own statistics and come first.
  got = moments.dense_moments(x, contracting_axes=(-1,), batch_axes=(0,))
  assert_f32_close(got.mean, np.mean(x ** 2, axis=(1, 2)))
  assert got.rows == 12


def test_combine_pools_rows():
  a = moments.InputMoments(jnp.array([1.0, 2.0]), 1)
  b = moments.InputMoments(jnp.array([4.0, 8.0]), 3)
  got = moments.combine(a, b)
  assert_f32_close(got.mean, np.array([13 / 4, 26 / 4]))
  assert got.rows == 4


def test_conv_moments_bad_shapes_name_them():
  with pytest.raises(ValueError, match="no output"):
    moments.conv_moments(jnp.ones((1, 2, 2, 1)), (3, 3), padding="VALID")
  with pytest.raises(ValueError, match="spatial"):
    moments.conv_moments(jnp.ones((2, 1)), (3, 3))
