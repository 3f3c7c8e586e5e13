"""Pre-norm transformer encoder shared by the image and the text towers.

The layers take the model's `options` (`jclip.models.execution`: computation
and matmul dtypes, remat, logical axes); those that normalise also take their
tower's `norm_eps` (OpenAI / OpenCLIP use 1e-5, timm and SigLIP 1e-6).
"""

import functools
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jclip.models.execution import ExecutionOptions
from jclip.models.partitioning import initializer, vary_alike
from jclip.models.precision import low_precision_dot_general


SQRT_HALF = 2.0**-0.5
INVERSE_SQRT_2PI = (2.0 * math.pi) ** -0.5


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU (Hendrycks & Gimpel 2016), x * Phi(x), written with erf as PyTorch computes it.

    `jax.nn.gelu(approximate=False)` goes through erfc, which XLA's CPU backend
    lowers to two branchy elementwise passes; erf is one polynomial pass, as
    accurate wherever GELU is not already below float32's resolution. The
    backward pass recomputes Phi from x, so the forward pass stores nothing but
    its input (one pass over the MLP activations each way, 10 % of a CPU step).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * SQRT_HALF))


def _gelu_forward(x):
    return gelu(x), x


def _gelu_backward(x, cotangent):
    derivative = 0.5 * (1.0 + jax.lax.erf(x * SQRT_HALF)) + x * INVERSE_SQRT_2PI * jnp.exp(-0.5 * x * x)
    return (cotangent * derivative.astype(cotangent.dtype),)


gelu.defvjp(_gelu_forward, _gelu_backward)


def quick_gelu(x: jax.Array) -> jax.Array:
    """The sigmoid approximation of GELU used by OpenAI's CLIP weights."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU's tanh approximation (Hendrycks & Gimpel 2016), PyTorch's `approximate="tanh"`: SigLIP 2's text tower."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
}


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize(x, scale, bias, eps: float):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32; two-pass variance."""
    return _normalize_forward(x, scale, bias, eps)[0]


def _normalize_forward(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=-1, keepdims=True)
    centred = x32 - mean
    inverse_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return centred * inverse_std * scale + bias, (x, mean, inverse_std, scale)


def _normalize_backward(eps, residuals, cotangent):
    x, mean, inverse_std, scale = residuals
    normalized = (x.astype(jnp.float32) - mean) * inverse_std
    cotangent = cotangent.astype(jnp.float32)
    scaled = cotangent * scale
    x_grad = inverse_std * (scaled - scaled.mean(axis=-1, keepdims=True)
                            - normalized * (scaled * normalized).mean(axis=-1, keepdims=True))
    rows = tuple(range(x.ndim - 1))
    return x_grad.astype(x.dtype), (cotangent * normalized).sum(rows), cotangent.sum(rows)


_normalize.defvjp(_normalize_forward, _normalize_backward)


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016) over the last axis, with the parameters of `nn.LayerNorm` ("scale", "bias").

    Statistics in float32 with the two-pass variance of PyTorch (the one-pass
    form loses digits in float32); the output in `dtype`. The backward pass is
    written out: it keeps only the input and two numbers per row, and takes two
    row reductions where autodiff of the forward formula takes five passes.
    """

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        x, scale, bias = vary_alike(x, scale, bias)
        return _normalize(x, scale, bias, self.epsilon).astype(self.dtype)


def layer_norm(eps: float, options: ExecutionOptions, name: str) -> LayerNorm:
    return LayerNorm(epsilon=eps, dtype=options.dtype, name=name)


def _dot_general(matmul_dtype: Optional[str]):
    return low_precision_dot_general(matmul_dtype) if matmul_dtype else None


def dense(features: int, axes: tuple[str, str], options: ExecutionOptions, name: str,
          use_bias: bool = True) -> nn.Dense:
    """nn.Dense with Flax's default initialisation and logical axes `(input, output)`."""
    return nn.Dense(features, use_bias=use_bias, dtype=options.dtype, name=name,
                    dot_general=_dot_general(options.matmul_dtype),
                    kernel_init=initializer(nn.linear.default_kernel_init, axes, options.logical_axes))


def attention(num_heads: int, options: ExecutionOptions, name: str, out_features: Optional[int] = None):
    """Multi-head dot-product attention scaled by 1/sqrt(head width) (Vaswani et al. 2017).

    With `options.matmul_dtype` the query, key, value and output projections
    take their inputs in that dtype; the attention weights stay in
    `options.dtype`.
    """
    return nn.MultiHeadDotProductAttention(
        num_heads=num_heads, dtype=options.dtype, out_features=out_features, name=name,
        qkv_dot_general=_dot_general(options.matmul_dtype), out_dot_general=_dot_general(options.matmul_dtype),
        kernel_init=initializer(nn.linear.default_kernel_init, ("embed", "heads", "kv"), options.logical_axes),
        out_kernel_init=initializer(nn.linear.default_kernel_init, ("heads", "kv", "embed"), options.logical_axes),
    )


class MlpBlock(nn.Module):
    """Two dense layers with an activation between them."""

    hidden_dim: int
    activation: str = "gelu"
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = dense(self.hidden_dim, ("embed", "mlp"), self.options, "fc")(x)
        x = ACTIVATIONS[self.activation](x)
        return dense(width, ("mlp", "embed"), self.options, "proj")(x)


class EncoderBlock(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)).

    `cross_attention=True` makes it a decoder's cross-attention layer (Vaswani
    et al. 2017): the queries come from `x`, the keys and values from
    `norm_kv(context)`, as in OpenCLIP's CoCa decoder.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    norm_eps: float = 1e-6
    cross_attention: bool = False
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, x, mask: Optional[jax.Array] = None, context: Optional[jax.Array] = None):
        if self.cross_attention == (context is None):
            raise ValueError("a cross-attention block needs a context and a self-attention block takes none; "
                             f"got cross_attention={self.cross_attention} and context={context is not None}")
        width = x.shape[-1]
        y = layer_norm(self.norm_eps, self.options, "ln_1")(x)
        kv = layer_norm(self.norm_eps, self.options, "ln_1_kv")(context) if self.cross_attention else y
        y = attention(self.num_heads, self.options, "attn")(y, kv, mask=mask)
        x = x + y
        y = layer_norm(self.norm_eps, self.options, "ln_2")(x)
        y = MlpBlock(int(width * self.mlp_ratio), activation=self.activation, options=self.options, name="mlp")(y)
        return x + y


class Encoder(nn.Module):
    """A stack of `depth` pre-norm encoder blocks.

    `options.remat` recomputes each block's activations in the backward pass
    instead of storing them (gradient checkpointing, Chen et al. 2016):
    activation memory of one block instead of `depth`, for about a third more
    compute.
    """

    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    norm_eps: float = 1e-6
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, x, mask: Optional[jax.Array] = None):
        check_activation(self.activation)
        block = nn.remat(EncoderBlock) if self.options.remat else EncoderBlock
        for i in range(self.depth):
            x = block(self.num_heads, mlp_ratio=self.mlp_ratio, activation=self.activation, norm_eps=self.norm_eps,
                      options=self.options, name=f"block_{i}")(x, mask)
        return x
