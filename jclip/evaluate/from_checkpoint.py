"""Evaluating a checkpoint of a training run, as `python -m jclip.evaluate` does."""

from typing import Optional

from ml_collections import ConfigDict

from jclip import models, parallel
from jclip.checkpoint import Checkpointer
from jclip.data import shapes
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.shapes_benchmark import evaluate_and_report
from jclip.train.optimizer import build_optimizer
from jclip.train.state import abstract_train_state


def evaluate_checkpoint(config: ConfigDict, workdir: str, step: Optional[int] = None) -> dict:
    """Evaluate the checkpoint of `workdir` at `step` (default: latest); write results.json, print the table."""
    mesh = parallel.make_mesh()
    builder = shapes.prepare(config.evaluate.dataset, config.data.data_dir)
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.data_dir)
    model = models.model_class(config.model)(**config.model)
    checkpointer = Checkpointer(workdir, config.model.to_dict(), save_every=1)
    abstract = abstract_train_state(model, build_optimizer(config), (config.data.image_size, config.data.image_size, 3),
                                    config.data.text_length, mesh)
    state, _ = checkpointer.restore(abstract, step)
    checkpointer.close()
    return evaluate_and_report(model, state.params, builder, tokenizer, config, workdir, mesh, int(state.step))
