"""Logits and in-batch top-1 retrieval accuracy, on the whole batch or per device (`axis_name`)."""

import jax.numpy as jnp

from jclip.losses._device_axis import device_count, first_global_row, gather_rows, global_sum


def logits(zimg, ztxt, scale, bias=None, *, axis_name=None):
    """`[b, B]` image→text logits of this device's images against the texts of all devices.

    scale · zimg @ ztxtᵀ (+ bias); with `axis_name`, local row i's positive is column d·b + i.
    """
    out = scale * zimg @ gather_rows(ztxt, axis_name).T
    return out if bias is None else out + bias


def top1_accuracy(zimg, ztxt, *, axis_name=None):
    """Fraction of the global batch whose nearest in-batch partner is its positive, both ways.

    Returns `{"img2txt": ..., "txt2img": ...}`, the same on every device. A positive scale and a
    bias do not change the nearest partner, so neither is needed.
    """
    local_batch = zimg.shape[0]
    positives = first_global_row(local_batch, axis_name) + jnp.arange(local_batch)

    def accuracy(rows, columns):
        nearest = jnp.argmax(rows @ gather_rows(columns, axis_name).T, axis=1)
        hits = jnp.sum(nearest == positives)
        return global_sum(hits, axis_name) / (local_batch * device_count(axis_name))

    return {"img2txt": accuracy(zimg, ztxt), "txt2img": accuracy(ztxt, zimg)}
