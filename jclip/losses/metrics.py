"""Logits, in-batch top-1 retrieval accuracy and embedding geometry, on the whole batch or per device."""

import jax.numpy as jnp

from jclip.losses._device_axis import device_count, first_global_row, gather_rows, global_sum
from jclip.losses._global_arrays import over_batch_axes
from jclip.losses.geometry import alignment_loss, cross_modal_uniformity_loss, uniformity_loss


@over_batch_axes(batch=("zimg", "ztxt"), replicated=("scale", "bias"), sharded_output=True)
def logits(zimg, ztxt, scale, bias=None, *, axis_name=None):
    """`[b, B]` image→text logits of this device's images against the texts of all devices.

    scale · zimg @ ztxtᵀ (+ bias); with `axis_name`, local row i's positive is column d·b + i.
    """
    out = scale * zimg @ gather_rows(ztxt, axis_name).T
    return out if bias is None else out + bias


@over_batch_axes(batch=("zimg", "ztxt"))
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


@over_batch_axes(batch=("zimg", "ztxt"))
def embedding_geometry(zimg, ztxt, *, axis_name=None):
    """How the batch's embeddings sit in their space, the same on every device.

    - `alignment`: mean ‖x_i − y_i‖² over positive pairs (`alignment_loss`, Wang & Isola 2020; lower
      is better aligned);
    - `uniformity_image` / `uniformity_text`: log mean exp(−2‖u_i − u_j‖²) over pairs i ≠ j of one
      modality (`uniformity_loss`, Wang & Isola 2020; lower is more uniform on the sphere);
    - `uniformity_cross`: the same between images and the captions of other pairs
      (`cross_modal_uniformity_loss`, Fahim et al. 2024);
    - `modality_gap`: ‖mean(x) − mean(y)‖, the distance between the image and text centroids
      (Liang et al. 2022, "Mind the Gap").
    """
    geometry = {
        "alignment": alignment_loss(zimg, ztxt, axis_name=axis_name),  # first: it checks the shapes
        "uniformity_image": uniformity_loss(zimg, axis_name=axis_name),
        "uniformity_text": uniformity_loss(ztxt, axis_name=axis_name),
        "uniformity_cross": cross_modal_uniformity_loss(zimg, ztxt, axis_name=axis_name),
    }
    total = zimg.shape[0] * device_count(axis_name)
    gap = global_sum(jnp.sum(zimg - ztxt, axis=0), axis_name) / total
    return {**geometry, "modality_gap": jnp.linalg.norm(gap)}
