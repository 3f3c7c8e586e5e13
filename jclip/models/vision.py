"""Vision Transformer image tower (Dosovitskiy et al. 2021), as used by CLIP and SigLIP.

The tower takes images `[B, H, W, 3]`, or NaFlex patch inputs (SigLIP 2,
Tschannen et al. 2025, arXiv 2502.14786): a dict of `patches`
`[B, N, patch_size, patch_size, 3]`, each image's patches in row-major order
then zero padding, and `grid` int32 `[B, 2]`, each image's (rows, columns) of
patches (`jclip.data.naflex` makes them). Each image then gets the position
embeddings resized to its own grid, and its padding is masked out of attention
and pooling, so an image's embedding does not depend on the padding, and a
patch input of a whole image equals that image at fixed resolution.
"""

import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jclip.models.execution import ExecutionOptions
from jclip.models.partitioning import Conv, batch_conv, initializer, repeat_over_batch
from jclip.models.transformer import Encoder, MlpBlock, attention, dense, normalization

CONV_AXES = ("conv_h", "conv_w", "conv_in", "embed")


class PatchEmbedding(nn.Module):
    """The patchify layer: a convolution of size and stride `patch_size` (the parameters of `nn.Conv`), of
    images [B, H, W, 3] -> [B, H / patch_size, W / patch_size, width], or of NaFlex patches [B, N, patch_size,
    patch_size, 3] -> [B, N, width] as the one matrix product per patch that it is."""

    width: int
    patch_size: int
    use_bias: bool = False
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, x):
        kernel_init = initializer(nn.linear.default_kernel_init, CONV_AXES, self.options.logical_axes)
        kernel = self.param("kernel", kernel_init, (self.patch_size, self.patch_size, x.shape[-1], self.width))
        dtype = self.options.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if x.ndim == 5:
            y = jnp.einsum("bnhwc,hwcd->bnd", x, kernel)
        else:
            y = batch_conv(x, kernel, (self.patch_size,) * 2, "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.width,)).astype(dtype)
        return y


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
            x = Conv(channels, (3, 3), strides=2, padding="SAME", dtype=dtype, kernel_init=kernel_init,
                     name=f"conv_{i}")(x)
            x = nn.LayerNorm(dtype=dtype, name=f"norm_{i}")(x)
            x = nn.gelu(x)
        return Conv(self.width, (1, 1), dtype=dtype, kernel_init=kernel_init, name="proj")(x)


def resize_weights(source: int, sizes: jax.Array, length: int) -> jax.Array:
    """[B, length, source]: for each of `sizes` [B], the matrix of `jax.image.resize`'s cubic resize of `source`
    values to `sizes[b]` values (rows past `sizes[b]`: unused). A resize is linear in its input, so it is the
    resize of the identity; the sizes may be traced, unlike `jax.image.resize`'s."""
    identity = jnp.eye(source, dtype=jnp.float32)

    def weights(size):
        scale = jnp.maximum(size, 1).astype(jnp.float32)[None] / source
        return jax.image.scale_and_translate(identity, (length, source), (0,), scale, jnp.zeros(1, jnp.float32),
                                             method="cubic")

    return jax.vmap(weights)(sizes)


def patch_positions(positions: jax.Array, grid: jax.Array, count: int) -> jax.Array:
    """Position embeddings of a square grid [g, g, C] resized to each image's patch grid [B, 2] (rows, columns),
    at its patches in row-major order: [B, count, C] (entries past an image's patches: padding, unused).

    The resize is `resize_positions`' (separable cubic, antialiased), so an
    image's patch input and the image itself get the same positions.
    """
    side, width = positions.shape[0], positions.shape[-1]
    rows, columns = resize_weights(side, grid[:, 0], count), resize_weights(side, grid[:, 1], count)
    index, columns_per_row = jnp.arange(count), jnp.maximum(grid[:, 1:], 1)
    row_of = jnp.minimum(index // columns_per_row, count - 1)  # [B, count]
    column_of = index % columns_per_row
    pick = jax.vmap(lambda matrix, at: matrix[at])
    row_weights, column_weights = pick(rows, row_of), pick(columns, column_of)  # [B, count, g] each
    weights = (row_weights[..., :, None] * column_weights[..., None, :]).reshape(*row_of.shape, side * side)
    return jnp.einsum("bnk,kc->bnc", weights, positions.reshape(side * side, width).astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


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
    def __call__(self, x, mask: Optional[jax.Array] = None):
        """`mask`: [B, N], the tokens to pool (None: all)."""
        width = x.shape[-1]
        latent = self.param("latent", initializer(nn.initializers.normal(width**-0.5), (None, "seq", "embed"),
                                                  self.options.logical_axes), (1, 1, width))
        query = repeat_over_batch(latent.astype(x.dtype), x)
        mask = None if mask is None else mask[:, None, None]  # [B, heads, queries, keys]
        z = attention(self.num_heads, self.options, "attn")(query, x, mask=mask)
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

    def _check(self):
        if self.pool not in ("cls", "gap", "map"):
            raise ValueError(f"unknown pool {self.pool!r}; use 'cls', 'gap' or 'map'")
        if not self.projection and self.embed_dim != self.width:
            raise ValueError(f"projection=False needs embed_dim == width; got {self.embed_dim} and {self.width}")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1); got {self.patch_dropout}")
        if self.num_registers < 0:
            raise ValueError(f"num_registers must be >= 0; got {self.num_registers}")

    def _check_images(self, images):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [batch, height, width, 3]; got shape {images.shape}")
        if images.shape[1] % self.patch_size or images.shape[2] % self.patch_size:
            raise ValueError(f"image size {images.shape[1:3]} is not a multiple of patch_size={self.patch_size}")

    def _check_patch_input(self, images: Mapping[str, Any], train: bool):
        if set(images) != {"patches", "grid"}:
            raise ValueError("a patch input has the keys 'patches' and 'grid' (jclip.data.naflex); "
                             f"got {sorted(images)}")
        patches, grid = images["patches"], images["grid"]
        expected = (self.patch_size, self.patch_size, 3)
        if patches.ndim != 5 or patches.shape[2:] != expected:
            raise ValueError(f"patches must be [batch, max_patches, {', '.join(map(str, expected))}] for "
                             f"patch_size={self.patch_size}; got shape {patches.shape}")
        if grid.shape != (patches.shape[0], 2):
            raise ValueError(f"grid must be [batch, 2] (rows, columns of each image's patches); got shape {grid.shape}")
        if self.stem != "patch":
            raise ValueError(f"patch inputs (NaFlex) need stem='patch'; this tower has stem={self.stem!r}")
        if train and self.patch_dropout > 0:
            raise ValueError("patch_dropout is not available with patch inputs (NaFlex): set it to 0, or train on "
                             "fixed-resolution images")

    def _stem(self, x):
        if self.stem == "patch":
            return PatchEmbedding(self.width, self.patch_size, self.patch_bias, self.options, name="patch_embed")(x)
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

    def _encode(self, x, valid: Optional[jax.Array]):
        """Tokens [B, N, width] -> the encoder's outputs at those N tokens (through `ln_pre` first); `valid`
        [B, N]: the tokens attention may look at (None: all).

        With `num_registers`, that many learned tokens join the sequence for
        the encoder, after the others and without position embeddings, and
        leave it before pooling: registers (Darcet et al. 2024, "Vision
        Transformers Need Registers", arXiv 2309.16588) give the attention a
        place to keep global information other than low-information patch
        tokens, which otherwise take on that role and show up as artefacts in
        the attention maps.
        """
        count = x.shape[1]
        if self.num_registers:
            registers = self.param("registers", initializer(nn.initializers.normal(self.width**-0.5),
                                                            (None, "seq", "embed"), self.options.logical_axes),
                                   (1, self.num_registers, self.width))
            x = jnp.concatenate([x, repeat_over_batch(registers.astype(x.dtype), x)], axis=1)
            if valid is not None:
                valid = jnp.concatenate([valid, repeat_over_batch(jnp.ones((1, self.num_registers), bool), x)], axis=1)
        if self.ln_pre:
            x = normalization(self.norm, self.norm_eps, self.options, "ln_pre")(x)
        x = Encoder(self.depth, self.num_heads, mlp_ratio=self.mlp_ratio, activation=self.activation,
                    norm_eps=self.norm_eps, norm=self.norm, mlp=self.mlp, qk_norm=self.qk_norm, options=self.options,
                    name="encoder")(x, None if valid is None else valid[:, None, None, :])
        return x[:, :count] if self.num_registers else x

    def _positions(self, x, num_prefix: int, grid: Optional[jax.Array], image_grid: Optional[tuple[int, int]]):
        """The learned position embeddings [1, prefix + patches, width] (made for `image_size`, or for the grid
        `init` sees), fit to the tokens `x`: resized to the images' grid `image_grid`, or per image to each
        patch input's `grid` [B, 2] ([B, tokens, width] then)."""
        tokens = self._position_count(x, num_prefix, patch_input=grid is not None)
        pos = self.param("pos_embedding", initializer(nn.initializers.normal(self.width**-0.5),
                                                      (None, "seq", "embed"), self.options.logical_axes),
                         (1, tokens, self.width))
        if grid is not None:
            side = math.isqrt(tokens - num_prefix)
            patches = patch_positions(pos[0, num_prefix:].reshape(side, side, self.width), grid,
                                      x.shape[1] - num_prefix)
            prefix = repeat_over_batch(pos[:, :num_prefix], x)
            return jnp.concatenate([prefix, patches.astype(pos.dtype)], axis=1)
        return resize_positions(pos, num_prefix, image_grid) if pos.shape[1] != x.shape[1] else pos

    def _position_count(self, x, num_prefix: int, patch_input: bool) -> int:
        """The number of learned position embeddings: for `image_size`, else for the images `init` saw (a
        square grid, which patch inputs look up)."""
        if self.image_size:
            return num_prefix + (self.image_size // self.patch_size) ** 2
        if self.has_variable("params", "pos_embedding"):
            return nn.meta.unbox(self.get_variable("params", "pos_embedding")).shape[1]
        if not patch_input:
            return x.shape[1]
        raise ValueError("a ViT without image_size takes its position embeddings' grid from the images init "
                         "sees: initialise it with images [B, H, W, 3], or set image_size, not with patch inputs")

    def _pool(self, x, valid: Optional[jax.Array]):
        """The encoder's outputs [B, N, width] -> [B, width] by `pool`, over the `valid` tokens [B, N] (None: all)."""
        if self.pool == "map":
            x = normalization(self.norm, self.norm_eps, self.options, "ln_post")(x)
            return MAPHead(self.num_heads, mlp_ratio=self.mlp_ratio, activation=self.activation, norm_eps=self.norm_eps,
                           norm=self.norm, options=self.options, name="map_head")(x, valid)
        if self.pool == "cls":
            x = x[:, 0]
        elif valid is None:
            x = x.mean(axis=1)
        else:
            weights = valid.astype(x.dtype)[..., None]
            x = (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)
        return normalization(self.norm, self.norm_eps, self.options, "ln_post")(x)

    def _tokens(self, images, train: bool):
        """Images [B, H, W, 3] or a patch input -> (the encoder's input tokens [B, prefix + N, width]: the stem's,
        after the class token where `pool` is "cls", with their positions, patch dropout applied in training; the
        tokens attention may look at [B, prefix + N], or None for all)."""
        grid = image_grid = valid = None
        if isinstance(images, Mapping):
            self._check_patch_input(images, train)
            patches, grid = images["patches"], images["grid"].astype(jnp.int32)
            count = patches.shape[1]
            x = self._stem(patches)
            valid = jnp.arange(count) < (grid[:, 0] * grid[:, 1])[:, None]
        else:
            self._check_images(images)
            x = self._stem(images.astype(self.options.dtype))
            batch, height, width, _ = x.shape
            image_grid = (height, width)
            x = x.reshape(batch, height * width, self.width)
        num_prefix = int(self.pool == "cls")
        if num_prefix:
            cls = self.param("cls_token", initializer(nn.initializers.normal(self.width**-0.5),
                                                      (None, "seq", "embed"), self.options.logical_axes),
                             (1, 1, self.width))
            x = jnp.concatenate([repeat_over_batch(cls.astype(x.dtype), x), x], axis=1)
            if valid is not None:
                valid = jnp.concatenate([repeat_over_batch(jnp.ones((1, 1), bool), x), valid], axis=1)
        x = x + self._positions(x, num_prefix, grid, image_grid).astype(x.dtype)
        if train and self.patch_dropout > 0:
            x = self._drop_patches(x, num_prefix)
        return x, valid

    @nn.compact
    def __call__(self, images, train: bool = False):
        """Images [B, H, W, 3] or a patch input (see the module docstring) -> [B, embed_dim]."""
        self._check()
        x, valid = self._tokens(images, train)
        x = self._pool(self._encode(x, valid), valid)
        if not self.projection:
            return x
        return dense(self.embed_dim, ("embed", "proj"), self.options, "proj", use_bias=False)(x)
