"""The two-tower CLIP model: image and text towers, normalised embeddings, scale and bias."""

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jclip.models.execution import ExecutionOptions
from jclip.models.resnet import ModifiedResNet
from jclip.models.text import TextTransformer
from jclip.models.vision import VisionTransformer

VISION_TOWERS = {"vit": VisionTransformer, "resnet": ModifiedResNet}


def l2_normalize(z: jax.Array, eps: float = 1e-6) -> jax.Array:
    """z / (||z|| + eps): a zero row (padding) stays zero instead of becoming NaN."""
    return z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + eps)


def vision_tower_class(vision: dict[str, Any]) -> type[nn.Module]:
    """The image tower class a `vision` config selects with its "type" ("vit" by default)."""
    kind = vision.get("type", "vit")
    if kind not in VISION_TOWERS:
        raise ValueError(f"unknown vision type {kind!r}; use one of {sorted(VISION_TOWERS)}")
    return VISION_TOWERS[kind]


class CLIP(nn.Module):
    """Two towers mapping images and token ids into one normalised embedding space.

    `apply(variables, images, tokens)` returns `{"zimg", "ztxt", "scale"}` and,
    for sigmoid recipes (`init_bias` set), `"bias"`. `scale = exp(logit_scale)`
    is the inverse temperature; the trainer clamps it to at most `max_scale` after
    every update (Radford et al. 2021 clamp it at 100; None: no clamp).

    `vision` holds the image tower's arguments, with "type" "vit"
    (`VisionTransformer`, default) or "resnet" (`ModifiedResNet`); `text` those
    of `TextTransformer`. `dtype` is the computation dtype of both towers
    ("bfloat16" for mixed precision; parameters, embeddings, scale and bias stay
    float32); `matmul_dtype` ("bfloat16"; "float32" or None: off) makes the transformers' dense layers
    take bfloat16 inputs and accumulate in float32, forward and backward, with
    everything else float32 (`jclip.models.precision`; on CPUs with bfloat16
    units the fast mixed precision, where `dtype="bfloat16"` is slower than
    float32); `remat` recomputes each block in the backward pass; `logical_axes`
    makes `init` return parameters boxed with logical axis names
    (`jclip.models.partitioning`). These four become the `ExecutionOptions`
    that both towers and all their layers share.
    """

    vision: dict[str, Any]
    text: dict[str, Any]
    embed_dim: int
    init_scale: float = 1 / 0.07
    max_scale: Optional[float] = 100.0
    init_bias: Optional[float] = None
    dtype: str = "float32"
    remat: bool = False
    logical_axes: bool = False
    matmul_dtype: Optional[str] = None

    def setup(self):
        matmul_dtype = None if self.matmul_dtype == "float32" else self.matmul_dtype
        if matmul_dtype and vision_tower_class(self.vision) is not VisionTransformer:
            raise ValueError(f"matmul_dtype={self.matmul_dtype!r} needs a ViT image tower; for the ResNet "
                             "tower use dtype='bfloat16'")
        options = ExecutionOptions(dtype=jnp.dtype(self.dtype), matmul_dtype=matmul_dtype, remat=self.remat,
                                   logical_axes=self.logical_axes)
        vision = {k: v for k, v in self.vision.items() if k != "type"}
        self.image_tower = vision_tower_class(self.vision)(**vision, embed_dim=self.embed_dim, options=options)
        self.text_tower = TextTransformer(**self.text, embed_dim=self.embed_dim, options=options)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(math.log(self.init_scale)), (), jnp.float32
        )
        if self.init_bias is not None:
            self.logit_bias = self.param(
                "logit_bias", nn.initializers.constant(self.init_bias), (), jnp.float32
            )

    def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images [B, H, W, 3] in the model's value range, or a ViT's NaFlex patch input (`jclip.models.vision`)
        -> normalised [B, embed_dim] float32.

        `train=True` applies a ViT's patch dropout (rng "patch_dropout"); the
        ResNet tower has no training-only behaviour.
        """
        if isinstance(images, Mapping) and not isinstance(self.image_tower, VisionTransformer):
            raise ValueError("patch inputs (NaFlex) need a ViT image tower; this model's is a ResNet")
        if isinstance(self.image_tower, VisionTransformer):
            features = self.image_tower(images, train=train)
        else:
            features = self.image_tower(images)
        return l2_normalize(features.astype(jnp.float32))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """Token ids [B, L] -> normalised [B, embed_dim] float32."""
        return l2_normalize(self.text_tower(tokens).astype(jnp.float32))

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        out = {
            "zimg": self.encode_image(images, train),
            "ztxt": self.encode_text(tokens),
            "scale": jnp.exp(self.logit_scale),
        }
        if self.init_bias is not None:
            out["bias"] = self.logit_bias
        return out
