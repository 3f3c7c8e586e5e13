"""Vision Transformer image tower (Dosovitskiy et al. 2021), as used by CLIP."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jclip.models.transformer import Encoder


class ConvStem(nn.Module):
    """3x3 stride-2 convolutions in place of one large patch convolution.

    Xiao et al. 2021 ("Early convolutions help transformers see better"): a few
    small convolutions give the tower locality and train faster and more stably
    than a single patchify layer with the same output grid.
    """

    channels: Sequence[int]
    width: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i, channels in enumerate(self.channels):
            x = nn.Conv(channels, (3, 3), strides=2, padding="SAME", dtype=self.dtype, name=f"conv_{i}")(x)
            x = nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}")(x)
            x = nn.gelu(x)
        return nn.Conv(self.width, (1, 1), dtype=self.dtype, name="proj")(x)


class VisionTransformer(nn.Module):
    """Images [B, H, W, 3] -> embeddings [B, embed_dim] (not normalised).

    `stem="patch"` is the standard patchify convolution of size `patch_size`;
    `stem="conv"` is a `ConvStem` whose stride-2 stages reduce the image by
    `patch_size` (which must then be a power of two). `pool` is "cls" (class
    token) or "gap" (mean of the patch tokens).
    """

    embed_dim: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    stem: str = "patch"
    pool: str = "cls"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [batch, height, width, 3]; got shape {images.shape}")
        x = images.astype(self.dtype)
        if self.stem == "patch":
            x = nn.Conv(
                self.width, (self.patch_size,) * 2, strides=self.patch_size,
                padding="VALID", use_bias=False, dtype=self.dtype, name="patch_embed",
            )(x)
        elif self.stem == "conv":
            stages = self.patch_size.bit_length() - 1
            if 2**stages != self.patch_size:
                raise ValueError(f"stem='conv' needs a power-of-two patch_size; got {self.patch_size}")
            channels = [max(self.width // 2 ** (stages - i), 16) for i in range(stages)]
            x = ConvStem(channels, self.width, self.dtype, name="conv_stem")(x)
        else:
            raise ValueError(f"unknown stem {self.stem!r}; use 'patch' or 'conv'")
        batch, height, width, _ = x.shape
        x = x.reshape(batch, height * width, self.width)
        if self.pool == "cls":
            cls = self.param("cls_token", nn.initializers.normal(self.width**-0.5), (1, 1, self.width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], axis=1)
        elif self.pool != "gap":
            raise ValueError(f"unknown pool {self.pool!r}; use 'cls' or 'gap'")
        pos = self.param("pos_embedding", nn.initializers.normal(self.width**-0.5), (1, x.shape[1], self.width))
        x = nn.LayerNorm(dtype=self.dtype, name="ln_pre")(x + pos.astype(x.dtype))
        x = Encoder(self.depth, self.num_heads, self.mlp_ratio, self.activation, self.dtype, name="encoder")(x)
        x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
        x = nn.LayerNorm(dtype=self.dtype, name="ln_post")(x)
        return nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, name="proj")(x)
