"""Pre-norm transformer encoder shared by the image and the text towers.

Every layer takes `dtype`, the computation dtype (e.g. bfloat16 for mixed
precision; parameters stay float32), `matmul_dtype` (None, or the dtype the
dense layers' matmuls take their inputs in, accumulating in float32: see
`jclip.models.precision`), `norm_eps` (OpenAI / OpenCLIP use 1e-5,
timm and SigLIP 1e-6) and `logical_axes` (see `jclip.models.partitioning`).
"""

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jclip.models.partitioning import initializer
from jclip.models.precision import low_precision_dot_general


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU (Hendrycks & Gimpel 2016), x * Phi(x), written with erf as PyTorch computes it.

    `jax.nn.gelu(approximate=False)` goes through erfc, which XLA's CPU backend
    lowers to two branchy elementwise passes; erf is one polynomial pass, and
    it is as accurate wherever GELU is not already below float32's resolution.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * (2.0**-0.5)))


def quick_gelu(x: jax.Array) -> jax.Array:
    """The sigmoid approximation of GELU used by OpenAI's CLIP weights."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "quick_gelu": quick_gelu,
}


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}")


def layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
    """LayerNorm with the two-pass variance of PyTorch (the one-pass form loses digits in float32)."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def _dot_general(matmul_dtype: Optional[str]):
    return low_precision_dot_general(matmul_dtype) if matmul_dtype else None


def dense(features: int, axes: tuple[str, str], logical_axes: bool, dtype, name: str,
          use_bias: bool = True, matmul_dtype: Optional[str] = None) -> nn.Dense:
    """nn.Dense with Flax's default initialisation and logical axes `(input, output)`."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name, dot_general=_dot_general(matmul_dtype),
                    kernel_init=initializer(nn.linear.default_kernel_init, axes, logical_axes))


def attention(num_heads: int, logical_axes: bool, dtype, name: str, out_features: Optional[int] = None,
              matmul_dtype: Optional[str] = None):
    """Multi-head dot-product attention scaled by 1/sqrt(head width) (Vaswani et al. 2017).

    With `matmul_dtype` the query, key, value and output projections take
    their inputs in that dtype; the attention weights stay in `dtype`.
    """
    return nn.MultiHeadDotProductAttention(
        num_heads=num_heads, dtype=dtype, out_features=out_features, name=name,
        qkv_dot_general=_dot_general(matmul_dtype), out_dot_general=_dot_general(matmul_dtype),
        kernel_init=initializer(nn.linear.default_kernel_init, ("embed", "heads", "kv"), logical_axes),
        out_kernel_init=initializer(nn.linear.default_kernel_init, ("heads", "kv", "embed"), logical_axes),
    )


class MlpBlock(nn.Module):
    """Two dense layers with an activation between them."""

    hidden_dim: int
    activation: str = "gelu"
    dtype: jnp.dtype = jnp.float32
    logical_axes: bool = False
    matmul_dtype: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = dense(self.hidden_dim, ("embed", "mlp"), self.logical_axes, self.dtype, "fc",
                  matmul_dtype=self.matmul_dtype)(x)
        x = ACTIVATIONS[self.activation](x)
        return dense(width, ("mlp", "embed"), self.logical_axes, self.dtype, "proj", matmul_dtype=self.matmul_dtype)(x)


class EncoderBlock(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)).

    `cross_attention=True` makes it a decoder's cross-attention layer (Vaswani
    et al. 2017): the queries come from `x`, the keys and values from
    `norm_kv(context)`, as in OpenCLIP's CoCa decoder.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    dtype: jnp.dtype = jnp.float32
    norm_eps: float = 1e-6
    logical_axes: bool = False
    cross_attention: bool = False
    matmul_dtype: Optional[str] = None

    @nn.compact
    def __call__(self, x, mask: Optional[jax.Array] = None, context: Optional[jax.Array] = None):
        if self.cross_attention == (context is None):
            raise ValueError("a cross-attention block needs a context and a self-attention block takes none; "
                             f"got cross_attention={self.cross_attention} and context={context is not None}")
        width = x.shape[-1]
        y = layer_norm(self.norm_eps, self.dtype, "ln_1")(x)
        kv = layer_norm(self.norm_eps, self.dtype, "ln_1_kv")(context) if self.cross_attention else y
        y = attention(self.num_heads, self.logical_axes, self.dtype, "attn",
                      matmul_dtype=self.matmul_dtype)(y, kv, mask=mask)
        x = x + y
        y = layer_norm(self.norm_eps, self.dtype, "ln_2")(x)
        y = MlpBlock(int(width * self.mlp_ratio), self.activation, self.dtype, self.logical_axes, self.matmul_dtype,
                     name="mlp")(y)
        return x + y


class Encoder(nn.Module):
    """A stack of `depth` pre-norm encoder blocks.

    `remat=True` recomputes each block's activations in the backward pass
    instead of storing them (gradient checkpointing, Chen et al. 2016):
    activation memory of one block instead of `depth`, for about a third more
    compute.
    """

    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    dtype: jnp.dtype = jnp.float32
    norm_eps: float = 1e-6
    remat: bool = False
    logical_axes: bool = False
    matmul_dtype: Optional[str] = None

    @nn.compact
    def __call__(self, x, mask: Optional[jax.Array] = None):
        check_activation(self.activation)
        block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
        for i in range(self.depth):
            x = block(self.num_heads, self.mlp_ratio, self.activation, self.dtype, self.norm_eps,
                      self.logical_axes, matmul_dtype=self.matmul_dtype, name=f"block_{i}")(x, mask)
        return x
