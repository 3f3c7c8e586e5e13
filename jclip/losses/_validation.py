"""Input checks shared by the losses: clear `ValueError`s that name the offending shapes."""

import jax.numpy as jnp

from jclip.losses._device_axis import device_count


def prepare_embeddings(zimg, ztxt, *, axis_name, ring, block_size):
    """Checked embeddings in (at least) float32, with the local and global batch sizes."""
    check_embeddings(zimg, ztxt)
    local_batch = zimg.shape[0]
    batch = local_batch * device_count(axis_name)
    check_tiling(local_batch, batch, axis_name=axis_name, ring=ring, block_size=block_size)
    dtype = jnp.promote_types(zimg.dtype, jnp.float32)
    return zimg.astype(dtype), ztxt.astype(dtype), local_batch, batch


def ring_type(ring_dtype, ring):
    """`ring_dtype` as a NumPy floating dtype (None stays None); it needs `ring=True`."""
    if ring_dtype is None:
        return None
    if not ring:
        raise ValueError(f"ring_dtype={ring_dtype!r} is the type the embeddings travel in around the ring: set "
                         f"ring=True, or leave ring_dtype=None")
    try:
        dtype = jnp.dtype(ring_dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"ring_dtype must be a floating-point type such as 'bfloat16'; got {ring_dtype!r}")
    return dtype


def check_embeddings(zimg, ztxt):
    """Both embeddings must be 2-D `[batch, dim]` arrays of the same shape."""
    if jnp.ndim(zimg) != 2 or jnp.ndim(ztxt) != 2:
        raise ValueError(
            f"embeddings must be 2-D [batch, dim]; got zimg {jnp.shape(zimg)} and ztxt {jnp.shape(ztxt)}"
        )
    if jnp.shape(zimg) != jnp.shape(ztxt):
        raise ValueError(
            f"zimg and ztxt must have the same shape; got zimg {jnp.shape(zimg)} and ztxt {jnp.shape(ztxt)}"
        )


def check_has_negatives(batch, name):
    """A contrastive loss over negatives needs at least two pairs in the global batch."""
    if batch < 2:
        raise ValueError(f"{name} needs negatives: a global batch of at least 2 pairs; got {batch}")


def as_scalar(value, name):
    """Returns a one-element parameter (shape `()` or `(1,)`, as some checkpoints store it) as a scalar."""
    if jnp.size(value) != 1:
        raise ValueError(f"{name} must hold exactly one element; got shape {jnp.shape(value)}")
    return jnp.reshape(value, ())


def check_tiling(local_batch, global_batch, *, axis_name, ring, block_size):
    """A ring needs a device axis; a block size must divide the columns each step scans."""
    if ring and axis_name is None:
        raise ValueError(
            f"ring=True passes embeddings between devices, and these {local_batch} rows are on no mesh: "
            f"shard them over a mesh axis (jax.device_put(z, NamedSharding(mesh, P('data')))) or call the loss "
            f"per device with axis_name='data' inside jax.shard_map(..., in_specs=P('data')) or jax.pmap"
        )
    if block_size is None:
        return
    columns = local_batch if ring else global_batch
    what = "local batch" if ring else "global batch"
    if block_size <= 0 or columns % block_size:
        raise ValueError(
            f"block_size={block_size} must be a positive divisor of the {what} ({columns} columns; "
            f"local embeddings have {local_batch} rows)"
        )
