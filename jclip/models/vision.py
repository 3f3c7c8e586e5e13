"""Vision Transformer image tower (Dosovitskiy et al. 2021), as used by CLIP and SigLIP."""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jclip.models.execution import ExecutionOptions
from jclip.models.partitioning import initializer
from jclip.models.transformer import Encoder, MlpBlock, attention, dense, normalization

CONV_AXES = ("conv_h", "conv_w", "conv_in", "embed")


class ConvStem(nn.Module):
    """3x3 stride-2 convolutions in place of one large patch convolution.

    Xiao et al. 2021 ("Early convolutions help transformers see better"): a few
    small convolutions give the tower locality and train faster and more stably
    than a single patchify layer with the same output grid.
    """

    channels: Sequence[int]
    width: int
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, x):
        dtype = self.options.dtype
        kernel_init = initializer(nn.linear.default_kernel_init, CONV_AXES, self.options.logical_axes)
        for i, channels in enumerate(self.channels):
            x = nn.Conv(channels, (3, 3), strides=2, padding="SAME", dtype=dtype, kernel_init=kernel_init,
                        name=f"conv_{i}")(x)
            x = nn.LayerNorm(dtype=dtype, name=f"norm_{i}")(x)
            x = nn.gelu(x)
        return nn.Conv(self.width, (1, 1), dtype=dtype, kernel_init=kernel_init, name="proj")(x)


class MAPHead(nn.Module):
    """Multihead attention pooling (Lee et al. 2019, Set Transformer; used by SigLIP).

    One learned query attends over the tokens, followed by a residual MLP:
    `z = attn(latent, x); z + mlp(norm(z))`, as timm's `AttentionPoolLatent`
    (`norm`: "layer" or "rms", the tower's norm kind).
    """

    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    norm_eps: float = 1e-6
    norm: str = "layer"
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, x):
        batch, _, width = x.shape
        latent = self.param("latent", initializer(nn.initializers.normal(width**-0.5), (None, "seq", "embed"),
                                                  self.options.logical_axes), (1, 1, width))
        query = jnp.broadcast_to(latent, (batch, 1, width)).astype(x.dtype)
        z = attention(self.num_heads, self.options, "attn")(query, x)
        y = normalization(self.norm, self.norm_eps, self.options, "ln")(z)
        z = z + MlpBlock(int(width * self.mlp_ratio), activation=self.activation, options=self.options,
                         name="mlp")(y)
        return z[:, 0]


def resize_positions(pos: jax.Array, num_prefix: int, grid: tuple[int, int]) -> jax.Array:
    """Position embeddings [1, prefix + h*w, C] resized (bicubic) to another patch grid.

    The class-token entry (`num_prefix` = 1) is kept as is; the patch entries
    are treated as an image, as when fine-tuning at a new resolution
    (Dosovitskiy et al. 2021, section 3.2).
    """
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    old = int(round(patches.shape[1] ** 0.5))
    patches = patches.reshape(1, old, old, pos.shape[-1])
    patches = jax.image.resize(patches, (1, *grid, pos.shape[-1]), method="cubic")
    return jnp.concatenate([prefix, patches.reshape(1, grid[0] * grid[1], pos.shape[-1])], axis=1)


class VisionTransformer(nn.Module):
    """Images [B, H, W, 3] -> embeddings [B, embed_dim] (not normalised).

    - `stem="patch"`: the standard patchify convolution of size `patch_size`
      (`patch_bias`: with a bias, as timm / SigLIP); `stem="conv"`: a
      `ConvStem` whose stride-2 stages reduce the image by `patch_size` (a
      power of two).
    - `pool`: "cls" (class token), "gap" (mean of the tokens) or "map"
      (`MAPHead`, SigLIP).
    - `image_size`: the resolution the learned position embeddings are made
      for; other resolutions get them resized. None: the resolution of the
      images `init` sees, and no resizing.
    - `ln_pre`: LayerNorm before the encoder (OpenAI CLIP; timm has none).
    - `projection`: a final linear map to `embed_dim` (False: the pooled
      features are the embedding, as OpenCLIP's SigLIP).
    - `patch_dropout`: the fraction of patch tokens dropped at random when
      called with `train=True` (FLIP, Li et al. 2023); needs an rng named
      "patch_dropout".
    - `num_registers`: learned register tokens appended after the patch
      tokens for the encoder and dropped after it (`_encode`).
    - `norm`, `mlp`, `qk_norm`: the transformer's options (`Encoder`); `norm`
      ("layer" or "rms") is that of every norm of the tower, `mlp` ("standard"
      or "gated") that of the encoder blocks.
    - `options`: how the layers run, set by the model (`ExecutionOptions`).
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
    image_size: Optional[int] = None
    patch_bias: bool = False
    ln_pre: bool = True
    projection: bool = True
    norm_eps: float = 1e-6
    patch_dropout: float = 0.0
    num_registers: int = 0
    norm: str = "layer"
    mlp: str = "standard"
    qk_norm: bool = False
    options: ExecutionOptions = ExecutionOptions()

    def _check(self, images):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [batch, height, width, 3]; got shape {images.shape}")
        if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
            raise ValueError(f"image size {images.shape[1:3]} is not a multiple of patch_size={self.patch_size}")
        if self.pool not in ("cls", "gap", "map"):
            raise ValueError(f"unknown pool {self.pool!r}; use 'cls', 'gap' or 'map'")
        if not self.projection and self.embed_dim != self.width:
            raise ValueError(f"projection=False needs embed_dim == width; got {self.embed_dim} and {self.width}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1); got {self.patch_dropout}")
        if self.num_registers < 0:
            raise ValueError(f"num_registers must be >= 0; got {self.num_registers}")

    def _stem(self, x):
        if self.stem == "patch":
            return nn.Conv(
                self.width, (self.patch_size,) * 2, strides=self.patch_size, padding="VALID",
                use_bias=self.patch_bias, dtype=self.options.dtype, name="patch_embed",
                kernel_init=initializer(nn.linear.default_kernel_init, CONV_AXES, self.options.logical_axes),
            )(x)
        if self.stem == "conv":
            stages = self.patch_size.bit_length() - 1
            if 2**stages != self.patch_size:
                raise ValueError(f"stem='conv' needs a power-of-two patch_size; got {self.patch_size}")
            channels = [max(self.width // 2 ** (stages - i), 16) for i in range(stages)]
            return ConvStem(channels, self.width, options=self.options, name="conv_stem")(x)
        raise ValueError(f"unknown stem {self.stem!r}; use 'patch' or 'conv'")

    def _drop_patches(self, x, num_prefix: int):
        """Keep a random subset of the patch tokens of each example (the prefix tokens always)."""
        prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
        batch, count, width = patches.shape
        keep = max(1, int(count * (1.0 - self.patch_dropout)))
        scores = jax.random.uniform(self.make_rng("patch_dropout"), (batch, count))
        kept = jnp.argsort(scores, axis=1)[:, :keep]
        patches = jnp.take_along_axis(patches, kept[:, :, None], axis=1)
        return jnp.concatenate([prefix, patches], axis=1)

    def _encode(self, x):
        """Tokens [B, N, width] -> the encoder's outputs at those N tokens (through `ln_pre` first).

        With `num_registers`, that many learned tokens join the sequence for
        the encoder, after the others and without position embeddings, and
        leave it before pooling: registers (Darcet et al. 2024, "Vision
        Transformers Need Registers", arXiv 2309.16588) give the attention a
        place to keep global information other than low-information patch
        tokens, which otherwise take on that role and show up as artefacts in
        the attention maps.
        """
        batch, count, _ = x.shape
        if self.num_registers:
            registers = self.param("registers", initializer(nn.initializers.normal(self.width**-0.5),
                                                            (None, "seq", "embed"), self.options.logical_axes),
                                   (1, self.num_registers, self.width))
            registers = jnp.broadcast_to(registers, (batch, self.num_registers, self.width)).astype(x.dtype)
            x = jnp.concatenate([x, registers], axis=1)
        if self.ln_pre:
            x = normalization(self.norm, self.norm_eps, self.options, "ln_pre")(x)
        x = Encoder(self.depth, self.num_heads, mlp_ratio=self.mlp_ratio, activation=self.activation,
                    norm_eps=self.norm_eps, norm=self.norm, mlp=self.mlp, qk_norm=self.qk_norm, options=self.options,
                    name="encoder")(x)
        return x[:, :count] if self.num_registers else x

    @nn.compact
    def __call__(self, images, train: bool = False):
        self._check(images)
        x = self._stem(images.astype(self.options.dtype))
        batch, height, width, _ = x.shape
        x = x.reshape(batch, height * width, self.width)
        num_prefix = int(self.pool == "cls")
        if num_prefix:
            cls = self.param("cls_token", initializer(nn.initializers.normal(self.width**-0.5),
                                                      (None, "seq", "embed"), self.options.logical_axes),
                             (1, 1, self.width))
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], axis=1)
        grid = self.image_size // self.patch_size if self.image_size else None
        tokens = num_prefix + grid**2 if grid else x.shape[1]
        pos = self.param("pos_embedding", initializer(nn.initializers.normal(self.width**-0.5),
                                                      (None, "seq", "embed"), self.options.logical_axes),
                         (1, tokens, self.width))
        if pos.shape[1] != x.shape[1]:
            pos = resize_positions(pos, num_prefix, (height, width))
        x = x + pos.astype(x.dtype)
        if train and self.patch_dropout > 0:
            x = self._drop_patches(x, num_prefix)
        x = self._encode(x)
        if self.pool == "map":
            x = normalization(self.norm, self.norm_eps, self.options, "ln_post")(x)
            x = MAPHead(self.num_heads, mlp_ratio=self.mlp_ratio, activation=self.activation, norm_eps=self.norm_eps,
                        norm=self.norm, options=self.options, name="map_head")(x)
        else:
            x = x[:, 0] if self.pool == "cls" else x.mean(axis=1)
            x = normalization(self.norm, self.norm_eps, self.options, "ln_post")(x)
        if not self.projection:
            return x
        return dense(self.embed_dim, ("embed", "proj"), self.options, "proj", use_bias=False)(x)
