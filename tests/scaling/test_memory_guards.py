"""Deterministic memory guards: optimizer-state size and no patch-sized buffers.

Speed lives in benchmarks/bench.py; these checks look only at shapes and at
the compiled HLO, so they are exact and machine-independent.
"""

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax import lax

import adaact_optax
from adaact_optax import linen as aa_linen
from adaact_optax import moments
from examples import models

# Array shapes in HLO text: "f32[8,16,16,144]{3,2,1,0}".
_SHAPE = re.compile(r"\b(?:pred|[subf]\d+|bf16|f8\w*)\[([\d,]*)\]")


def largest_buffer(compiled) -> int:
  """Elements of the largest array any instruction of a compiled program has."""
  return max(math.prod(int(d) for d in dims.split(",") if d)
             for dims in _SHAPE.findall(compiled.as_text()))


def tree_bytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_resnet_state_is_about_half_of_adams():
  # eval_shape: the state's shapes and dtypes without allocating or compiling.
  model = models.ResNet(num_classes=10, blocks=1)  # ResNet-8
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                             train=False))["params"]
  ours = jax.eval_shape(adaact_optax.adaact(0.1).init, params)
  adam = jax.eval_shape(optax.adam(1e-3).init, params)
  ratio = tree_bytes(ours) / tree_bytes(adam)
  assert ratio <= 0.55, f"AdaAct state is {ratio:.3f} x Adam's"
  # Never a parameter-sized second moment: nu is per input feature.
  nu = ours[0].nu
  for (path, p), v in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(nu)):
    assert v.size <= max(1, p.size // p.shape[-1]), (jax.tree_util.keystr(path), v.shape)


# (input shape, kernel, strides, padding, kernel_dilation): a stride-1 and a
# stride-2 conv, a dilated one, and a 1-D one; patches are 9x-25x the input.
CONVS = [
    ((8, 16, 16, 16), (3, 3), 1, "SAME", 1),
    ((8, 16, 16, 16), (3, 3), 2, ((1, 1), (1, 1)), 1),
    ((4, 16, 16, 8), (5, 5), 1, "SAME", 2),
    ((8, 64, 8), (9,), 1, "CIRCULAR", 1),
]


def _patch_elements(shape, kernel, strides, padding, dilation):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  rank = len(kernel)
  patches = jax.eval_shape(
      lambda x: lax.conv_general_dilated_patches(
          x, kernel, (strides,) * rank, "VALID" if padding == "CIRCULAR" else padding,
          rhs_dilation=(dilation,) * rank,
          dimension_numbers=lax.conv_dimension_numbers(
              shape, (1, 1) + kernel, ("N" + "HW"[:rank] + "C", "OI" + "HW"[:rank],
                                       "N" + "HW"[:rank] + "C"))), x)
  return patches.size, x


@pytest.mark.parametrize("shape,kernel,strides,padding,dilation", CONVS)
def test_conv_moments_never_build_patches(shape, kernel, strides, padding, dilation):
  patch_elements, x = _patch_elements(shape, kernel, strides, padding, dilation)
  f = jax.jit(lambda x: moments.conv_moments(x, kernel, strides, padding,
                                             kernel_dilation=dilation).mean)
  compiled = f.lower(x).compile()
  assert largest_buffer(compiled) < patch_elements
  # At most the input padded as the conv pads it (k x smaller than the patches).
  padded = math.prod(shape[:1] + tuple(n + (k - 1) * dilation for n, k in
                                       zip(shape[1:-1], kernel)) + shape[-1:])
  assert largest_buffer(compiled) <= padded
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < 4 * patch_elements, (temp, patch_elements)


def test_the_patch_detector_sees_real_patches():
  # The guard above is not vacuous: the naive statistic (mean of the patches
  # squared) does compile a patch-sized buffer, and largest_buffer finds it.
  shape, kernel, strides, padding, dilation = CONVS[0]
  patch_elements, x = _patch_elements(shape, kernel, strides, padding, dilation)
  naive = jax.jit(lambda x: jnp.mean(jnp.square(lax.conv_general_dilated_patches(
      x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "OIHW", "NHWC"))), axis=(0, 1, 2)))
  assert largest_buffer(naive.lower(x).compile()) >= patch_elements


class _TwoConvs(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    return nn.Conv(16, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False)(x)


def test_linen_capture_never_builds_patches():
  model = _TwoConvs()
  x = jnp.zeros((8, 16, 16, 16))
  variables = model.init(jax.random.key(0), x)
  patch_elements, _ = _patch_elements(x.shape, (3, 3), 1, "SAME", 1)

  def stats(variables, x):
    return aa_linen.apply(model, variables, x)[1][aa_linen.COLLECTION]

  compiled = jax.jit(stats).lower(variables, x).compile()
  assert jax.tree.map(jnp.shape, jax.eval_shape(stats, variables, x)) == {
      "Conv_0": {"kernel": (3, 3, 16, 1), "bias": (1,)}, "Conv_1": {"kernel": (3, 3, 16, 1)}}
  assert largest_buffer(compiled) < patch_elements
  # Capture adds no patch-sized temporaries to the forward pass it rides on.
  plain = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, x).compile()
  forward = jax.jit(lambda v, x: aa_linen.apply(model, v, x)).lower(variables, x).compile()
  extra = (forward.memory_analysis().temp_size_in_bytes
           - plain.memory_analysis().temp_size_in_bytes)
  assert extra < 4 * patch_elements, (extra, patch_elements)
  assert largest_buffer(forward) < patch_elements
