"""Logits, in-batch top-1 retrieval accuracy and embedding geometry, on the whole batch or per device."""

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


def embedding_geometry(zimg, ztxt, *, axis_name=None):
    """How the batch's embeddings sit in their space, the same on every device.

    - `alignment`: mean ‖x_i − y_i‖² over positive pairs (Wang & Isola 2020; lower is better aligned);
    - `uniformity_image` / `uniformity_text`: log mean exp(−2‖u_i − u_j‖²) over pairs i ≠ j of one
      modality (Wang & Isola 2020; lower is more uniform on the sphere);
    - `modality_gap`: ‖mean(x) − mean(y)‖, the distance between the image and text centroids
      (Liang et al. 2022, "Mind the Gap").
    """
    local_batch = zimg.shape[0]
    total = local_batch * device_count(axis_name)
    positives = first_global_row(local_batch, axis_name) + jnp.arange(local_batch)

    def uniformity(rows):
        columns = gather_rows(rows, axis_name)
        squared = (jnp.sum(rows**2, 1)[:, None] + jnp.sum(columns**2, 1)[None, :] - 2 * rows @ columns.T)
        kernel = jnp.exp(-2 * jnp.maximum(squared, 0.0))
        off_diagonal = jnp.sum(kernel) - jnp.sum(kernel[jnp.arange(local_batch), positives])
        return jnp.log(global_sum(off_diagonal, axis_name) / (total * (total - 1)))

    alignment = global_sum(jnp.sum((zimg - ztxt) ** 2), axis_name) / total
    gap = global_sum(jnp.sum(zimg - ztxt, axis=0), axis_name) / total
    return {"alignment": alignment, "uniformity_image": uniformity(zimg), "uniformity_text": uniformity(ztxt),
            "modality_gap": jnp.linalg.norm(gap)}
