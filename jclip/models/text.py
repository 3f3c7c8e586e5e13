"""Causal text transformer tower, pooled at the end-of-text token (CLIP)."""

import flax.linen as nn
import jax.numpy as jnp

from jclip.models.transformer import Encoder


class TextTransformer(nn.Module):
    """Token ids [B, L] (0 = padding) -> embeddings [B, embed_dim] (not normalised).

    The sequence is read through a causal mask and pooled at its last
    non-padding position, which is the end-of-text token for fixed-length
    padded ids (the tokenizer keeps it on truncation). For OpenAI-tokenised
    text this is the same position as CLIP's argmax over the ids.
    """

    embed_dim: int
    vocab_size: int
    context_length: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    causal: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"tokens must be [batch, length <= {self.context_length}]; got shape {tokens.shape}"
            )
        length = tokens.shape[1]
        x = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     dtype=self.dtype, name="token_embedding")(tokens)
        pos = self.param("pos_embedding", nn.initializers.normal(0.01), (self.context_length, self.width))
        x = x + pos[:length].astype(x.dtype)
        mask = nn.make_causal_mask(tokens) if self.causal else None
        x = Encoder(self.depth, self.num_heads, self.mlp_ratio, self.activation, self.dtype, name="encoder")(x, mask)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
        last = jnp.maximum(jnp.sum(tokens != 0, axis=1) - 1, 0)
        x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        return nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, name="proj")(x)
