"""CoCa: a contrastive captioner (Yu et al. 2022, arXiv 2205.01917), laid out as OpenCLIP's `CoCa`.

An image tower whose attentional pooler yields one contrastive token and N
caption tokens; a causal unimodal text tower with a class token appended at the
end for the contrastive embedding; a multimodal text decoder that
cross-attends from the text tower's token features to the caption tokens and
predicts the next token. `generate` writes captions by greedy or beam search.
"""

import functools
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jclip.models.clip import l2_normalize
from jclip.models.decoding import beam_search
from jclip.models.execution import ExecutionOptions
from jclip.models.partitioning import Embed, initializer, repeat_over_batch
from jclip.models.transformer import (Encoder, EncoderBlock, attention, check_activation, dense, layer_norm,
                                      normalization)
from jclip.models.vision import VisionTransformer


class AttentionalPooler(nn.Module):
    """Learned queries attending over the image tokens (Lee et al. 2019; CoCa, section 3.2).

    OpenCLIP's form: `attn(norm_q(queries), norm_k(x))` with neither residual
    nor MLP (unlike `MAPHead`); the queries have width `width`, the tokens
    their own. `norm`: "layer" or "rms", the tower's norm kind.
    """

    num_queries: int
    width: int
    num_heads: int
    norm_eps: float = 1e-6
    norm: str = "layer"
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, x):
        queries = self.param("query", initializer(nn.initializers.normal(1.0), ("seq", "embed"),
                                                  self.options.logical_axes), (self.num_queries, self.width))
        queries = normalization(self.norm, self.norm_eps, self.options, "ln_q")(queries.astype(self.options.dtype))
        x = normalization(self.norm, self.norm_eps, self.options, "ln_k")(x)
        queries = repeat_over_batch(queries[None], x)
        return attention(self.num_heads, self.options, "attn")(queries, x)


class CoCaVisionTower(VisionTransformer):
    """Images [B, H, W, 3] -> (embedding [B, embed_dim], caption tokens [B, pooler_queries - 1, embed_dim]).

    A class-token ViT (the stem, position embeddings and patch dropout of
    `VisionTransformer`) whose encoder output goes through an
    `AttentionalPooler` of `pooler_queries` queries and `ln_post`; the first
    pooled token, projected, is the contrastive embedding and the others are
    what the decoder attends to (OpenCLIP's CoCa; the paper pools the two with
    separate poolers). `pool` must stay "cls" and `projection` True.
    """

    pooler_queries: int = 256
    pooler_heads: int = 8

    @nn.compact
    def __call__(self, images, train: bool = False):
        self._check()
        if isinstance(images, Mapping):
            raise ValueError("CoCa's image tower takes images [batch, height, width, 3], not patch inputs (NaFlex)")
        if self.pool != "cls" or not self.projection:
            raise ValueError(f"CoCa's image tower has a class token and a projection; leave pool and projection "
                             f"at their defaults, got pool={self.pool!r} and projection={self.projection}")
        if self.pooler_queries < 2:
            raise ValueError(f"pooler_queries must be >= 2 (1 contrastive + caption tokens); got {self.pooler_queries}")
        x, _ = self._tokens(images, train)
        x = self._encode(x, None)
        x = AttentionalPooler(self.pooler_queries, self.embed_dim, self.pooler_heads, norm_eps=self.norm_eps,
                              norm=self.norm, options=self.options, name="pooler")(x)
        x = normalization(self.norm, self.norm_eps, self.options, "ln_post")(x)
        embedding = dense(self.embed_dim, ("embed", "proj"), self.options, "proj", use_bias=False)(x[:, 0])
        return embedding, x[:, 1:]


class CoCaTextTower(nn.Module):
    """Token ids [B, L] -> (embedding [B, embed_dim], token features [B, L, width]).

    A causal text transformer with a learned class token appended after the L
    tokens (L + 1 positions); the class token's output, layer-normed and
    projected, is the contrastive embedding, the other outputs (without the
    final norm) feed the multimodal decoder. Besides the causal mask, key
    position j > 0 is masked where token j - 1 is `pad_id`: the shifted mask of
    OpenCLIP's CoCa (`correct_cls_mask=False`), which its weights were trained
    with.
    """

    embed_dim: int
    vocab_size: int
    context_length: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    pad_id: int = 0
    norm_eps: float = 1e-6
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, tokens):
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens must be [batch, length <= {self.context_length}]; got shape {tokens.shape}")
        length = tokens.shape[1]
        logical_axes = self.options.logical_axes
        x = Embed(self.vocab_size, self.width, dtype=self.options.dtype, name="token_embedding",
                  embedding_init=initializer(nn.initializers.normal(0.02), ("vocab", "embed"), logical_axes))(tokens)
        cls = self.param("cls_token", initializer(nn.initializers.normal(0.01), ("embed",), logical_axes),
                         (self.width,))
        x = jnp.concatenate([x, repeat_over_batch(cls[None, None].astype(x.dtype), x)], axis=1)
        pos = self.param("pos_embedding", initializer(nn.initializers.normal(0.01), ("seq", "embed"), logical_axes),
                         (self.context_length + 1, self.width))
        x = x + pos[:length + 1].astype(x.dtype)
        keys = jnp.concatenate([repeat_over_batch(jnp.ones((1, 1), bool), tokens), tokens != self.pad_id], axis=1)
        mask = nn.combine_masks(nn.make_causal_mask(keys), keys[:, None, None, :])
        x = Encoder(self.depth, self.num_heads, mlp_ratio=self.mlp_ratio, activation=self.activation,
                    norm_eps=self.norm_eps, options=self.options, name="encoder")(x, mask)
        pooled = layer_norm(self.norm_eps, self.options, "ln_final")(x[:, -1])
        embedding = dense(self.embed_dim, ("embed", "proj"), self.options, "proj", use_bias=False)(pooled)
        return embedding, x[:, :-1]


class MultimodalDecoder(nn.Module):
    """Text features [B, L, W] and image tokens [B, N, W] -> next-token logits [B, L, vocab_size].

    Each of the `depth` layers is a causal self-attention block followed by a
    cross-attention block to the image tokens (CoCa's multimodal decoder), then
    a final LayerNorm and a bias-free projection to the vocabulary.
    """

    vocab_size: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    norm_eps: float = 1e-6
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, x, image_tokens):
        check_activation(self.activation)
        if image_tokens.shape[-1] != x.shape[-1]:
            raise ValueError(f"the decoder's image tokens must have the text width {x.shape[-1]}; got "
                             f"{image_tokens.shape[-1]}: set embed_dim equal to the text tower's width")
        block = functools.partial(nn.remat(EncoderBlock) if self.options.remat else EncoderBlock, self.num_heads,
                                  mlp_ratio=self.mlp_ratio, activation=self.activation, norm_eps=self.norm_eps,
                                  options=self.options)
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2], bool))
        for i in range(self.depth):
            x = block(name=f"block_{i}")(x, mask)
            x = block(cross_attention=True, name=f"cross_{i}")(x, None, image_tokens)
        x = layer_norm(self.norm_eps, self.options, "ln_final")(x)
        return dense(self.vocab_size, ("embed", "vocab"), self.options, "proj", use_bias=False)(x)


class CoCa(nn.Module):
    """Contrastive captioner: CLIP's two embeddings plus teacher-forced caption logits.

    `apply(variables, images, tokens)` returns `{"zimg", "ztxt", "scale",
    "caption_logits"}`; `caption_logits[:, t]` [B, L, vocab] scores token t + 1
    given the image and tokens <= t (the last position has no label; OpenCLIP's
    CoCa drops it before its caption loss). `vision` holds the
    arguments of `CoCaVisionTower`, `text` those of `CoCaTextTower`,
    `decoder` those of `MultimodalDecoder` (its width and vocabulary are the
    text tower's). `dtype`, `remat`, `logical_axes`, `init_scale` and
    `max_scale` are as for `CLIP`; the first three become the
    `ExecutionOptions` of all three parts.
    """

    vision: dict[str, Any]
    text: dict[str, Any]
    decoder: dict[str, Any]
    embed_dim: int
    init_scale: float = 1 / 0.07
    max_scale: Optional[float] = 100.0
    dtype: str = "float32"
    remat: bool = False
    logical_axes: bool = False

    def setup(self):
        options = ExecutionOptions(dtype=jnp.dtype(self.dtype), remat=self.remat, logical_axes=self.logical_axes)
        self.image_tower = CoCaVisionTower(**self.vision, embed_dim=self.embed_dim, options=options)
        self.text_tower = CoCaTextTower(**self.text, embed_dim=self.embed_dim, options=options)
        self.text_decoder = MultimodalDecoder(**self.decoder, vocab_size=self.text["vocab_size"], options=options)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(math.log(self.init_scale)), (), jnp.float32
        )

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images [B, H, W, 3] -> normalised [B, embed_dim] float32."""
        return l2_normalize(self.image_tower(images, train=train)[0].astype(jnp.float32))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """Token ids [B, L] -> normalised [B, embed_dim] float32."""
        return l2_normalize(self.text_tower(tokens)[0].astype(jnp.float32))

    def image_tokens(self, images: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] -> the caption tokens [B, N, embed_dim] the decoder attends to."""
        return self.image_tower(images)[1]

    def caption_logits(self, image_tokens: jax.Array, tokens: jax.Array) -> jax.Array:
        """Caption tokens of `image_tokens` and token ids [B, L] -> next-token logits [B, L, vocab] float32."""
        features = self.text_tower(tokens)[1]
        return self.text_decoder(features, image_tokens).astype(jnp.float32)

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        image_embedding, image_tokens = self.image_tower(images, train=train)
        text_embedding, text_features = self.text_tower(tokens)
        return {
            "zimg": l2_normalize(image_embedding.astype(jnp.float32)),
            "ztxt": l2_normalize(text_embedding.astype(jnp.float32)),
            "scale": jnp.exp(self.logit_scale),
            "caption_logits": self.text_decoder(text_features, image_tokens).astype(jnp.float32),
        }


def generate(model: CoCa, variables, images: jax.Array, *, max_length: int, start_id: int, end_id: int,
             beam_size: int = 1, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """Captions of `images`: (token ids [B, max_length], their log-probabilities [B]).

    Each caption starts with `start_id`; after `end_id` come `pad_id`s. With
    `beam_size=1` this is greedy decoding, otherwise beam search
    (`jclip.models.decoding.beam_search`, sum of token log-probabilities, no
    length penalty). The text tower and decoder rerun on the whole buffer at
    every step (no key/value cache), which their causal masks make exact.
    Jit it with `model` and the keyword arguments static.
    """
    if max_length > model.text["context_length"]:
        raise ValueError(f"max_length={max_length} exceeds the text context length {model.text['context_length']}")
    image_tokens = jnp.repeat(model.apply(variables, images, method=CoCa.image_tokens), beam_size, axis=0)

    def next_log_probs(tokens, position):
        logits = model.apply(variables, image_tokens, tokens, method=CoCa.caption_logits)
        return jax.nn.log_softmax(jnp.take(logits, position, axis=1))

    return beam_search(next_log_probs, images.shape[0], max_length=max_length, beam_size=beam_size,
                       start_id=start_id, end_id=end_id, pad_id=pad_id)
