"""The two-tower CLIP model: image and text towers, normalised embeddings, scale and bias."""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jclip.models.text import TextTransformer
from jclip.models.vision import VisionTransformer


def l2_normalize(z: jax.Array, eps: float = 1e-6) -> jax.Array:
    """z / (||z|| + eps): a zero row (padding) stays zero instead of becoming NaN."""
    return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + eps)


class CLIP(nn.Module):
    """Two towers mapping images and token ids into one normalised embedding space.

    `apply(variables, images, tokens)` returns `{"zimg", "ztxt", "scale"}` and,
    for sigmoid recipes (`init_bias` set), `"bias"`. `scale = exp(logit_scale)`
    is the inverse temperature; the trainer clamps it to at most `max_scale` after
    every update (Radford et al. 2021 clamp it at 100; None: no clamp).
    """

    vision: dict[str, Any]
    text: dict[str, Any]
    embed_dim: int
    init_scale: float = 1 / 0.07
    max_scale: Optional[float] = 100.0
    init_bias: Optional[float] = None

    def setup(self):
        self.image_tower = VisionTransformer(embed_dim=self.embed_dim, **self.vision)
        self.text_tower = TextTransformer(embed_dim=self.embed_dim, **self.text)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(math.log(self.init_scale)), (), jnp.float32
        )
        if self.init_bias is not None:
            self.logit_bias = self.param(
                "logit_bias", nn.initializers.constant(self.init_bias), (), jnp.float32
            )

    def encode_image(self, images: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] in the model's value range -> normalised [B, embed_dim] float32."""
        return l2_normalize(self.image_tower(images).astype(jnp.float32))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """Token ids [B, L] -> normalised [B, embed_dim] float32."""
        return l2_normalize(self.text_tower(tokens).astype(jnp.float32))

    def __call__(self, images: jax.Array, tokens: jax.Array) -> dict[str, jax.Array]:
        out = {
            "zimg": self.encode_image(images),
            "ztxt": self.encode_text(tokens),
            "scale": jnp.exp(self.logit_scale),
        }
        if self.init_bias is not None:
            out["bias"] = self.logit_bias
        return out
