"""The byte-level language model: ``ByteGPT``."""

from __future__ import annotations

import flax.linen as nn

from examples.transformer import EncoderBlock


class ByteGPT(nn.Module):
  """GPT-style byte-level language model.

  Token embedding ``embed`` (vocab, dim) plus a learned position embedding
  ``pos_embed`` (context, dim), ``depth`` pre-norm causal blocks, a final
  LayerNorm, and logits over the next byte: ``embed.attend`` (tied, the
  default) or a ``head`` Dense (vocab outputs). ``fused_qkv``: each block's
  attention has one fused (dim, 3 dim) QKV kernel, as in GPT-2.

  ``__call__(tokens)``: int ``(B, T)`` with ``T <= context`` -> logits
  ``(B, T, vocab)``.
  """

  vocab: int = 256
  context: int = 64
  dim: int = 128
  depth: int = 2
  heads: int = 4
  mlp_dim: int = 512
  tied: bool = True
  fused_qkv: bool = False

  @nn.compact
  def __call__(self, tokens, train: bool = True):
    del train
    if tokens.shape[-1] > self.context:
      raise ValueError(f"ByteGPT got {tokens.shape[-1]} tokens, more than its context "
                       f"{self.context}")
    embed = nn.Embed(self.vocab, self.dim, embedding_init=nn.initializers.normal(0.02),
                     name="embed")
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.context, self.dim))
    x = embed(tokens) + pos[: tokens.shape[-1]]
    for i in range(self.depth):
      x = EncoderBlock(self.dim, self.heads, self.mlp_dim, causal=True, fused_qkv=self.fused_qkv,
                       name=f"CausalBlock_{i}")(x)
    x = nn.LayerNorm()(x)
    return embed.attend(x) if self.tied else nn.Dense(self.vocab, name="head")(x)
