"""Evaluating a checkpoint of a training run, as `python -m jclip.evaluate` does."""

from typing import Optional

from ml_collections import ConfigDict

from jclip import models, parallel
from jclip.checkpoint import Checkpointer
from jclip.data import shapes
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.shapes_benchmark import evaluate_and_report
from jclip.train.loop import evaluation_params, train_state_specs
from jclip.train.optimizer import build_optimizer
from jclip.train.state import abstract_train_state


def evaluate_checkpoint(config: ConfigDict, workdir: str, step: Optional[int] = None) -> dict:
    """Evaluate the checkpoint of `workdir` at `step` (default: latest; its EMA parameters if it has them);
    write results.json, print the table."""
    mesh = parallel.make_mesh()
    builder = shapes.prepare(config.evaluate.dataset, config.data.data_dir)
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.data_dir)
    model = models.model_class(config.model)(**config.model)
    checkpointer = Checkpointer(workdir, config.model.to_dict(), save_every=1)
    optimizer = build_optimizer(config)
    abstract = abstract_train_state(model, optimizer, (config.data.image_size, config.data.image_size, 3),
                                    config.data.text_length, mesh, train_state_specs(config, model, optimizer, mesh))
    state, _ = checkpointer.restore(abstract, step)
    checkpointer.close()
    return evaluate_and_report(model, evaluation_params(state), builder, tokenizer, config, workdir, mesh, int(state.step))
