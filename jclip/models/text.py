"""Text transformer tower: token + position embeddings, encoder, pooling, projection."""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from jclip.models.execution import ExecutionOptions
from jclip.models.partitioning import Embed, initializer
from jclip.models.transformer import Encoder, check_option, dense, normalization

POOLS = ("eos", "argmax", "last")
POSITIONS = ("learned", "rope")


class TextTransformer(nn.Module):
    """Token ids [B, L] (0 = padding) -> embeddings [B, embed_dim] (not normalised).

    `pool` picks the token whose features become the embedding:

    - "eos": the last non-padding position, i.e. the end-of-text token of
      fixed-length padded ids (jclip's tokenizer keeps it on truncation);
    - "argmax": the position of the largest id, OpenAI CLIP's rule (its
      end-of-text token has the largest id);
    - "last": the last position (SigLIP, whose ids are padded to full length).

    `causal`: each token sees only those before it (CLIP); SigLIP's text
    encoder is bidirectional. `proj_bias`: a bias on the projection (SigLIP).

    `position`: "learned", a learned embedding added to each position's token
    embedding (CLIP), or "rope", rotary position embeddings with base
    `rope_theta` in every attention layer and no position parameters.
    `norm`, `mlp`, `qk_norm`: the transformer's options (`Encoder`), `norm`
    ("layer" or "rms") also that of the final norm. With all four set
    (`norm="rms", mlp="gated", activation="silu", mlp_ratio=8 / 3,
    qk_norm=True, position="rope"`) the tower's blocks are those of recent
    language models such as Llama.

    `options`: how the layers run, set by the model (`ExecutionOptions`).
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
    pool: str = "eos"
    proj_bias: bool = False
    norm_eps: float = 1e-6
    norm: str = "layer"
    mlp: str = "standard"
    qk_norm: bool = False
    position: str = "learned"
    rope_theta: float = 10000.0
    options: ExecutionOptions = ExecutionOptions()

    def _pool(self, x, tokens):
        if self.pool == "eos":
            index = jnp.maximum(jnp.sum(tokens != 0, axis=1) - 1, 0)
        elif self.pool == "argmax":
            index = jnp.argmax(tokens, axis=1)
        else:
            return x[:, -1]
        return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]

    @nn.compact
    def __call__(self, tokens):
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(
                f"tokens must be [batch, length <= {self.context_length}]; got shape {tokens.shape}"
            )
        if self.pool not in POOLS:
            raise ValueError(f"unknown text pool {self.pool!r}; use one of {POOLS}")
        check_option("text position", self.position, POSITIONS)
        length = tokens.shape[1]
        logical_axes = self.options.logical_axes
        x = Embed(self.vocab_size, self.width, dtype=self.options.dtype, name="token_embedding",
                  embedding_init=initializer(nn.initializers.normal(0.02), ("vocab", "embed"), logical_axes))(tokens)
        if self.position == "learned":
            pos = self.param("pos_embedding", initializer(nn.initializers.normal(0.01), ("seq", "embed"),
                                                          logical_axes), (self.context_length, self.width))
            x = x + pos[:length].astype(x.dtype)
        mask: Optional[jnp.ndarray] = nn.make_causal_mask(tokens) if self.causal else None
        x = Encoder(self.depth, self.num_heads, mlp_ratio=self.mlp_ratio, activation=self.activation,
                    norm_eps=self.norm_eps, norm=self.norm, mlp=self.mlp, qk_norm=self.qk_norm,
                    rope_theta=self.rope_theta if self.position == "rope" else None, options=self.options,
                    name="encoder")(x, mask)
        x = normalization(self.norm, self.norm_eps, self.options, "ln_final")(x)
        x = self._pool(x, tokens)
        return dense(self.embed_dim, ("embed", "proj"), self.options, "proj", use_bias=self.proj_bias)(x)
