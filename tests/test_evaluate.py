"""Evaluation tasks: hand-computed metrics, results independent of the device and process count,
padding that never counts, the command line, and agreement with OpenCLIP's zero-shot classifier."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import REPO, load_config
from evaluation_tasks import TASKS, micro_evaluator
from helpers import run_workers
import xla_flags
from open_clip_support import import_open_clip, random_open_clip
from jclip import models, parallel
from jclip.convert import from_open_clip
from jclip.data import preprocess, prompts
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.embed import embed_all
from jclip.evaluate.from_checkpoint import evaluate_checkpoint
from jclip.evaluate.retrieval import recall_at_k
from jclip.evaluate.tasks import Evaluator, run_tasks, select_tasks
from jclip.evaluate.zero_shot import classify_by_prompts


def test_recall_at_k_by_hand():
    similarity = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1], [0.0, 0.8, 0.7]])
    relevant = np.array([[True, False, False], [True, False, True], [False, False, False]])
    # Row 0: relevant item ranked 1st. Row 1: order 1, 0, 2 -> first relevant at rank 2. Row 2: none relevant.
    assert recall_at_k(similarity, relevant, ks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3}


def test_classify_by_prompts_sums_probability_per_class():
    images = np.array([[1.0, 0.0]])
    prompts_ = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [0.6, 0.8]])
    # The single best prompt is class 0, but class 1 holds three prompts nearly as close: more mass.
    assert classify_by_prompts(images, prompts_, np.array([0, 1, 1, 1]), 2, scale=1.0)[0] == 1
    assert classify_by_prompts(images, prompts_, np.array([0, 1, 1, 1]), 2, scale=100.0)[0] == 0


@pytest.mark.parametrize("devices", [1, 8])
def test_padding_rows_are_dropped_in_order(devices):
    rows = np.arange(1, 14, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)  # 13 rows, none all-zero
    embedded = embed_all(lambda params, x: x * params, np.float32(2.0), rows, 8, parallel.make_mesh(devices))
    np.testing.assert_array_equal(embedded, 2 * rows)  # 3 padding rows of the second batch are gone


@pytest.fixture(scope="module")
def single_process_results(shapes_data_dir):
    """Every task kind on 8 devices (one process), batches of 48 over 256 test images: padded."""
    results = run_tasks(micro_evaluator(shapes_data_dir, parallel.make_mesh(8)), TASKS)
    return {name: result.metrics for name, result in results.items()}


def test_every_task_kind_reports_its_metrics(single_process_results):
    results = single_process_results
    assert 0 < results["zero_shot"]["num_examples"] == results["shapes"]["num_single_object_images"]["all"] < 256
    assert results["zero_shot"]["num_classes"] == 7
    assert results["zero_shot"]["top1"] <= results["zero_shot"]["top5"]
    assert results["retrieval"]["num_images"] == 256 and results["retrieval"]["num_captions"] == 256
    recalls = results["retrieval"]["image_to_text"]
    assert 0 <= recalls["R@1"] <= recalls["R@5"] <= recalls["R@10"] <= 1
    assert results["compositionality"]["swap_words"]["count"] > 0
    assert set(results["linear_probe"]) >= {"1-shot", "5-shot", "full"}
    assert results["shapes"]["num_images"] == 256


def test_results_do_not_depend_on_the_device_count(shapes_data_dir, single_process_results):
    one_device = run_tasks(micro_evaluator(shapes_data_dir, parallel.make_mesh(1)), TASKS)
    assert {name: result.metrics for name, result in one_device.items()} == single_process_results


def test_two_processes_give_the_single_process_results(tmp_path, shapes_data_dir, single_process_results):
    """2 processes x 2 devices, each reading its own half of every dataset, against 1 process x 8 devices."""
    output = tmp_path / "results.json"
    run_workers("evaluation_worker.py", 2, shapes_data_dir, output)
    with open(output) as f:
        assert json.load(f) == json.loads(json.dumps(single_process_results))


def test_retrieval_with_several_captions_per_image(shapes_data_dir):
    """Recall@K as NumPy computes it from the same embeddings: every caption of an image is a hit for it, and
    the padding of the batches to 3 captions per image counts neither as a caption nor as a hit."""
    pictures = [tf.io.encode_png(tf.fill([64, 64, 3], tf.constant(20 * i, tf.uint8))).numpy() for i in range(12)]
    captions = [[f"a red circle number {i}"] * (1 + i % 3) for i in range(12)]

    def coco_like(*args, **kwargs):
        def generate():
            for picture, texts in zip(pictures, captions):
                yield {"image": picture, "captions": {"text": texts}}
        signature = {"image": tf.TensorSpec([], tf.string), "captions": {"text": tf.TensorSpec([None], tf.string)}}
        return tf.data.Dataset.from_generator(generate, output_signature=signature).apply(
            tf.data.experimental.assert_cardinality(12))

    task = dict(kind="retrieval", source=dict(kind="tfds", name="coco_captions", split="test",
                                               caption_key="captions/text"))
    evaluator = micro_evaluator(shapes_data_dir, parallel.make_mesh(8), batch_size=8)  # not under the mock
    with tfds.testing.mock_data(num_examples=12, as_dataset_fn=coco_like):
        metrics = run_tasks(evaluator, {"coco": task})["coco"].metrics
    owner = np.repeat(np.arange(12), [len(c) for c in captions])
    assert metrics["num_images"] == 12 and metrics["num_captions"] == len(owner) == 24

    decode = preprocess.parse(evaluator.preprocess)
    images = evaluator.embed_array(np.stack([decode(p, tf.constant([0, 0], tf.int64)) for p in pictures]))
    similarity = images @ evaluator.embed_texts([c for per_image in captions for c in per_image]).T
    own = similarity[owner, np.arange(len(owner))]  # each caption with its image
    best_own = np.array([own[owner == i].max() for i in range(12)])
    ranks = {"image_to_text": np.sum(similarity > best_own[:, None], axis=1),  # other images' captions above
             "text_to_image": np.sum(similarity > own, axis=0)}  # other images above the caption's own
    for direction, rank in ranks.items():
        assert metrics[direction] == {f"R@{k}": np.mean(rank < k) for k in (1, 5, 10)}, direction


def test_bad_task_options_are_named(shapes_data_dir):
    evaluator = micro_evaluator(shapes_data_dir, parallel.make_mesh(8))
    with pytest.raises(ValueError, match="no evaluation task.*'nope'"):
        run_tasks(evaluator, TASKS, ["nope"])
    with pytest.raises(ValueError, match="bad options for evaluation task 'x' \\(kind 'zero_shot'\\)"):
        run_tasks(evaluator, {"x": dict(kind="zero_shot", dataset="shapes/tiny", label="shape")})
    with pytest.raises(ValueError, match="kind='classify'"):
        run_tasks(evaluator, {"x": dict(kind="classify")})
    with pytest.raises(ValueError, match="unknown template set 'fancy'"):
        run_tasks(evaluator, {"x": dict(kind="zero_shot", dataset="shapes/tiny", label_key="shape", templates="fancy")})


def test_the_open_clip_evaluation_config_names_valid_tasks():
    config = load_config("open_clip_evaluation")
    assert set(select_tasks(config.evaluate.tasks)) >= {"imagenet", "cifar10", "coco", "cifar10_probe"}


def test_evaluate_command_runs_selected_tasks_of_a_checkpoint(tiny_config, tmp_path):
    from jclip.train.loop import train

    tiny_config.total_steps = 2
    run = str(tmp_path / "run")
    train(tiny_config, run, evaluate_at_end=False)
    data_dir = tiny_config.data.data_dir
    command = [sys.executable, "-m", "jclip.evaluate", "--config", "configs/shapes_tiny.py",
               "--config.evaluate.shapes_config=tiny", "--config.data.tokenizer=shapes/tiny",
               f"--config.data.data_dir={data_dir}", "--config.evaluate.batch_size=64"]
    env = {**os.environ, "XLA_FLAGS": xla_flags.with_devices(2)}
    done = subprocess.run(command + ["--checkpoint", os.path.join(run, "checkpoints", "2"), "--tasks",
                                     "compositionality"], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(run, "results.json")) as f:
        results = json.load(f)
    assert results["step"] == 2 and set(results["tasks"]) == {"compositionality"}
    assert os.path.exists(os.path.join(run, "plots", "compositionality.png"))
    with pytest.raises(ValueError, match=r"no evaluation task\(s\) \['nope'\]"):
        evaluate_checkpoint(tiny_config, run, tasks=["shapes", "nope"])


def test_class_names_and_templates_are_open_clips():
    _, open_clip = import_open_clip()
    from open_clip import zero_shot_metadata

    assert prompts.imagenet_class_names() == tuple(zero_shot_metadata.IMAGENET_CLASSNAMES)
    for name, theirs in (("openai_imagenet", zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES),
                         ("simple", zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES)):
        assert prompts.templates(name) == tuple(template("{}") for template in theirs)


class MockClassification(tfds.core.GeneratorBasedBuilder):
    """Sixteen random 224 px images of five classes: a stand-in for a real zero-shot benchmark."""

    VERSION = tfds.core.Version("1.0.0")
    CLASSES = ("cat", "dog", "airplane", "truck", "ship")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(224, 224, 3)), "label": tfds.features.ClassLabel(names=self.CLASSES)}))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for index in range(16):
            yield index, {"image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), "label": index % 5}


def test_converted_open_clip_makes_open_clips_zero_shot_predictions(tmp_path):
    """A random-weight OpenCLIP ViT-B-32, converted: jclip's zero-shot task on a mock dataset predicts
    what OpenCLIP's own classifier (`build_zero_shot_classifier`) does with the same templates."""
    torch, reference = random_open_clip("ViT-B-32")
    _, open_clip = import_open_clip()
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    builder = MockClassification(data_dir=str(tmp_path))
    builder.download_and_prepare()
    templates = prompts.templates("simple")
    with torch.no_grad():
        classifier = build_zero_shot_classifier(
            reference, open_clip.get_tokenizer("ViT-B-32"), MockClassification.CLASSES,
            [lambda name, t=t: t.format(name) for t in templates], device="cpu", use_tqdm=False)
        examples = list(tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False)))
        mean, std = np.array(open_clip.OPENAI_DATASET_MEAN), np.array(open_clip.OPENAI_DATASET_STD)
        pixels = np.stack([(e["image"] / 255.0 - mean) / std for e in examples]).astype(np.float32)
        want = (reference.encode_image(torch.from_numpy(pixels.transpose(0, 3, 1, 2)), normalize=True)
                @ classifier).numpy()

    model = models.create("ViT-B-32")
    evaluator = Evaluator(model, from_open_clip(reference.state_dict(), "ViT-B-32"), load_tokenizer("clip"),
                          parallel.make_mesh(8), batch_size=8, image_size=224, text_length=77,
                          preprocess="decode|clip_normalize")
    task = dict(kind="zero_shot", dataset=builder.data_dir, templates="simple")
    result = run_tasks(evaluator, {"mock": task})["mock"]
    np.testing.assert_allclose(result.outputs["scores"], want, atol=2e-4)
    np.testing.assert_array_equal(result.outputs["predictions"], want.argmax(axis=1))
    assert result.metrics["top1"] == np.mean(want.argmax(axis=1) == np.array([e["label"] for e in examples]))
