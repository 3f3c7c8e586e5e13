"""OpenCLIP -> jclip conversion: parity with OpenCLIP's own forward pass, clear errors, weight files, checkpoints.

The parity tests need the `torch` extra (torch, open_clip_torch) and are
skipped without it. They build full-size OpenCLIP models with random weights
(no download) and take about 10 s each on 2 CPU cores.
"""

import copy
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from helpers import assert_trees_equal
from open_clip_support import assert_parity, import_open_clip, random_open_clip
from jclip import models
from jclip.convert import from_open_clip, load_state_dict, save_converted


# SigLIP 2's larger shapes (1-5 GB of weights in each framework) are checked on request.
LARGE_SIGLIP2 = ["ViT-B-16-SigLIP2-256", "ViT-L-16-SigLIP2-256", "ViT-SO400M-14-SigLIP2"]


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50", "ViT-B-16-SigLIP", "ViT-B-16-SigLIP2"])
def test_converted_model_matches_open_clip(name):
    check_parity(name)


@pytest.mark.parametrize("name", LARGE_SIGLIP2)
def test_converted_large_siglip2_matches_open_clip(name):
    if os.environ.get("JCLIP_LARGE_PARITY") != "1":
        pytest.skip("several GB each: JCLIP_LARGE_PARITY=1 runs it")
    check_parity(name)


def check_parity(name):
    """jclip's conversion of OpenCLIP's model `name` (random weights) embeds images and token ids as OpenCLIP.
    SigLIP 2's models (256k-token vocabularies) are built afresh rather than kept for other tests: memory."""
    torch, reference = random_open_clip.__wrapped__(name) if "SigLIP2" in name else random_open_clip(name)
    params = from_open_clip(reference.state_dict(), name)
    config = models.model_config(name)
    model = models.CLIP(**config)
    rng = np.random.default_rng(0)
    size, length, vocab = config["vision"]["image_size"], config["text"]["context_length"], config["text"]["vocab_size"]
    images = rng.normal(size=(2, 3, size, size)).astype(np.float32)
    tokens = rng.integers(1, vocab - 1, size=(2, length))
    tokens[0, 9], tokens[0, 10:] = vocab - 1, 0  # an end token and padding, as a tokenizer writes them
    with torch.no_grad():
        want_image = reference.encode_image(torch.from_numpy(images), normalize=True).numpy()
        want_text = reference.encode_text(torch.from_numpy(tokens), normalize=True).numpy()
    variables = {"params": params}
    got_image = model.apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), method=model.encode_image)
    got_text = model.apply(variables, jnp.asarray(tokens, jnp.int32), method=model.encode_text)
    assert_parity(got_image, want_image, f"{name} image embeddings")
    assert_parity(got_text, want_text, f"{name} text embeddings")
    assert float(params["logit_scale"]) == pytest.approx(float(reference.logit_scale.detach()))


@pytest.mark.parametrize("name, overrides, message", [
    ("ViT-B-16", {}, "key 'visual.conv1.weight' has shape (768, 3, 32, 32), which gives (32, 32, 3, 768) for "
                     "image_tower/patch_embed/kernel, but model 'ViT-B-16' expects (16, 16, 3, 768)"),
    ("RN50", {}, "key 'visual.conv1.weight' has shape (768, 3, 32, 32), which gives (32, 32, 3, 768) for "
                 "image_tower/stem_conv1/kernel, but model 'RN50' expects (3, 3, 3, 32)"),
    ("ViT-B-32", {"init_bias": -10.0}, "no 'logit_bias', which model 'ViT-B-32' needs"),
    ("ViT-B-32", {"vision": {"depth": 1}}, "no place for, the first is 'visual.transformer.resblocks.1.ln_1.weight'"),
], ids=["other-patch-size", "other-image-tower", "missing-key", "left-over-key"])
def test_state_dict_of_another_architecture_is_refused(name, overrides, message):
    """ViT-B-32's state dict read as another model fails at the first key that does not fit, shapes named.

    RN50's first key, `visual.conv1.weight`, is also ViT-B-32's: its shape must refuse it there, before any
    key is found missing.
    """
    _, reference = random_open_clip("ViT-B-32")
    with pytest.raises(ValueError, match=re.escape(message)):
        from_open_clip(reference.state_dict(), name, **overrides)


def test_module_prefix_and_torch_tensors_are_accepted():
    _, reference = random_open_clip("ViT-B-32")
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    params = from_open_clip(state, "ViT-B-32")
    kernel = params["text_tower"]["encoder"]["block_0"]["attn"]["query"]["kernel"]
    assert kernel.shape == (512, 8, 64) and kernel.dtype == jnp.float32


def test_safetensors_file_round_trip(tmp_path):
    """Each tensor comes back under its own name with its dtype and values (two share a shape, so a swap shows)."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    state = {"logit_scale": np.array(2.0, np.float32), "visual.proj": rng.normal(size=(4, 2)).astype(np.float32),
             "text_projection": rng.normal(size=(4, 2)).astype(np.float32),
             "visual.class_embedding": rng.normal(size=4).astype(np.float16)}
    safetensors_numpy.save_file(state, str(tmp_path / "weights.safetensors"))
    loaded = load_state_dict(str(tmp_path / "weights.safetensors"))
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    with pytest.raises(ValueError, match="unknown weight file type"):
        (tmp_path / "weights.npz").write_bytes(b"")
        load_state_dict(str(tmp_path / "weights.npz"))


# A one-block OpenAI-layout CLIP, as jclip overrides of ViT-B-32 and as OpenCLIP's `CLIP` arguments.
TINY = dict(embed_dim=16, vision=dict(image_size=32, patch_size=16, width=64, depth=1, num_heads=2),
            text=dict(vocab_size=64, context_length=16, width=32, depth=1, num_heads=2))


@functools.lru_cache(maxsize=None)
def tiny_open_clip():
    """OpenCLIP's `CLIP` of shape TINY with random weights, and its parameters converted in memory."""
    torch, open_clip = import_open_clip()
    torch.manual_seed(0)
    vision, text = TINY["vision"], TINY["text"]
    model = open_clip.CLIP(TINY["embed_dim"], dict(image_size=vision["image_size"], patch_size=vision["patch_size"],
                                                   width=vision["width"], layers=vision["depth"],
                                                   head_width=vision["width"] // vision["num_heads"]),
                           dict(vocab_size=text["vocab_size"], context_length=text["context_length"],
                                width=text["width"], layers=text["depth"], heads=text["num_heads"])).eval()
    return torch, model, from_open_clip(model.state_dict(), "ViT-B-32", **TINY)


def save_openai_archive(torch, model, path):
    """A TorchScript archive as OpenAI released its weights: a traced model, its sizes kept as tensors."""
    model, size, text = copy.deepcopy(model), TINY["vision"]["image_size"], TINY["text"]
    del model.context_length, model.vocab_size
    for key, value in (("input_resolution", size), ("context_length", text["context_length"]),
                       ("vocab_size", text["vocab_size"])):
        model.register_buffer(key, torch.tensor(value))
    example = (torch.zeros(1, 3, size, size), torch.zeros(1, text["context_length"], dtype=torch.long))
    torch.jit.trace(model, example, check_trace=False).save(path)


def save_state_dict(torch, model, path):
    torch.save(model.state_dict(), path)


def save_training_checkpoint(torch, model, path):
    """OpenCLIP's `epoch_N.pt`: the run's state, with the state dict of the DDP-wrapped model under "state_dict"."""
    torch.save({"epoch": 1, "name": "run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               path)


WEIGHT_FILES = {  # file name, and how to write the model's weights there
    "pt": ("weights.pt", save_state_dict),
    "hub-bin": ("open_clip_pytorch_model.bin", save_state_dict),  # as OpenCLIP's push_to_hf_hub writes it
    "training-checkpoint": ("epoch_1.pt", save_training_checkpoint),
    "openai-torchscript": ("ViT-B-32.pt", save_openai_archive),
}


@pytest.mark.parametrize("kind", list(WEIGHT_FILES))
def test_pytorch_weight_files_convert_to_the_same_parameters(kind, tmp_path):
    """`.pt`, `.bin`, OpenCLIP training checkpoints and OpenAI's TorchScript archives are read, and convert to
    exactly the parameters of the model they were written from."""
    torch, model, want = tiny_open_clip()
    name, write = WEIGHT_FILES[kind]
    write(torch, model, str(tmp_path / name))
    got = from_open_clip(load_state_dict(str(tmp_path / name)), "ViT-B-32", **TINY)
    assert_trees_equal(got, want)


def test_converted_checkpoint_is_what_the_evaluator_restores_and_the_trainer_starts_from(tiny_config, tmp_path):
    """A converted checkpoint holds only parameters: the evaluator runs on it with the model it records and exactly
    its parameters, and a training run in its directory starts from them with a fresh optimizer."""
    from jclip import parallel
    from jclip.checkpoint import Checkpointer, load_model
    from jclip.data.tokenizers import load_tokenizer
    from jclip.evaluate.from_checkpoint import evaluate_checkpoint
    from jclip.train.loop import train

    model = models.create("test-micro")
    params = model.init(jax.random.key(3), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 16), jnp.int32))["params"]
    workdir = str(tmp_path / "converted")
    save_converted(params, "test-micro", workdir, source="weights.pt")
    checkpoint = os.path.join(workdir, "checkpoints", "0")
    tiny_config.model = models.model_config("shapes-tiny")  # the model comes from the checkpoint, not the config
    results = evaluate_checkpoint(tiny_config, str(tmp_path / "report"), checkpoint=checkpoint, tasks=["shapes"])
    assert results["step"] == 0 and set(results["tasks"]) == {"shapes"}
    assert set(results["tasks"]["shapes"]["zero_shot"]) == {"shape", "colour"}
    assert os.path.exists(tmp_path / "report" / "results.json")
    tokenizer = load_tokenizer(tiny_config.data.tokenizer, tiny_config.data.data_dir)
    _, restored, record = load_model(tiny_config, workdir, 0, parallel.make_mesh(), tokenizer, verbose=False)
    assert record["parameters_only"] and record["converted_from"] == "weights.pt"
    assert_trees_equal(restored, params)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        save_converted(params, "test-micro", workdir)

    # Training in the converted directory starts from its parameters: at learning rate 0 they stay as they are.
    tiny_config.model = models.model_config("test-micro")
    tiny_config.total_steps, tiny_config.optimizer.learning_rate, tiny_config.optimizer.end_learning_rate = 1, 0.0, 0.0
    state = train(tiny_config, workdir, evaluate_at_end=False)
    assert int(state.step) == 1
    assert_trees_equal(state.params, params)
    checkpointer = Checkpointer(workdir, tiny_config.model.to_dict(), save_every=1)
    assert checkpointer.latest_step() == 1 and not checkpointer.read_record(1).get("parameters_only")
    checkpointer.close()


def test_command_line_errors_are_one_line(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "jclip.convert", "--model", "ViT-B-32", "--input", str(tmp_path / "missing.pt"),
         "--output", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert process.returncode != 0
    assert "error: no weight file" in process.stderr and "Traceback" not in process.stderr, process.stderr
