"""Evaluation metrics on hand-computed cases, and results that do not depend on the device count."""

import jax
import numpy as np

from jclip import models, parallel
from jclip.data import shapes
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.retrieval import recall_at_k
from jclip.evaluate.shapes_benchmark import evaluate_shapes
from jclip.evaluate.zero_shot import classify_by_prompts


def test_recall_at_k_by_hand():
    similarity = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.0, 0.8, 0.7]])
    relevant = np.array([[True, False, False], [True, False, True], [False, False, False]])
    # Row 0: relevant item ranked 1st. Row 1: order 1, 0, 2 -> first relevant at rank 2. Row 2: none relevant.
    assert recall_at_k(similarity, relevant, ks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3}


def test_classify_by_prompts_sums_probability_per_class():
    images = np.array([[1.0, 0.0]])
    prompts = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [0.6, 0.8]])
    # The single best prompt is class 0, but class 1 holds three prompts nearly as close: more mass.
    assert classify_by_prompts(images, prompts, np.array([0, 1, 1, 1]), 2, scale=1.0)[0] == 1
    assert classify_by_prompts(images, prompts, np.array([0, 1, 1, 1]), 2, scale=100.0)[0] == 0


def test_results_do_not_depend_on_the_device_count(tiny_config):
    model = models.CLIP(**tiny_config.model)
    params = model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), np.zeros((1, 16), np.int32))["params"]
    builder = shapes.prepare("tiny", tiny_config.data.data_dir)
    tokenizer = load_tokenizer("shapes/tiny", tiny_config.data.data_dir)
    tiny_config.evaluate.batch_size = 48  # 256 test images: the last batch is padded
    results = [evaluate_shapes(model, params, builder, tokenizer, tiny_config, parallel.make_mesh(n)) for n in (1, 8)]
    assert results[0] == results[1]
    assert results[0]["num_images"] == 256
