"""Pre-norm transformer encoder shared by the image and the text towers.

The layers take the model's `options` (`jclip.models.execution`: computation
and matmul dtypes, remat, logical axes); those that normalise also take their
tower's `norm_eps` (OpenAI / OpenCLIP use 1e-5, timm and SigLIP 1e-6).

The blocks are CLIP's (LayerNorm, a GELU MLP, learned positions added by the
tower) unless a tower asks for the options of more recent language models,
each off by default (`Encoder`): RMSNorm, a gated MLP such as SwiGLU, query-key
normalisation and rotary position embeddings.
"""

import functools
import math
from typing import Any, Callable, Iterable, Optional

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
    "silu": jax.nn.silu,  # x * sigmoid(x), SiLU or Swish (Elfwing et al. 2018): the gate of SwiGLU
}


def check_option(option: str, value: Any, choices: Iterable[Any]) -> None:
    """A clear error for a configuration `value` of `option` that is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"unknown {option} {value!r}; use one of {sorted(choices)}")


def check_activation(activation: str) -> None:
    check_option("activation", activation, ACTIVATIONS)


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


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467): x / sqrt(mean(x^2) + eps) * scale over the last axis.

    LayerNorm without the centring and the bias, as in Llama-style language
    models: one statistic per row, one parameter ("scale"). Statistics in
    float32, the output in `dtype`.
    """

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        inverse_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (x32 * inverse_rms * scale).astype(self.dtype)


NORMS: dict[str, type[nn.Module]] = {"layer": LayerNorm, "rms": RMSNorm}


def normalization(kind: str, eps: float, options: ExecutionOptions, name: str) -> nn.Module:
    """The norm layer of `kind` ("layer": `LayerNorm`, "rms": `RMSNorm`)."""
    check_option("norm", kind, NORMS)
    return NORMS[kind](epsilon=eps, dtype=options.dtype, name=name)


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


def rotary_embedding(x: jax.Array, theta: float) -> jax.Array:
    """Queries or keys [..., length, heads, head_width] rotated by their positions 0, 1, ... (RoPE).

    Rotary position embeddings (Su et al. 2021, RoFormer, arXiv 2104.09864), in
    the rotate-half layout of GPT-NeoX and Llama: feature pair
    (i, i + head_width / 2) of position p turns by the angle
    p * theta^(-2i / head_width), so that a query at position m and a key at
    position n score by m - n alone: relative positions, without parameters.
    Computed in float32, returned in x's dtype.
    """
    length, head_width = x.shape[-3], x.shape[-1]
    if head_width % 2:
        raise ValueError(f"rotary position embeddings need an even head width; got {head_width}")
    half = head_width // 2
    frequencies = theta ** (-2.0 * jnp.arange(half, dtype=jnp.float32) / head_width)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * frequencies  # [length, half]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]  # broadcast over the heads
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    """Multi-head dot-product attention with query-key normalisation and rotary positions, each optional.

    `attention`'s `nn.MultiHeadDotProductAttention`, which the default blocks
    keep, can normalise queries and keys only with a bias-free LayerNorm of
    fixed epsilon, and has no place for a rotation between the projections and
    the dot product. This module computes the same attention with the same
    parameters ("query", "key", "value", "out"), plus:

    - `qk_norm`: "layer" or "rms" normalises each head's queries and keys over
      the head width before the dot product (parameters "query_norm" and
      "key_norm", shared by the heads), which bounds the attention logits and
      keeps training stable at high learning rates (Dehghani et al. 2023,
      ViT-22B, arXiv 2302.05442; Henry et al. 2020); None: no normalisation;
    - `rope_theta`: queries and keys rotated by their positions with this base
      (`rotary_embedding`); None: no rotation.
    """

    num_heads: int
    qk_norm: Optional[str] = None
    rope_theta: Optional[float] = None
    norm_eps: float = 1e-6
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, inputs_q, inputs_kv, mask: Optional[jax.Array] = None):
        width = inputs_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"the width {width} does not divide into num_heads={self.num_heads} heads")
        dot_general = _dot_general(self.options.matmul_dtype)
        project = functools.partial(
            nn.DenseGeneral, (self.num_heads, width // self.num_heads), dtype=self.options.dtype,
            dot_general=dot_general,
            kernel_init=initializer(nn.linear.default_kernel_init, ("embed", "heads", "kv"), self.options.logical_axes))
        query, key = project(name="query")(inputs_q), project(name="key")(inputs_kv)
        value = project(name="value")(inputs_kv)
        if self.qk_norm:
            query = normalization(self.qk_norm, self.norm_eps, self.options, "query_norm")(query)
            key = normalization(self.qk_norm, self.norm_eps, self.options, "key_norm")(key)
        if self.rope_theta is not None:
            query, key = rotary_embedding(query, self.rope_theta), rotary_embedding(key, self.rope_theta)
        x = nn.dot_product_attention(query, key, value, mask=mask, dtype=self.options.dtype)
        return nn.DenseGeneral(
            width, axis=(-2, -1), dtype=self.options.dtype, dot_general=dot_general, name="out",
            kernel_init=initializer(nn.linear.default_kernel_init, ("heads", "kv", "embed"), self.options.logical_axes),
        )(x)


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


class GatedMlpBlock(nn.Module):
    """A gated linear unit MLP, proj(activation(gate(x)) * up(x)) (Shazeer 2020, arXiv 2002.05202).

    With `activation="silu"` it is SwiGLU (Llama's MLP), with "gelu" GEGLU.
    Three matrices of `hidden_dim` columns where `MlpBlock` has two: an
    `mlp_ratio` of 8/3 gives it the parameters of `MlpBlock` at 4.
    """

    hidden_dim: int
    activation: str = "silu"
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        gate = dense(self.hidden_dim, ("embed", "mlp"), self.options, "gate")(x)
        up = dense(self.hidden_dim, ("embed", "mlp"), self.options, "up")(x)
        return dense(width, ("mlp", "embed"), self.options, "proj")(ACTIVATIONS[self.activation](gate) * up)


MLPS: dict[str, type[nn.Module]] = {"standard": MlpBlock, "gated": GatedMlpBlock}


class EncoderBlock(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)).

    `cross_attention=True` makes it a decoder's cross-attention layer (Vaswani
    et al. 2017): the queries come from `x`, the keys and values from
    `norm_kv(context)`, as in OpenCLIP's CoCa decoder. `norm`, `mlp`,
    `qk_norm` and `rope_theta` are the options `Encoder` describes; with
    `qk_norm` or `rope_theta` the attention is `Attention`, else Flax's.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    norm_eps: float = 1e-6
    cross_attention: bool = False
    norm: str = "layer"
    mlp: str = "standard"
    qk_norm: bool = False
    rope_theta: Optional[float] = None
    options: ExecutionOptions = ExecutionOptions()

    def _attention(self):
        if not self.qk_norm and self.rope_theta is None:
            return attention(self.num_heads, self.options, "attn")
        if self.cross_attention and self.rope_theta is not None:
            raise ValueError("rotary position embeddings are for self-attention; a cross-attention block's keys "
                             "have no positions in the queries' sequence")
        return Attention(self.num_heads, qk_norm=self.norm if self.qk_norm else None, rope_theta=self.rope_theta,
                         norm_eps=self.norm_eps, options=self.options, name="attn")

    @nn.compact
    def __call__(self, x, mask: Optional[jax.Array] = None, context: Optional[jax.Array] = None):
        if self.cross_attention == (context is None):
            raise ValueError("a cross-attention block needs a context and a self-attention block takes none; "
                             f"got cross_attention={self.cross_attention} and context={context is not None}")
        check_option("mlp", self.mlp, MLPS)
        width = x.shape[-1]
        y = normalization(self.norm, self.norm_eps, self.options, "ln_1")(x)
        kv = normalization(self.norm, self.norm_eps, self.options, "ln_1_kv")(context) if self.cross_attention else y
        y = self._attention()(y, kv, mask=mask)
        x = x + y
        y = normalization(self.norm, self.norm_eps, self.options, "ln_2")(x)
        y = MLPS[self.mlp](int(width * self.mlp_ratio), activation=self.activation, options=self.options,
                           name="mlp")(y)
        return x + y


class Encoder(nn.Module):
    """A stack of `depth` pre-norm encoder blocks.

    `options.remat` recomputes each block's activations in the backward pass
    instead of storing them (gradient checkpointing, Chen et al. 2016):
    activation memory of one block instead of `depth`, for about a third more
    compute.

    The options of more recent language models, off by default:

    - `norm`: "layer" (`LayerNorm`) or "rms" (`RMSNorm`), the blocks' norms;
    - `mlp`: "standard" (`MlpBlock`) or "gated" (`GatedMlpBlock`: SwiGLU with
      `activation="silu"`), of hidden width `mlp_ratio` * width either way;
    - `qk_norm`: normalise each head's queries and keys with `norm` before the
      dot product (`Attention`);
    - `rope_theta`: rotary position embeddings with this base in every
      attention layer (`rotary_embedding`); None: none.
    """

    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    norm_eps: float = 1e-6
    norm: str = "layer"
    mlp: str = "standard"
    qk_norm: bool = False
    rope_theta: Optional[float] = None
    options: ExecutionOptions = ExecutionOptions()

    @nn.compact
    def __call__(self, x, mask: Optional[jax.Array] = None):
        check_activation(self.activation)
        block = nn.remat(EncoderBlock) if self.options.remat else EncoderBlock
        for i in range(self.depth):
            x = block(self.num_heads, mlp_ratio=self.mlp_ratio, activation=self.activation, norm_eps=self.norm_eps,
                      norm=self.norm, mlp=self.mlp, qk_norm=self.qk_norm, rope_theta=self.rope_theta,
                      options=self.options, name=f"block_{i}")(x, mask)
        return x
