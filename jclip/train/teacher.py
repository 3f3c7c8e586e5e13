"""The frozen teacher of the `distillation` loss: a checkpoint's model, run on each batch before the step.

`config.teacher` names a checkpoint (`RUN/checkpoints/STEP`, or a run directory for its latest), of
any model jclip can build (a converted OpenCLIP model too). Its embeddings and scale join the batch
as `teacher_zimg`, `teacher_ztxt` and `teacher_scale` (repeated per example so that it shards with
the batch), which the `distillation` term of the objective reads. The teacher sees the student's
images (finished by the preprocessing's per-pixel ops, as the train step finishes them) and tokens,
so it must share the student's tokenizer and image size.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from ml_collections import ConfigDict

from jclip import parallel
from jclip.checkpoint import load_model, locate
from jclip.data import preprocess

Batch = dict[str, jax.Array]


def make_teacher(config: ConfigDict, mesh: Mesh, tokenizer) -> Optional[Callable[[Batch], Batch]]:
    """`batch -> {"teacher_zimg", "teacher_ztxt", "teacher_scale"}` of `config.teacher`, or None without one."""
    if config.get("teacher") is None:
        return None
    if "distillation" not in config.losses:
        raise ValueError("config.teacher is set but config.losses has no distillation term; add "
                         "config.losses.distillation = dict(weight=1.0) or unset config.teacher")
    run_directory, step = locate(None, config.teacher, None)
    model, params, record = load_model(config, run_directory, step, mesh, tokenizer, verbose=False)
    print(f"Distilling from the teacher at {run_directory}, step {record['step']}.")
    finish_images = preprocess.batch_op(config.data.preprocess)

    def embed(params, images, tokens):
        out = model.apply({"params": params}, finish_images(images), tokens)
        return {"teacher_zimg": out["zimg"], "teacher_ztxt": out["ztxt"],
                "teacher_scale": jnp.broadcast_to(jnp.reshape(out["scale"], ()), (images.shape[0],))}

    embed = jax.jit(embed, out_shardings=parallel.batch_sharding(mesh))
    return lambda batch: embed(params, batch["image"], batch["tokens"])
