"""Mixed-precision matmuls: low-precision inputs, float32 accumulation and outputs, in both passes.

`low_precision_dot_general("bfloat16")` is a drop-in `dot_general` for Flax's
`nn.Dense` / `nn.DenseGeneral`. It casts both operands to bfloat16 and asks
for float32 results, in the forward pass and in the two backward matmuls
(whose inputs, the cotangent and the saved operands, are bfloat16 too), so
every matmul of a training step runs on the hardware's bfloat16 units while
sums, norms, softmax and the optimizer stay float32: the policy of
`torch.autocast`, with float32 outputs where autocast rounds them to bfloat16.
Plain `jax.grad` of a cast-then-dot would run the backward matmuls in float32,
which is why the backward pass is written out here.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jclip.models.partitioning import vary_alike


def _contract(lhs, rhs, lhs_axes, rhs_axes):
    return lax.dot_general(lhs, rhs, ((tuple(lhs_axes), tuple(rhs_axes)), ((), ())),
                           preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _tensordot(lhs, rhs, contracted: int, dtype):
    """lhs [..., K...] . rhs [K..., N...] -> [..., N...] float32, K being `contracted` axes."""
    return _tensordot_forward(lhs, rhs, contracted, dtype)[0]


def _tensordot_forward(lhs, rhs, contracted, dtype):
    low_lhs, low_rhs = lhs.astype(dtype), rhs.astype(dtype)
    out = _contract(low_lhs, low_rhs, range(lhs.ndim - contracted, lhs.ndim), range(contracted))
    # Zero-size arrays carry the operands' dtypes to the backward pass.
    return out, (low_lhs, low_rhs, jnp.zeros((0,), lhs.dtype), jnp.zeros((0,), rhs.dtype))


def _tensordot_backward(contracted, dtype, residuals, cotangent):
    low_lhs, low_rhs, lhs_dtype, rhs_dtype = residuals
    cotangent = cotangent.astype(dtype)
    kept_lhs = low_lhs.ndim - contracted  # the leading axes of lhs and of the output
    lhs_grad = _contract(cotangent, low_rhs, range(kept_lhs, cotangent.ndim), range(contracted, low_rhs.ndim))
    rhs_grad = _contract(low_lhs, cotangent, range(kept_lhs), range(kept_lhs))
    return lhs_grad.astype(lhs_dtype.dtype), rhs_grad.astype(rhs_dtype.dtype)


_tensordot.defvjp(_tensordot_forward, _tensordot_backward)


def low_precision_dot_general(dtype):
    """A `lax.dot_general` for Flax layers computing in `dtype` (e.g. "bfloat16") with float32 accumulation.

    It supports what dense layers do: contract the trailing axes of the input
    with the leading axes of the kernel, no batch axes.
    """
    dtype = jnp.dtype(dtype)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **unused):
        (lhs_contracting, rhs_contracting), batch = dimension_numbers
        contracted = len(lhs_contracting)
        if (batch != ((), ()) or tuple(lhs_contracting) != tuple(range(lhs.ndim - contracted, lhs.ndim))
                or tuple(rhs_contracting) != tuple(range(contracted))):
            raise ValueError(f"low_precision_dot_general contracts trailing input axes with leading kernel axes; "
                             f"got dimension numbers {dimension_numbers}")
        lhs, rhs = vary_alike(lhs, rhs)
        return _tensordot(lhs, rhs, contracted, dtype)

    return dot_general
