"""One evaluation task of every kind on the `shapes/tiny` data, and a micro model to run them with."""

import jax
import numpy as np

from jclip import models
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.tasks import Evaluator

TEST_IMAGES = dict(kind="shapes", config="tiny", split="test")
TASKS = {
    "shapes": dict(kind="shapes", config="tiny"),
    "zero_shot": dict(kind="zero_shot", dataset="shapes/tiny", label_key="colour",
                      templates=("a {} shape.", "something {}."), where={"num_objects": 1}),
    "retrieval": dict(kind="retrieval", source=TEST_IMAGES),
    "compositionality": dict(kind="compositionality", source=TEST_IMAGES, attributes="shapes"),
    "linear_probe": dict(kind="linear_probe", dataset="shapes/tiny", label_key="shape", train_split="train[:25%]",
                         shots=(1, 5)),
}


def micro_evaluator(data_dir: str, mesh, batch_size: int = 48) -> Evaluator:
    """The `test-micro` model, randomly initialised with seed 0; 48 does not divide the 256 test images."""
    model = models.create("test-micro")
    params = model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), np.zeros((1, 16), np.int32))["params"]
    return Evaluator(model, params, load_tokenizer("shapes/tiny", data_dir), mesh, batch_size, 64, 16,
                     "decode|value_range(-1, 1)", data_dir)
