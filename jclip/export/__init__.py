"""Exporting a jclip model (a run's checkpoint or a converted one) in OpenCLIP's hub layout.

    python -m jclip.export --checkpoint runs/my_run --output exported/my_run

writes into the output directory what OpenCLIP's `push_to_hf_hub` uploads and its
`local-dir:` / `hf-hub:` schemas read:

- `open_clip_config.json`: `model_cfg`, the architecture in OpenCLIP's terms (as
  its `model_configs/*.json`), `preprocess_cfg`, the model's evaluation
  preprocessing (size, mean, std, interpolation, resize mode), and `jclip`, where
  the export came from;
- `open_clip_model.safetensors`: the float32 state dict (the EMA of the
  parameters when the run keeps one, as evaluation uses);
- `jclip_tokenizer.json` (or the tokenizer's own file) when the model's tokenizer
  is not OpenAI's BPE, which is what OpenCLIP's `get_tokenizer` gives.

With `hf=True` (`--hf`) the directory also holds Hugging Face transformers'
`CLIPModel` (`config.json`, `model.safetensors`, `preprocessor_config.json`, and
with OpenAI's BPE its tokenizer files), for models that `CLIPModel` expresses:
class-token ViTs with a causal text tower (`jclip.convert.hf_clip`).

    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:exported/my_run")
    tokenizer = open_clip.get_tokenizer("local-dir:exported/my_run")

    import transformers                 # with --hf
    model = transformers.CLIPModel.from_pretrained("exported/my_run")

Writing needs neither torch nor OpenCLIP (`safetensors.numpy`).
"""

import dataclasses
import json
import os
import shutil
from typing import Optional

import jax
from safetensors.numpy import save_file

from jclip import models, parallel
from jclip.checkpoint import load_model, locate, read_record, run_config
from jclip.convert.hf_clip import hf_clip_config, hf_clip_state, hf_preprocessor_config, hf_tokenizer_files
from jclip.convert.open_clip_export import (HUB_TOKENIZERS, open_clip_model_config, open_clip_preprocess_config,
                                        to_open_clip)
from jclip.data.bpe_tokenizer import Tokenizer
from jclip.data.tokenizers import load_tokenizer
from jclip.evaluate.from_checkpoint import evaluation_preprocess

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
TOKENIZER_NAME = "jclip_tokenizer"
HF_CONFIG_NAME, HF_WEIGHTS_NAME, HF_PREPROCESSOR_NAME = "config.json", "model.safetensors", "preprocessor_config.json"


@dataclasses.dataclass
class Exported:
    """What `export` wrote: the directory, its files, and notes for the user (e.g. on the tokenizer)."""

    directory: str
    files: list[str]
    notes: list[str]
    step: int
    model_name: Optional[str]


def _check_output(output: str) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise FileExistsError(f"{output} is a file; give a directory to --output")
    for name in (CONFIG_NAME, WEIGHTS_NAME, HF_CONFIG_NAME, HF_WEIGHTS_NAME):
        if os.path.exists(os.path.join(output, name)):
            raise FileExistsError(f"{output} already holds an export ({name}); choose a new --output")


def _tokenizer_settings(config, model_config: dict, tokenizer) -> tuple[dict, Optional[str]]:
    """(OpenCLIP `text_cfg` entries naming the tokenizer, a note when OpenCLIP's tokenizer is not the model's)."""
    name, model_name = config.data.get("tokenizer"), config.get("model_name")
    if name == "clip":
        return {}, None
    if name is None and model_name in HUB_TOKENIZERS and not models.architecture_differences(
            model_config, models.model_config(model_name)):
        return HUB_TOKENIZERS[model_name], None  # OpenCLIP's own weights, with OpenCLIP's tokenizer from the hub
    if name is None:
        return {}, ("the checkpoint names no tokenizer, so OpenCLIP's get_tokenizer gives OpenAI's BPE, which may "
                    "not be the model's")
    return {}, (f"the model's tokenizer is jclip's {name!r}, not OpenAI's BPE that OpenCLIP's get_tokenizer gives "
                "(text_cfg's hf_tokenizer_name cannot name a local jclip tokenizer): tokenize with "
                f"jclip.data.tokenizers.load_tokenizer on the copy beside the weights and pass the ids to encode_text")


def _save_tokenizer(name: str, tokenizer, output: str) -> Optional[str]:
    """A copy of the jclip tokenizer `name` in `output`; its file name, or None where it has no file."""
    if isinstance(tokenizer, Tokenizer):
        tokenizer.save(os.path.join(output, f"{TOKENIZER_NAME}.json"))
        return f"{TOKENIZER_NAME}.json"
    source = name.partition(":")[2]
    if not os.path.isfile(source):
        return None
    base = os.path.basename(source)
    file_name = TOKENIZER_NAME + (base[base.index("."):] if "." in base else "")
    shutil.copyfile(source, os.path.join(output, file_name))
    return file_name


def export(checkpoint: str, output: str, *, step: Optional[int] = None, hf: bool = False) -> Exported:
    """Write the model of `checkpoint` (a run directory, its latest or `step`, or `RUN/checkpoints/STEP`;
    a run of `jclip.train` or a checkpoint of `jclip.convert`) to `output` in OpenCLIP's hub layout, and with
    `hf` also as a transformers `CLIPModel`.

    Raises FileNotFoundError for a missing checkpoint, FileExistsError when `output` holds an export
    already, and ValueError (`jclip.convert.open_clip_export.NotExpressible`) for a model or evaluation
    preprocessing that OpenCLIP cannot express, each before anything is written.
    """
    run_directory, step = locate(None, checkpoint, step)
    record = read_record(run_directory, step)
    _check_output(output)
    config = run_config(run_directory, record)
    model_config = record["model"]
    tokenizer_name = config.data.get("tokenizer")
    tokenizer = load_tokenizer(tokenizer_name, config.data.get("data_dir")) if tokenizer_name else None
    text_tokenizer, tokenizer_note = _tokenizer_settings(config, model_config, tokenizer)
    eos_id = tokenizer.end_id if tokenizer is not None and getattr(tokenizer, "pad_id", 0) == 0 else None
    model_cfg = open_clip_model_config(model_config, eos_id=eos_id, tokenizer=text_tokenizer)
    spec, image_size = evaluation_preprocess(config), model_cfg["vision_cfg"]["image_size"]
    preprocess_cfg = open_clip_preprocess_config(spec, image_size)
    hf_files = {}
    if hf:
        hf_files[HF_CONFIG_NAME] = json.dumps(hf_clip_config(model_config, eos_id=eos_id), indent=2)
        hf_files[HF_PREPROCESSOR_NAME] = json.dumps(hf_preprocessor_config(spec, image_size), indent=2)
        if tokenizer_name == "clip":
            hf_files.update(hf_tokenizer_files(tokenizer, model_config["text"]["context_length"]))
    notes = [tokenizer_note] if tokenizer_note else []
    if preprocess_cfg["interpolation"] == "bilinear":
        notes.append("the model resizes bilinearly: jclip with TensorFlow's antialiased resize, OpenCLIP with PIL's, "
                     "so pixels of images not already at the model's size may differ by a rounding step")

    _, params, record = load_model(config, run_directory, step, parallel.make_mesh(1), tokenizer, verbose=False)
    state = to_open_clip(jax.device_get(params), model_config)
    del params
    os.makedirs(output, exist_ok=True)
    files = [WEIGHTS_NAME]
    partial_weights = os.path.join(output, f".{WEIGHTS_NAME}.partial")
    save_file(state, partial_weights, metadata={"format": "pt"})
    if hf:
        partial_hf_weights = os.path.join(output, f".{HF_WEIGHTS_NAME}.partial")
        save_file(hf_clip_state(state, model_config), partial_hf_weights, metadata={"format": "pt"})
        os.replace(partial_hf_weights, os.path.join(output, HF_WEIGHTS_NAME))
        for name, text in hf_files.items():
            with open(os.path.join(output, name), "w") as f:
                f.write(text)
        files += [HF_WEIGHTS_NAME, *hf_files]
    tokenizer_file = _save_tokenizer(tokenizer_name, tokenizer, output) if tokenizer_note and tokenizer_name else None
    if tokenizer_file:
        files.append(tokenizer_file)
        notes[0] += f" ({os.path.join(output, tokenizer_file)})"
    jclip_record = {"checkpoint": os.path.join(os.path.abspath(run_directory), "checkpoints", str(record["step"])),
                    "step": record["step"], "ema": bool(record.get("has_ema_params")),
                    "model_name": config.get("model_name"), "model": model_config, "tokenizer": tokenizer_name,
                    "tokenizer_file": tokenizer_file, "preprocess": evaluation_preprocess(config)}
    if notes:
        jclip_record["notes"] = notes
    partial_config = os.path.join(output, f".{CONFIG_NAME}.partial")
    with open(partial_config, "w") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg, "jclip": jclip_record}, f, indent=2)
    os.replace(partial_weights, os.path.join(output, WEIGHTS_NAME))
    os.replace(partial_config, os.path.join(output, CONFIG_NAME))  # last: a directory with it is a whole export
    return Exported(output, [CONFIG_NAME, *files], notes, record["step"], config.get("model_name"))
