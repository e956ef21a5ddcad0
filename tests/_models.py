"""Small Flax Linen models that library tests share, independent of ``examples/``.

* ``ResNet``: the CIFAR residual network (He et al. 2016, sec. 4.2): bias-free 3x3
  convolutions with BatchNorm, option-A shortcuts (subsample, zero-pad the channels),
  ``blocks`` per stage (1: ResNet-8, 3: ResNet-20). ``(B, H, W, C)`` -> ``(B, classes)``.
* ``StridedCNN``: 3x3 convolutions with symmetric padding 1, the first at stride 1 and
  the others at stride 2, relu, flatten, Dense -> Dense. ``(B, H, W, C)`` -> ``(B, classes)``.
* ``GPT``: a GPT-2 style language model: tied token embedding, learned positions,
  ``depth`` pre-LayerNorm causal blocks whose attention has one fused ``(dim, 3 dim)``
  QKV kernel. int ``(B, T)`` -> logits ``(B, T, vocab)``.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

_SAME_3X3 = ((1, 1), (1, 1))  # PyTorch's padding 1; Flax's 'SAME' is asymmetric at stride 2


class ResNet(nn.Module):
  num_classes: int = 10
  blocks: int = 1
  widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5)
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=_SAME_3X3, use_bias=False)
    x = nn.relu(norm()(conv(self.widths[0])(x)))
    for stage, width in enumerate(self.widths):
      for b in range(self.blocks):
        stride = 2 if stage > 0 and b == 0 else 1
        y = nn.relu(norm()(conv(width, strides=(stride, stride))(x)))
        y = norm()(conv(width)(y))
        if stride > 1 or x.shape[-1] != width:
          x = x[:, ::stride, ::stride]
          extra = width - x.shape[-1]
          x = jnp.pad(x, ((0, 0),) * 3 + ((extra // 2, extra - extra // 2),))
        x = nn.relu(x + y)
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class StridedCNN(nn.Module):
  num_classes: int = 10
  features: Sequence[int] = (32, 64)
  hidden: int = 128

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.features):
      stride = (1, 1) if i == 0 else (2, 2)
      x = nn.relu(nn.Conv(width, (3, 3), strides=stride, padding=_SAME_3X3)(x))
    x = nn.relu(nn.Dense(self.hidden)(x.reshape((x.shape[0], -1))))
    return nn.Dense(self.num_classes)(x)


class GPT(nn.Module):
  dim: int
  depth: int
  heads: int
  mlp_dim: int
  context: int
  vocab: int = 256

  @nn.compact
  def __call__(self, tokens):
    b, t = tokens.shape
    embed = nn.Embed(self.vocab, self.dim, embedding_init=nn.initializers.normal(0.02))
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.context, self.dim))
    x = embed(tokens) + pos[:t]
    causal = nn.make_causal_mask(tokens)                        # (B, 1, T, T)
    by_head = lambda z: z.reshape(b, t, self.heads, self.dim // self.heads)
    for _ in range(self.depth):
      q, k, v = jnp.split(nn.Dense(3 * self.dim)(nn.LayerNorm()(x)), 3, axis=-1)
      z = nn.dot_product_attention(by_head(q), by_head(k), by_head(v), mask=causal)
      x = x + nn.Dense(self.dim)(z.reshape(b, t, self.dim))
      x = x + nn.Dense(self.dim)(nn.gelu(nn.Dense(self.mlp_dim)(nn.LayerNorm()(x))))
    return embed.attend(nn.LayerNorm()(x))
