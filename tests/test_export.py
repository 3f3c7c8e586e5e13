"""jclip -> OpenCLIP: `to_open_clip` inverts `from_open_clip` exactly, and `python -m jclip.export` writes a directory
that `open_clip.create_model_and_transforms("local-dir:DIR")` builds the model and its transform from, offline.

The OpenCLIP comparisons need the `torch` extra and are skipped without it; the configuration checks need only
open_clip's model configs (they skip without it too). Full-size models have random weights (no download).
"""

import gc
import importlib.util
import json
import os
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageFilter

import jclip
from conftest import REPO, shrunk_demo_config
from jclip import models
from jclip.checkpoint import save_parameters_only
from jclip.convert import from_open_clip, save_converted
from jclip.convert.hf_clip import hf_clip_config
from jclip.convert.open_clip import data_settings
from jclip.convert.open_clip_export import (HUB_TOKENIZERS, NotExpressible, open_clip_model_config,
                                        open_clip_preprocess_config, to_open_clip)
from jclip.data.tokenizers import load_tokenizer
from jclip.export import CONFIG_NAME, WEIGHTS_NAME, export
from jclip.export.__main__ import main, run
from open_clip_support import import_open_clip, random_open_clip

# The pretrained tags whose preprocessing OpenCLIP gives the weights jclip converts (`data_settings`).
PRETRAINED_TAGS = {"ViT-B-32": "openai", "RN50": "openai", "ViT-B-16-SigLIP": "webli"}


def open_clip_json(name: str) -> dict:
    """open_clip's `model_configs/NAME.json`, read without importing open_clip (skip where it is not installed)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("the torch extra is not installed (no open_clip)")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "model_configs" / f"{name}.json"
    return json.loads(path.read_text())


def assert_state_dicts_equal(got: dict, want: dict):
    """The same keys, and each tensor the same shape, dtype and values."""
    want = {key: np.asarray(value) for key, value in want.items()}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def open_clip_inputs(config: dict, count: int = 2):
    """Images [N, 3, S, S] and token ids [N, L] (an end token, then padding, in the first row; the others full
    length) for model `config`."""
    rng = np.random.default_rng(0)
    size, length, vocab = config["vision"]["image_size"], config["text"]["context_length"], config["text"]["vocab_size"]
    tokens = rng.integers(1, vocab - 1, size=(count, length))
    tokens[0, 9], tokens[0, 10:] = vocab - 1, 0
    return rng.normal(size=(count, 3, size, size)).astype(np.float32), tokens


def photo(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-32-quickgelu", "ViT-S-32", "ViT-B-16", "ViT-L-14", "RN50",
                                  "RN101", "ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "ViT-B-16-SigLIP2-256",
                                  "ViT-L-16-SigLIP2-256", "ViT-SO400M-14-SigLIP2", "coca_ViT-B-32"])
def test_model_configs_are_open_clips(name):
    """The configuration written for each OpenCLIP model jclip knows is open_clip's own `model_configs/NAME.json`."""
    assert open_clip_model_config(name, tokenizer=HUB_TOKENIZERS.get(name)) == open_clip_json(name)


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50", "ViT-B-16-SigLIP"])
def test_exported_weights_build_open_clips_model_and_transform(name, tmp_path):
    """OpenCLIP weights -> jclip -> a converted checkpoint -> export -> OpenCLIP: the same state dict (exactly),
    embeddings and evaluation transform as the model the weights came from."""
    torch, reference = random_open_clip(name)
    _, open_clip = import_open_clip()
    state = {key: value.numpy() for key, value in reference.state_dict().items()}
    params = from_open_clip(state, name)
    # Exact both ways: from_open_clip(to_open_clip(params)) is then from_open_clip(state), i.e. params.
    assert_state_dicts_equal(to_open_clip(params, name), state)

    save_converted(params, name, str(tmp_path / "converted"), source="random")
    del params
    directory = str(tmp_path / "export")
    exported = export(str(tmp_path / "converted"), directory)
    assert exported.files == [CONFIG_NAME, WEIGHTS_NAME] and exported.notes == []
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    model.eval()
    assert_state_dicts_equal({key: value.numpy() for key, value in model.state_dict().items()}, state)
    images, tokens = open_clip_inputs(models.model_config(name), count=1)  # one image: full-size models are slow
    with torch.no_grad():
        for encode, inputs in (("encode_image", torch.from_numpy(images)), ("encode_text", torch.from_numpy(tokens))):
            got = getattr(model, encode)(inputs, normalize=True).numpy()
            want = getattr(reference, encode)(inputs, normalize=True).numpy()
            assert float(np.abs(got - want).max()) < 1e-5, f"{name} {encode}"

    tag = open_clip.get_pretrained_cfg(name, PRETRAINED_TAGS[name])
    size = models.model_config(name)["vision"]["image_size"]
    transforms = open_clip.transform
    want_transform = transforms.image_transform_v2(transforms.PreprocessCfg(**transforms.merge_preprocess_dict(
        transforms.PreprocessCfg(size=size), tag)), is_train=False)
    same_brackets = str.maketrans("[]", "()")  # the mean and std come back from JSON as lists
    assert repr(transform).translate(same_brackets) == repr(want_transform).translate(same_brackets)
    for image in (photo(301, 451), photo(227, 120)):
        assert torch.equal(transform(image), want_transform(image))
    del model, state
    gc.collect()


MICRO_COCA = dict(vision={"width": 64, "norm_eps": 1e-5}, decoder={"norm_eps": 1e-5})


def random_params(module, images, tokens) -> dict:
    """Parameters of `module` drawn at random (no compiled `init`, which takes a CoCa 10 s on 2 CPU cores):
    normal(0, 0.1), LayerNorm scales around 1."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *images.shape[2:], 3)),
                            jnp.asarray(tokens[:1], jnp.int32))["params"]
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray((path[-1].key == "scale") + 0.1 * rng.normal(size=s.shape), jnp.float32), shapes)


def micro_coca_config() -> dict:
    """The smallest CoCa with the LayerNorms OpenCLIP builds (its image pooler's and decoder's epsilon is always
    1e-5; the text tower keeps 1e-6) and an image tower wider than the embedding, as OpenCLIP's CoCa models (its
    pooler has separate q/k/v projections then)."""
    return models.model_config("coca-test-micro", **MICRO_COCA)


def test_coca_round_trip_and_open_clip_embeddings():
    """CoCa's layout: OpenCLIP's CoCa of the written configuration takes the exported state dict (strictly) and
    gives jclip's embeddings; its own state dict comes back exactly through jclip."""
    torch, open_clip = import_open_clip()
    config = micro_coca_config()
    model_cfg = open_clip_model_config(config)
    assert model_cfg.pop("custom_text") and "multimodal_cfg" in model_cfg
    module = models.model_class(config)(**config)
    images, tokens = open_clip_inputs(config)
    params = random_params(module, images, tokens)
    torch.manual_seed(0)
    reference = open_clip.CoCa(**model_cfg).eval()
    state = {key: value.numpy().copy() for key, value in reference.state_dict().items()}
    assert_state_dicts_equal(to_open_clip(from_open_clip(state, "coca-test-micro", **MICRO_COCA), config), state)

    reference.load_state_dict({key: torch.from_numpy(value) for key, value in to_open_clip(params, config).items()},
                              strict=True)
    with torch.no_grad():
        want_image = reference.encode_image(torch.from_numpy(images)).numpy()
        want_text = reference.encode_text(torch.from_numpy(tokens)).numpy()
    got_image, got_text = jax.jit(lambda p, x, t: (module.apply({"params": p}, x, method=module.encode_image),
                                                    module.apply({"params": p}, t, method=module.encode_text)))(
        params, jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(tokens, jnp.int32))
    assert float(np.abs(got_image - want_image).max()) < 1e-5
    assert float(np.abs(got_text - want_text).max()) < 1e-5


# A ViT that OpenCLIP can express, small enough to train two steps in seconds: text pooled at the end token
# (OpenCLIP's 'eos' pool with the shapes tokenizer's end id), the text tower's LayerNorm at 1e-6 (norm_kwargs).
TRAINED = dict(embed_dim=16, vision=dict(width=64, depth=1, num_heads=2, image_size=64, patch_size=32),
               text=dict(width=32, depth=1, num_heads=2, context_length=16, pool="eos", norm_eps=1e-6))


@pytest.fixture(scope="module")
def trained_vit(shapes_data_dir, tmp_path_factory):
    """The workdir of a ViT trained two steps on `shapes/tiny`, keeping an EMA of its parameters."""
    from jclip.train.loop import train

    config = shrunk_demo_config(shapes_data_dir)
    vocab_size = load_tokenizer(config.data.tokenizer, shapes_data_dir).vocab_size
    config.model_name = "ViT-B-32"
    config.model = models.model_config("ViT-B-32", **{**TRAINED, "text": {**TRAINED["text"], "vocab_size": vocab_size}})
    config.total_steps, config.checkpoint_every, config.ema_decay = 2, 2, 0.5
    workdir = str(tmp_path_factory.mktemp("trained_vit"))
    train(config, workdir, evaluate_at_end=False)
    return workdir


def test_trained_model_gives_jclips_embeddings_in_open_clip(trained_vit, tmp_path, capsys):
    """`python -m jclip.export` of a run: OpenCLIP's model and transform embed PIL images as `jclip.load(run)` does,
    and the run's token ids as jclip does (to 1e-5, float32 rounding); the weights are the EMA parameters; the tokenizer (not OpenAI's BPE)
    is said to be so and copied beside the weights."""
    torch, open_clip = import_open_clip()
    directory = str(tmp_path / "export")
    assert main(["--checkpoint", trained_vit, "--output", directory]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"Wrote the ViT-B-32 model of step 2 to {directory}: open_clip_config.json, "
                        "open_clip_model.safetensors, jclip_tokenizer.json.")
    assert lines[1].startswith("note: the model's tokenizer is jclip's 'shapes/tiny', not OpenAI's BPE") and \
        lines[1].endswith(f"({os.path.join(directory, 'jclip_tokenizer.json')})")
    written = json.loads(pathlib.Path(directory, CONFIG_NAME).read_text())
    assert written["jclip"]["ema"] and written["jclip"]["step"] == 2 and "tokenizer is jclip's" in \
        written["jclip"]["notes"][0]
    assert written["preprocess_cfg"] == {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                                         "resize_mode": "shortest"}

    loaded = jclip.load(trained_vit)
    from safetensors.numpy import load_file

    assert_state_dicts_equal(load_file(os.path.join(directory, WEIGHTS_NAME)), to_open_clip(loaded.params,
                                                                                             loaded.config.model))
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    model.eval()
    images = [photo(64, 64, 1), photo(80, 64, 2), photo(64, 97, 3)]  # shorter side 64: centre crops, no resampling
    texts = ["a red circle", "a small blue square left of a green triangle", ""]
    tokens = load_tokenizer(os.path.join(directory, "jclip_tokenizer.json"))(texts, 16)
    np.testing.assert_array_equal(tokens, loaded.tokenizer(texts, 16))
    with torch.no_grad():
        got_images = model.encode_image(torch.stack([transform(image) for image in images]), normalize=True).numpy()
        got_texts = model.encode_text(torch.from_numpy(tokens.astype(np.int64)), normalize=True).numpy()
    image_error = float(np.abs(got_images - loaded.encode_images(images)).max())
    text_error = float(np.abs(got_texts - loaded.encode_texts(texts)).max())
    assert image_error < 1e-5 and text_error < 1e-5, (image_error, text_error)  # measured: 3e-7 and 3e-7


def parameters_only(tmp_path, model_config: dict, preprocess: str, image_size: int = 32, params=None) -> str:
    """A parameters-only checkpoint of `model_config` (`params`, or zeros) whose record says the model takes
    `preprocess` and OpenAI's BPE."""
    module = models.model_class(model_config)(**model_config)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                            jnp.zeros((1, model_config["text"]["context_length"]), jnp.int32))["params"]
    data = {"image_size": image_size, "text_length": model_config["text"]["context_length"], "tokenizer": "clip",
            "preprocess": preprocess}
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes) if params is None else params
    return save_parameters_only(params, model_config, str(tmp_path / "checkpoint"),
                                {"model_name": "test-micro", "data": data})


def run_main(capsys, *argv) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


CLIP_SPEC = data_settings("ViT-B-32")["preprocess"].replace("224", "32")


@pytest.mark.parametrize("overrides, spec, message", [
    ({"vision": {"stem": "conv", "image_size": 32}}, CLIP_SPEC, "OpenCLIP cannot express vision.stem='conv': its ViTs "
                                                                "embed patches with one convolution"),
    ({}, CLIP_SPEC, "OpenCLIP cannot express a model without vision.image_size"),
    ({"vision": {"image_size": 32}}, "decode|resize_small(32)|center_crop(32)",
     "OpenCLIP cannot express the preprocessing 'decode|resize_small(32)|center_crop(32)': it ends in one "
     "normalisation"),
], ids=["conv-stem", "no-image-size", "no-normalisation"])
def test_what_open_clip_cannot_express_is_one_line(overrides, spec, message, tmp_path, capsys):
    checkpoint = parameters_only(tmp_path, models.model_config("test-micro", **overrides), spec)
    status, out, err = run_main(capsys, "--checkpoint", checkpoint, "--output", str(tmp_path / "export"))
    assert status != 0 and out == "" and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "export")


def test_bad_paths_are_one_line(tmp_path, capsys):
    """A missing checkpoint, and an output directory that holds an export already, each stop with one line."""
    status, _, err = run_main(capsys, "--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "out"))
    assert status != 0 and err.startswith(f"error: no checkpoint at {tmp_path / 'missing'}") and err.count("\n") == 1

    checkpoint = parameters_only(tmp_path, models.model_config("test-micro", vision={"image_size": 32},
                                                               text={"vocab_size": 49408}), CLIP_SPEC)
    assert run_main(capsys, "--checkpoint", checkpoint, "--output", str(tmp_path / "out"))[0] == 0
    status, _, err = run_main(capsys, "--checkpoint", checkpoint, "--output", str(tmp_path / "out"))
    assert status != 0 and err == (f"error: {tmp_path / 'out'} already holds an export (open_clip_config.json); "
                                   "choose a new --output\n")
    status, _, err = run_main(capsys, "--checkpoint", checkpoint)
    assert status != 0 and err == "error: the following arguments are required: --output (see --help)\n"


def test_the_console_script_exits_with_mains_status(tmp_path, monkeypatch, capsys):
    """`jclip-export` (and `python -m jclip.export`) run `main` on the command line and exit with its status."""
    monkeypatch.setattr(sys, "argv", ["jclip-export", "--checkpoint", str(tmp_path / "missing"), "--output",
                                      str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        run()
    assert stop.value.code == 1 and capsys.readouterr().err.startswith("error: no checkpoint at")
    setup = (REPO / "setup.cfg").read_text()
    assert "jclip-export = jclip.export.__main__:run" in setup and "    safetensors>=" in setup.split("[options.extras")[0]


@pytest.mark.parametrize("overrides, message", [
    ({"vision": {"pool": "gap"}}, "vision.pool='gap': its ViTs pool at a class token"),
    ({"vision": {"patch_bias": True}}, "vision.patch_bias=True with pool='cls'"),
    ({"vision": {"projection": False}}, "vision.projection=False with pool='cls'"),
    ({"vision": {"activation": "quick_gelu"}}, "vision.activation='quick_gelu', text.activation='gelu'"),
    ({"text": {"pool": "eos"}}, "text.pool='eos' without the tokenizer's end-of-text id"),
    ({"vision": {"pool": "map"}}, "vision.patch_bias=False with pool='map'"),
    ({"vision": {"num_registers": 4}}, "vision.num_registers=4: its transformers have no such option"),
    ({"text": {"position": "rope"}}, "text.position='rope': its transformers have no such option"),
    ({"text": {"norm": "rms", "mlp": "gated"}}, "text.norm='rms'"),
], ids=["gap", "patch-bias", "no-projection", "mixed-activations", "eos-without-id", "map-openai-layout",
        "registers", "rope", "rms"])
def test_inexpressible_models_name_the_feature(overrides, message):
    with pytest.raises(NotExpressible, match=re.escape(f"OpenCLIP cannot express {message}")):
        open_clip_model_config("ViT-B-32", **overrides)
    if "num_registers" in overrides.get("vision", {}):
        with pytest.raises(NotExpressible, match=re.escape("CLIPModel cannot express vision.num_registers=4")):
            hf_clip_config("ViT-B-32", **overrides)


def test_inexpressible_siglip_and_coca_shapes_name_the_feature():
    with pytest.raises(NotExpressible, match=r"a MAP-pooled ViT with patch_size=16, width=768, depth=12, num_heads=12, "
                                             r"mlp_ratio=4.0 at image_size=320: OpenCLIP builds such towers from timm"):
        open_clip_model_config("ViT-B-16-SigLIP", vision={"image_size": 320})
    assert open_clip_model_config("ViT-B-16-SigLIP", vision={"image_size": 384})["vision_cfg"]["timm_model_name"] == \
        "vit_base_patch16_siglip_384"
    with pytest.raises(NotExpressible, match=re.escape("decoder.norm_eps=1e-06: its CoCa decoder has norm_eps=1e-05")):
        open_clip_model_config("coca-test-micro", vision=MICRO_COCA["vision"])
    with pytest.raises(NotExpressible, match=re.escape("vision.norm_eps=1e-06 in a CoCa: the LayerNorms of its")):
        open_clip_model_config("coca-test-micro", vision={"width": 64}, decoder=MICRO_COCA["decoder"])
    with pytest.raises(NotExpressible, match=re.escape("a CoCa with vision.width == embed_dim (32): its image pooler")):
        open_clip_model_config("coca-test-micro", vision={"norm_eps": 1e-5}, decoder=MICRO_COCA["decoder"])
    with pytest.raises(NotExpressible, match=re.escape("vision.num_heads=24 with width=64")):
        open_clip_model_config("RN50", vision={"num_heads": 24})
    assert open_clip_model_config("RN50", vision={"num_heads": 16})["vision_cfg"]["head_width"] == 128


@pytest.mark.parametrize("spec, expected", [
    ("decode|resize_small(224, 'bicubic')|center_crop(224)|clip_normalize",
     dict(resize_mode="shortest", interpolation="bicubic", mean=[0.48145466, 0.4578275, 0.40821073],
          std=[0.26862954, 0.26130258, 0.27577711])),
    ("decode|resize(224, 'bicubic')|value_range(-1, 1)",
     dict(resize_mode="squash", interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3)),
    ("decode|resize(224, 224)|value_range(0, 1)",
     dict(resize_mode="squash", interpolation="bilinear", mean=[0.0] * 3, std=[1.0] * 3)),
    ("decode|resize_small(256)|center_crop(224)|clip_normalize", "its centre crop is the square"),
    ("decode|resize(192)|clip_normalize", "a model made for 224 px images"),
    ("decode|inception_crop(224)|clip_normalize", "resizes the shorter side and centre-crops"),
    ("decode|resize(224)|flip_lr|clip_normalize", "resizes the shorter side and centre-crops"),
])
def test_preprocessing_is_open_clips_preprocess_cfg(spec, expected):
    if isinstance(expected, str):
        with pytest.raises(NotExpressible, match=re.escape(expected)):
            open_clip_preprocess_config(spec, 224)
    else:
        assert open_clip_preprocess_config(spec, 224) == {"size": 224, **expected}


def test_hugging_face_clip_model_gives_jclips_embeddings(tmp_path):
    """`--hf`: transformers' CLIPModel, CLIPTokenizer and CLIPImageProcessor from the export directory embed texts and
    images as `jclip.load` does (1e-5; images whose shorter side is the model's size). Skipped without transformers
    (not in any extra of the test suite; `pip install transformers` to run it)."""
    import_open_clip()  # torchvision importable, as transformers needs
    transformers = pytest.importorskip("transformers")
    config = models.model_config("ViT-B-32", embed_dim=16, vision=dict(width=64, depth=1, num_heads=2, image_size=32,
                                                                       patch_size=16, activation="quick_gelu"),
                                 text=dict(width=32, depth=1, num_heads=2, context_length=16, pool="eos",
                                           norm_eps=1e-6, activation="quick_gelu"))
    module = models.model_class(config)(**config)
    images, tokens = open_clip_inputs(config)
    checkpoint = parameters_only(tmp_path, config, CLIP_SPEC, params=random_params(module, images, tokens))
    directory = str(tmp_path / "export")
    exported = export(checkpoint, directory, hf=True)
    assert exported.files[:5] == [CONFIG_NAME, WEIGHTS_NAME, "model.safetensors", "config.json",
                                  "preprocessor_config.json"]
    model = transformers.CLIPModel.from_pretrained(directory).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
    processor = transformers.CLIPImageProcessor.from_pretrained(directory)

    loaded = jclip.load(checkpoint)
    texts = ["a photo of a cat", "two dogs playing in the snow", "a diagram"]
    # Crops at whole-pixel offsets: transformers rounds a half-pixel offset down where torchvision (and jclip) round
    # half to even, so a 32 x 47 image would be cropped one pixel to the left.
    pictures = [photo(32, 32, 1), photo(40, 32, 2), photo(32, 46, 3)]
    hf_tokens = tokenizer(texts, padding="max_length", max_length=16, return_tensors="np")["input_ids"]
    want_tokens = loaded.tokenizer(texts, 16)
    for got, want in zip(hf_tokens, want_tokens):  # the same ids up to the end token (then padding of its own)
        end = list(want).index(loaded.tokenizer.end_id) + 1
        np.testing.assert_array_equal(got[:end], want[:end])
    torch = sys.modules["torch"]

    def features(output):  # a tensor, or (transformers 5) the tower's output with the projected pooler_output
        output = getattr(output, "pooler_output", output)
        return torch.nn.functional.normalize(output, dim=-1).detach().numpy()

    with torch.no_grad():
        got_texts = features(model.get_text_features(input_ids=torch.from_numpy(hf_tokens)))
        got_images = features(model.get_image_features(**processor(pictures, return_tensors="pt")))
    text_error = float(np.abs(got_texts - loaded.encode_texts(texts)).max())
    image_error = float(np.abs(got_images - loaded.encode_images(pictures)).max())
    assert text_error < 1e-5 and image_error < 1e-5, (text_error, image_error)


@pytest.mark.parametrize("name, overrides, message", [
    ("RN50", {}, "a ResNet image tower"),
    ("ViT-B-16-SigLIP", {}, "vision.pool='map'"),
    ("coca_ViT-B-32", {}, "a CoCa"),
    ("ViT-B-32", {"init_bias": -10.0}, "init_bias (a sigmoid bias)"),
    ("ViT-B-32", {"text": {"causal": False}}, "text.causal=False"),
    ("ViT-B-32", {"text": {"pool": "last"}}, "text.pool='last'"),
    ("ViT-B-32", {"text": {"pool": "eos"}}, "text.pool='eos' with end-of-text id 2: it pools at the first"),
], ids=["resnet", "siglip", "coca", "bias", "bidirectional-text", "last-token", "end-id-2"])
def test_what_hugging_faces_clip_cannot_express_is_named(name, overrides, message):
    """`CLIPModel` is OpenAI's CLIP; transformers reads an eos_token_id of 2 as OpenAI's argmax pooling."""
    with pytest.raises(NotExpressible, match=re.escape(f"transformers' CLIPModel cannot express {message}")):
        hf_clip_config(name, eos_id=2, **overrides)
    config = hf_clip_config("ViT-B-32-quickgelu")
    assert config["text_config"]["eos_token_id"] == 2 and config["text_config"]["hidden_act"] == "quick_gelu"
    assert config["vision_config"]["intermediate_size"] == 3072 and config["projection_dim"] == 512
