"""The image classifiers: ``mlp``, ``cnn``, ``resnet20``, ``vit_tiny`` (Flax Linen).

Every model takes inputs ``(batch, *spatial, channels)`` with one or two
spatial axes (MNIST-1D: ``(B, 40, 1)``; digits: ``(B, 8, 8, 1)``; CIFAR-10:
``(B, 32, 32, 3)``) and returns logits ``(batch, num_classes)``. Convolutions
and patches follow the number of spatial axes, so each model runs on 1-D and
2-D data unchanged. ``__call__(x, train)``: ``train`` selects BatchNorm's batch
statistics (``mutable=['batch_stats']``) over its running averages.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from examples.transformer import EncoderBlock

MODELS = ("mlp", "cnn", "resnet20", "vit_tiny")


def _spatial(x) -> int:
  return x.ndim - 2


def _pad(rank: int, p: int = 1):
  # Explicit symmetric padding, as in PyTorch: Flax's 'SAME' pads stride-2
  # convolutions asymmetrically.
  return ((p, p),) * rank


class MLP(nn.Module):
  """Flatten -> (Dense -> relu) per hidden width -> Dense(num_classes)."""

  num_classes: int = 10
  hidden: Sequence[int] = (256, 256)

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """Conv 3 (stride 1) then stride-2 convs, relu, flatten, Dense -> Dense."""

  num_classes: int = 10
  features: Sequence[int] = (32, 64, 64)
  hidden: int = 128

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    rank = _spatial(x)
    for i, f in enumerate(self.features):
      stride = 1 if i == 0 else 2
      x = nn.relu(nn.Conv(f, (3,) * rank, strides=(stride,) * rank, padding=_pad(rank))(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


class BasicBlock(nn.Module):
  """ResNet basic block; option-A shortcut (subsample, zero-pad channels)."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = True):
    rank = _spatial(x)
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
    y = nn.Conv(self.features, (3,) * rank, strides=(self.stride,) * rank,
                padding=_pad(rank), use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.features, (3,) * rank, padding=_pad(rank), use_bias=False)(y)
    y = norm()(y)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = x[(slice(None),) + (slice(None, None, self.stride),) * rank]
      extra = self.features - x.shape[-1]
      shortcut = jnp.pad(shortcut, [(0, 0)] * (rank + 1) + [(extra // 2, extra - extra // 2)])
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """CIFAR ResNet (He et al. 2016, sec. 4.2): 6n+2 layers, widths 16/32/64.

  ``blocks=3`` is ResNet-20 (about 0.27M parameters for 10 classes).
  """

  num_classes: int = 10
  blocks: int = 3
  widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x, train: bool = True):
    rank = _spatial(x)
    x = nn.Conv(self.widths[0], (3,) * rank, padding=_pad(rank), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
    for stage, width in enumerate(self.widths):
      for b in range(self.blocks):
        stride = 2 if stage > 0 and b == 0 else 1
        x = BasicBlock(width, stride)(x, train)
    x = x.mean(axis=tuple(range(1, rank + 1)))
    return nn.Dense(self.num_classes)(x)


class ViT(nn.Module):
  """Vision transformer: patch embedding (a conv with stride = patch), a
  learned position embedding, pre-norm blocks, mean-pooled tokens, Dense head.

  Defaults are ViT-tiny-ish for 32x32 inputs (dim 192, depth 12, heads 3,
  mlp 768, patch 4: about 5.4M parameters).
  """

  num_classes: int = 10
  patch: int = 4
  dim: int = 192
  depth: int = 12
  heads: int = 3
  mlp_dim: int = 768

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    rank = _spatial(x)
    for size in x.shape[1:-1]:
      if size % self.patch:
        raise ValueError(f"ViT patch {self.patch} does not divide the input size {x.shape[1:-1]}")
    x = nn.Conv(self.dim, (self.patch,) * rank, strides=(self.patch,) * rank, padding="VALID",
                name="patch_embed")(x)
    x = x.reshape((x.shape[0], -1, self.dim))                      # (B, tokens, dim)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1,) + x.shape[1:])
    x = x + pos
    for _ in range(self.depth):
      x = EncoderBlock(self.dim, self.heads, self.mlp_dim)(x)
    x = nn.LayerNorm()(x).mean(axis=1)
    return nn.Dense(self.num_classes)(x)


def _default_patch(input_shape: Sequence[int]) -> int:
  # The largest of 4, 2, 1 leaving >= 4 patches per axis: 32 -> 4, 40 -> 4, 8 -> 2.
  smallest = min(input_shape[:-1])
  for p in (4, 2, 1):
    if smallest % p == 0 and smallest // p >= 4:
      return p
  return 1


def get_model(name: str, num_classes: int, input_shape: Sequence[int], **kwargs: Any) -> nn.Module:
  """The model ``name`` for inputs of shape ``input_shape`` (no batch axis).

  ``input_shape`` is ``(*spatial, channels)`` with 1 or 2 spatial axes.
  ``kwargs`` override the model's fields (e.g. ``depth=2, dim=32`` for a
  small ViT). ``vit_tiny``'s patch defaults to 4 when it leaves >= 4 patches
  per axis (32x32 and 40), else 2 (8x8 digits).
  """
  input_shape = tuple(input_shape)
  if len(input_shape) not in (2, 3):
    raise ValueError(f"input_shape must be (*spatial, channels) with 1 or 2 spatial axes, "
                     f"got {input_shape}")
  builders: dict[str, Callable[..., nn.Module]] = {
      "mlp": MLP,
      "cnn": CNN,
      "resnet20": lambda **kw: ResNet(**{"blocks": 3, **kw}),
      "vit_tiny": lambda **kw: ViT(**{"patch": _default_patch(input_shape), **kw}),
  }
  if name not in builders:
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
  return builders[name](num_classes=num_classes, **kwargs)
