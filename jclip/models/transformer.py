"""Pre-norm transformer encoder shared by the image and the text towers."""

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def quick_gelu(x: jax.Array) -> jax.Array:
    """The sigmoid approximation of GELU used by OpenAI's CLIP weights."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": quick_gelu,
}


class MlpBlock(nn.Module):
    """Two dense layers with an activation between them."""

    hidden_dim: int
    activation: str = "gelu"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc")(x)
        x = ACTIVATIONS[self.activation](x)
        return nn.Dense(width, dtype=self.dtype, name="proj")(x)


class EncoderBlock(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x))."""

    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask: Optional[jax.Array] = None):
        width = x.shape[-1]
        y = nn.LayerNorm(dtype=self.dtype, name="ln_1")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype, name="attn"
        )(y, y, mask=mask)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype, name="ln_2")(x)
        y = MlpBlock(int(width * self.mlp_ratio), self.activation, self.dtype, name="mlp")(y)
        return x + y


class Encoder(nn.Module):
    """A stack of `depth` pre-norm encoder blocks."""

    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask: Optional[jax.Array] = None):
        for i in range(self.depth):
            x = EncoderBlock(
                self.num_heads, self.mlp_ratio, self.activation, self.dtype, name=f"block_{i}"
            )(x, mask)
        return x
