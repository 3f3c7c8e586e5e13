"""OpenAI CLIP's ModifiedResNet image tower (Radford et al. 2021, section 2.4).

Differences from a torchvision ResNet: a stem of three 3x3 convolutions with an
average pool instead of a max pool; anti-aliased strided convolutions (an
average pool of the stride before a stride-1 convolution, Zhang 2019); and
attention pooling (one query, the mean token, over the final feature map with
position embeddings) in place of global average pooling.

Batch norm is in inference form: the running statistics are parameters
(`mean`, `var`) that gradients do not reach, so converted weights evaluate
and fine-tune exactly as in PyTorch's eval mode. The trainer threads no
mutable batch statistics, so training this tower from scratch trains only the
affine part of the norms.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jclip.models.execution import ExecutionOptions
from jclip.models.partitioning import Conv, initializer
from jclip.models.transformer import attention
from jclip.models.vision import CONV_AXES


class FrozenBatchNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias with fixed statistics (PyTorch eval mode)."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        mean = jax.lax.stop_gradient(self.param("mean", nn.initializers.zeros, (features,)))
        var = jax.lax.stop_gradient(self.param("var", nn.initializers.ones, (features,)))
        multiplier = scale * jax.lax.rsqrt(var + self.eps)
        return (x * multiplier.astype(x.dtype) + (bias - mean * multiplier).astype(x.dtype)).astype(self.dtype)


def conv_kernel_init(options: ExecutionOptions):
    """He initialisation of the convolutions, as torchvision's ResNet (fan out, normal)."""
    return initializer(nn.initializers.variance_scaling(2.0, "fan_out", "normal"), CONV_AXES, options.logical_axes)


def avg_pool(x, size: int):
    return nn.avg_pool(x, (size, size), strides=(size, size)) if size > 1 else x


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avg pool) -> 1x1 convolutions with a 4x expansion, plus the (pooled) shortcut."""

    planes: int
    stride: int = 1
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, x):
        dtype, kernel_init = self.options.dtype, conv_kernel_init(self.options)

        def conv(features, size, name):
            return Conv(features, (size, size), padding=[(size // 2, size // 2)] * 2, use_bias=False,
                        dtype=dtype, kernel_init=kernel_init, name=name)

        out = nn.relu(FrozenBatchNorm(dtype=dtype, name="bn1")(conv(self.planes, 1, "conv1")(x)))
        out = nn.relu(FrozenBatchNorm(dtype=dtype, name="bn2")(conv(self.planes, 3, "conv2")(out)))
        out = avg_pool(out, self.stride)
        out = FrozenBatchNorm(dtype=dtype, name="bn3")(conv(self.planes * 4, 1, "conv3")(out))
        if self.stride > 1 or x.shape[-1] != self.planes * 4:
            x = avg_pool(x, self.stride)
            x = FrozenBatchNorm(dtype=dtype, name="downsample_bn")(conv(self.planes * 4, 1, "downsample")(x))
        return nn.relu(out + x)


class AttentionPool2d(nn.Module):
    """Attention of the mean token over [mean; feature map] + position embeddings -> [B, out_features]."""

    num_heads: int
    out_features: int
    num_positions: int
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels)
        x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
        pos = self.param("pos_embedding", initializer(nn.initializers.normal(channels**-0.5), ("seq", "embed"),
                                                      self.options.logical_axes), (self.num_positions, channels))
        if pos.shape[0] != x.shape[1]:
            raise ValueError(
                f"the feature map has {height}x{width} positions but the attention pool was made for "
                f"{self.num_positions - 1}; use images of the model's image_size"
            )
        x = x + pos.astype(x.dtype)
        attn = attention(self.num_heads, self.options, "attn", out_features=self.out_features)
        return attn(x[:, :1], x)[:, 0]


class ModifiedResNet(nn.Module):
    """Images [B, H, W, 3] -> embeddings [B, embed_dim] (not normalised). RN50: layers=(3, 4, 6, 3).

    `options`: how the layers run, set by the model (`ExecutionOptions`; CLIP
    refuses a `matmul_dtype` for this tower).
    """

    embed_dim: int
    layers: Sequence[int]
    width: int = 64
    image_size: int = 224
    num_heads: int = 32
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [batch, height, width, 3]; got shape {images.shape}")
        dtype, kernel_init = self.options.dtype, conv_kernel_init(self.options)
        x = images.astype(dtype)
        for i, (features, stride) in enumerate([(self.width // 2, 2), (self.width // 2, 1), (self.width, 1)], 1):
            x = Conv(features, (3, 3), strides=stride, padding=[(1, 1), (1, 1)], use_bias=False, dtype=dtype,
                     kernel_init=kernel_init, name=f"stem_conv{i}")(x)
            x = nn.relu(FrozenBatchNorm(dtype=dtype, name=f"stem_bn{i}")(x))
        x = avg_pool(x, 2)
        block = nn.remat(Bottleneck) if self.options.remat else Bottleneck
        for stage, count in enumerate(self.layers):
            planes = self.width * 2**stage
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                x = block(planes, stride, options=self.options, name=f"layer{stage + 1}_{i}")(x)
        grid = self.image_size // 32
        return AttentionPool2d(self.num_heads, self.embed_dim, grid * grid + 1, options=self.options,
                               name="attnpool")(x)
