"""OpenCLIP -> jclip conversion: parity with OpenCLIP's own forward pass, clear errors, checkpoints.

The parity tests need the `torch` extra (torch, open_clip_torch) and are
skipped without it. They build full-size OpenCLIP models with random weights
(no download) and take about 10 s each on 2 CPU cores.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from open_clip_support import random_open_clip
from jclip import models
from jclip.convert import from_open_clip, load_state_dict, save_converted

def relative_error(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50", "ViT-B-16-SigLIP"])
def test_converted_model_matches_open_clip(name):
    torch, reference = random_open_clip(name)
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
    assert relative_error(got_image, want_image) < 1e-4
    assert relative_error(got_text, want_text) < 1e-4
    assert float(params["logit_scale"]) == pytest.approx(float(reference.logit_scale.detach()))


def test_state_dict_of_another_architecture_is_refused():
    _, reference = random_open_clip("ViT-B-32")
    state = reference.state_dict()
    with pytest.raises(ValueError, match=r"'visual.conv1.weight' has shape \(768, 3, 32, 32\).*expects \(16, 16, 3, 768\)"):
        from_open_clip(state, "ViT-B-16")
    with pytest.raises(ValueError, match=r"'visual.conv1.weight' has shape \(768, 3, 32, 32\).*not RN50|RN50"):
        from_open_clip(state, "RN50")
    with pytest.raises(ValueError, match=r"no 'logit_bias', which model 'ViT-B-32' needs"):
        from_open_clip(state, "ViT-B-32", init_bias=-10.0)
    with pytest.raises(ValueError, match=r"no place for, the first is 'visual.transformer.resblocks.1.ln_1.weight'"):
        from_open_clip(state, "ViT-B-32", vision={"depth": 1})


def test_module_prefix_and_torch_tensors_are_accepted():
    _, reference = random_open_clip("ViT-B-32")
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    params = from_open_clip(state, "ViT-B-32")
    kernel = params["text_tower"]["encoder"]["block_0"]["attn"]["query"]["kernel"]
    assert kernel.shape == (512, 8, 64) and kernel.dtype == jnp.float32


def test_safetensors_file_round_trip(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state = {"logit_scale": np.array(2.0, np.float32), "visual.proj": np.ones((4, 2), np.float32)}
    safetensors_numpy.save_file(state, str(tmp_path / "weights.safetensors"))
    loaded = load_state_dict(str(tmp_path / "weights.safetensors"))
    assert set(loaded) == set(state) and loaded["visual.proj"].shape == (4, 2)
    with pytest.raises(ValueError, match="unknown weight file type"):
        (tmp_path / "weights.npz").write_bytes(b"")
        load_state_dict(str(tmp_path / "weights.npz"))


def test_converted_checkpoint_is_what_the_evaluator_restores(tiny_config, tmp_path):
    from jclip.evaluate.from_checkpoint import evaluate_checkpoint

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
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        save_converted(params, "test-micro", workdir)
    tiny_config.model = models.model_config("test-micro")
    tiny_config.model.embed_dim = 8
    with pytest.raises(ValueError, match="config.model is not model 'test-micro'"):
        save_converted(params, "test-micro", str(tmp_path / "other"), tiny_config)


def test_command_line_errors_are_one_line(tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "jclip.convert", "--model", "ViT-B-32", "--input", str(tmp_path / "missing.pt"),
         "--output", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert process.returncode != 0
    assert "error: no weight file" in process.stderr and "Traceback" not in process.stderr, process.stderr
