"""`jclip.load`: a run, one of its checkpoints, a converted checkpoint or OpenCLIP weights, used as a user would."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image, ImageFilter

import jclip
from conftest import REPO, shrunk_demo_config
from jclip import models, parallel
from jclip.checkpoint import load_model
from jclip.convert.to_checkpoint import save_converted
from jclip.data import pipeline, shapes
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.from_checkpoint import evaluation_preprocess
from jclip.train.loop import train
from open_clip_support import import_open_clip, random_open_clip


@pytest.fixture(scope="module")
def trained_run(shapes_data_dir, tmp_path_factory):
    """(config, workdir) of a short run on `shapes/tiny` that evaluated its `shapes` task at the end."""
    config = shrunk_demo_config(shapes_data_dir)
    config.total_steps, config.optimizer.learning_rate = 30, 3e-3
    config.evaluate.tasks = ConfigDict({"shapes": config.evaluate.tasks.shapes.to_dict()})
    workdir = str(tmp_path_factory.mktemp("run"))
    train(config, workdir)
    return config, workdir


def test_the_zero_shot_example_in_a_fresh_process_reproduces_the_runs_evaluation(trained_run):
    config, workdir = trained_run
    result = subprocess.run([sys.executable, "examples/zero_shot.py", workdir], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    with open(os.path.join(workdir, "results.json")) as f:
        reported = json.load(f)["tasks"]["shapes"]["zero_shot"]["shape"]["all"]
    assert abs(printed["suite_accuracy"] - reported) <= 0.001, (printed, reported)
    assert "| prompt-ensembled classifier |" in result.stdout


def test_loaded_embeddings_are_the_checkpoints_whatever_the_image_input(trained_run, tmp_path):
    """`encode_images` / `encode_texts` give what the evaluator's model and preprocessing give (1e-5), from a run
    and from one of its checkpoints, for arrays, PIL images and files alike; images of other sizes are resized."""
    config, workdir = trained_run
    tokenizer = load_tokenizer(config.data.tokenizer, config.data.data_dir)
    model, params, _ = load_model(config, workdir, None, parallel.make_mesh(), tokenizer, verbose=False)
    data = pipeline.load_split(shapes.prepare("tiny", config.data.data_dir), "test[:40]", evaluation_preprocess(config))
    want_images = model.apply({"params": params}, data["image"], method=model.encode_image)
    captions = [str(c) for c in data["caption"][:10]]
    want_texts = model.apply({"params": params}, tokenizer(captions, 16), method=model.encode_text)

    raw = pipeline.load_split(shapes.prepare("tiny", config.data.data_dir), "test[:40]", "decode")["image"]
    loaded = jclip.load(workdir, batch_size=16)  # 40 images: two full batches and a partial one
    assert loaded.name == "test-micro" and loaded.preprocess.spec == evaluation_preprocess(config)
    np.testing.assert_allclose(loaded.encode_images(raw), want_images, atol=1e-5)
    np.testing.assert_allclose(loaded.encode_texts(captions), want_texts, atol=1e-5)
    from_step = jclip.load(os.path.join(workdir, "checkpoints", str(config.total_steps)))
    np.testing.assert_allclose(from_step.encode_images(raw[:3]), want_images[:3], atol=1e-5)

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(raw[i]).save(paths[-1])
    as_files = loaded.encode_images(paths)
    np.testing.assert_array_equal(as_files, loaded.encode_images([Image.open(p) for p in paths]))
    np.testing.assert_array_equal(as_files, loaded.encode_images(list(raw[:3])))
    large = Image.fromarray(raw[0]).resize((128, 96), Image.BICUBIC)  # shorter side resized back to 64, cropped
    assert loaded.encode_images([large]).shape == (1, want_images.shape[1])


def test_images_are_decoded_one_batch_at_a_time(trained_run, monkeypatch):
    _, workdir = trained_run
    loaded = jclip.load(workdir, batch_size=16)
    drawn = []

    def images():
        for i in range(40):
            drawn.append(i)
            yield np.full((64, 64, 3), i, np.uint8)
    encode = loaded._encode_image
    drawn_at_each_batch = []
    monkeypatch.setattr(loaded, "_encode_image", lambda *args: (drawn_at_each_batch.append(len(drawn)), encode(*args))[1])
    assert loaded.encode_images(images()).shape[0] == 40
    assert drawn_at_each_batch == [16, 32, 40]


def test_classify_gives_top_k_names_and_probabilities(trained_run):
    _, workdir = trained_run
    loaded = jclip.load(workdir)
    images = np.stack([np.full((64, 64, 3), value, np.uint8) for value in (0, 128, 255)])
    classifier = loaded.zero_shot_classifier(list(shapes.SHAPES), ["a small red {}", "a large blue {}"])
    assert classifier.weights.shape == (5, loaded.model.embed_dim)
    predictions = loaded.classify(images, classifier, top_k=3)
    assert predictions.indices.shape == predictions.probabilities.shape == (3, 3)
    logits = loaded.scale * loaded.encode_images(images) @ classifier.weights.T
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    np.testing.assert_array_equal(predictions.indices[:, 0], logits.argmax(1))
    np.testing.assert_allclose(predictions.probabilities, np.sort(probabilities, 1)[:, ::-1][:, :3], rtol=1e-5)
    assert predictions.labels[0] == [shapes.SHAPES[i] for i in predictions.indices[0]]


def test_bad_inputs_are_clear_errors(trained_run, tmp_path):
    _, workdir = trained_run
    with pytest.raises(FileNotFoundError, match="no run, checkpoint or weight file"):
        jclip.load(tmp_path / "nothing")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a weight file: name its model"):
        jclip.load(tmp_path / "weights.safetensors")
    loaded = jclip.load(workdir)
    with pytest.raises(ValueError, match="holds a checkpoint of another model than 'ViT-B-32'"):
        jclip.load(workdir, model="ViT-B-32")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png cannot be decoded as an image"):
        loaded.encode_images([str(tmp_path / "broken.png")])
    with pytest.raises(FileNotFoundError, match="no image file"):
        loaded.encode_images([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match=r"must be uint8 \[height, width, 3\]; got float32"):
        loaded.encode_images(np.zeros((1, 64, 64, 3), np.float32))


def test_open_clip_weights_give_open_clip_embeddings_preprocessing_included(tmp_path):
    """`jclip.load(weights, model="ViT-B-32")` on PIL images of several sizes and on strings gives OpenCLIP's
    `preprocess` + `encode_image` and `tokenizer` + `encode_text` (1e-4); so does the checkpoint
    `python -m jclip.convert` writes from the same file."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    torch, reference = random_open_clip("ViT-B-32")
    _, open_clip = import_open_clip()
    weights = str(tmp_path / "open_clip_model.safetensors")
    safetensors_numpy.save_file({k: v.numpy() for k, v in reference.state_dict().items()}, weights)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
              for height, width in ((300, 451), (224, 224), (227, 120))]
    texts = ["a photo of a cat", "a diagram", "two dogs playing in the snow"]
    transform = open_clip.image_transform(224, is_train=False)
    with torch.no_grad():
        want_images = reference.encode_image(torch.stack([transform(i) for i in images]), normalize=True).numpy()
        want_texts = reference.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts), normalize=True).numpy()

    loaded = jclip.load(weights, model="ViT-B-32")
    np.testing.assert_allclose(loaded.encode_images(images), want_images, atol=1e-4)
    np.testing.assert_allclose(loaded.encode_texts(texts), want_texts, atol=1e-4)

    save_converted(loaded.params, "ViT-B-32", str(tmp_path / "converted"), source=weights)
    converted = jclip.load(tmp_path / "converted")
    assert converted.name == "ViT-B-32" and converted.preprocess.spec == loaded.preprocess.spec
    np.testing.assert_allclose(converted.encode_images(images[:1]), want_images[:1], atol=1e-4)
    assert models.config_differences(converted.config.model.to_dict(), models.model_config("ViT-B-32")) == []
