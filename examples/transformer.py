"""The transformer block the image and language models share (``ViT``, ``ByteGPT``).

``EncoderBlock``: pre-norm, optionally causal, with Flax's
``MultiHeadDotProductAttention`` or one fused QKV kernel
(``FusedSelfAttention``, GPT-2 style). Inputs and outputs are ``(B, T, dim)``.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class FusedSelfAttention(nn.Module):
  """Multi-head self-attention with one fused QKV kernel, GPT-2 style.

  ``qkv``: Dense(3 * dim), split into q, k, v after the matmul; ``out``:
  Dense(dim). ``x``: (B, T, dim) -> (B, T, dim). ``mask``: broadcastable to
  (B, heads, T, T), True where a query may attend to a key.
  """

  dim: int
  heads: int

  @nn.compact
  def __call__(self, x, mask=None):
    b, t, _ = x.shape
    q, k, v = jnp.split(nn.Dense(3 * self.dim, name="qkv")(x), 3, axis=-1)
    heads = lambda z: z.reshape(b, t, self.heads, self.dim // self.heads)
    z = nn.dot_product_attention(heads(q), heads(k), heads(v), mask=mask)
    return nn.Dense(self.dim, name="out")(z.reshape(b, t, self.dim))


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: x + MHA(LN(x)); x + MLP(LN(x)). ``x``: (B, T, dim).

  ``causal``: each position attends to itself and earlier ones only (a decoder block).
  ``fused_qkv``: one (dim, 3 dim) QKV kernel (``FusedSelfAttention``) instead of
  Flax's ``MultiHeadDotProductAttention`` (separate query/key/value kernels).
  """

  dim: int
  heads: int
  mlp_dim: int
  causal: bool = False
  fused_qkv: bool = False

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm()(x)
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32)) if self.causal else None
    if self.fused_qkv:
      x = x + FusedSelfAttention(self.dim, self.heads)(y, mask=mask)
    else:
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim)(
          y, y, mask=mask)
    y = nn.LayerNorm()(x)
    y = nn.Dense(self.dim)(nn.gelu(nn.Dense(self.mlp_dim)(y)))
    return x + y
