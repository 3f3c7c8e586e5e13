"""jclip parameters -> Hugging Face transformers' `CLIPModel` (`config.json`, `model.safetensors`,
`preprocessor_config.json`, and the tokenizer files of OpenAI's BPE).

`CLIPModel` is OpenAI's CLIP with a ViT image tower: the jclip models whose
OpenCLIP layout is OpenAI's (`open_clip_export`: class token, ln_pre, projection)
with a causal text tower pooled at the end token, unbiased projections and no
sigmoid bias. The state dict goes through OpenCLIP's (`to_open_clip`), so the
weights are those OpenCLIP loads, renamed, the fused q/k/v rows split. Writing
needs neither torch nor transformers.
"""

import json
from typing import Any, Mapping, Optional, Union

import numpy as np

from jclip.convert.open_clip_export import (NotExpressible, _model_config, _vit, open_clip_preprocess_config,
                                            refuse_modern_layers, to_open_clip)

# transformers reads a text `eos_token_id` of 2 as OpenAI's original pooling at the largest token id (argmax).
_ARGMAX_EOS_ID = 2


def _refuse(feature: str, why: str):
    raise NotExpressible(f"transformers' CLIPModel cannot express {feature}: {why}")


def hf_clip_config(model: Union[str, Mapping[str, Any]], *, eos_id: Optional[int] = None,
                   **overrides: Any) -> dict:
    """The `config.json` of a transformers `CLIPModel` of `model` (a name with `overrides`, or a model
    configuration); `eos_id` is the tokenizer's end-of-text id, which a text tower pooled there ('eos')
    needs. Raises `NotExpressible` naming what `CLIPModel` has no configuration for."""
    config = _model_config(model, overrides)
    refuse_modern_layers(config, _refuse)
    vision, text = config["vision"], config["text"]
    if "decoder" in config or vision.get("type") == "resnet" or vision.get("pool", "cls") != "cls":
        kind = "a CoCa" if "decoder" in config else (
            "a ResNet image tower" if vision.get("type") == "resnet" else f"vision.pool={vision.get('pool')!r}")
        _refuse(kind, "it is OpenAI's CLIP with a class-token ViT")
    _vit(vision)  # what OpenCLIP's ViT (the same layout) cannot express
    if config.get("init_bias") is not None:
        _refuse("init_bias (a sigmoid bias)", "it has a logit scale only")
    for option, default, why in (("causal", True, "its text tower is causal"),
                                 ("proj_bias", False, "its text projection has no bias")):
        if text.get(option, default) != default:
            _refuse(f"text.{option}={text[option]!r}", why)
    pool = text.get("pool", "eos")
    if pool == "argmax":
        text_eos = _ARGMAX_EOS_ID
    elif pool == "eos" and eos_id is not None and eos_id != _ARGMAX_EOS_ID:
        text_eos = int(eos_id)
    else:
        _refuse(f"text.pool={pool!r}" + (f" with end-of-text id {eos_id}" if pool == "eos" else ""),
                "it pools at the first end-of-text id, or at the largest id where eos_token_id is 2")

    def tower(tower_config: dict) -> dict:
        return {"hidden_size": tower_config["width"],
                "intermediate_size": int(tower_config["width"] * tower_config.get("mlp_ratio", 4.0)),
                "num_hidden_layers": tower_config["depth"], "num_attention_heads": tower_config["num_heads"],
                "hidden_act": tower_config.get("activation", "gelu"),
                "layer_norm_eps": tower_config.get("norm_eps", 1e-6), "projection_dim": config["embed_dim"]}

    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config["embed_dim"],
        "logit_scale_init_value": float(np.log(config.get("init_scale", 1 / 0.07))), "torch_dtype": "float32",
        "text_config": {**tower(text), "vocab_size": text["vocab_size"],
                        "max_position_embeddings": text["context_length"], "bos_token_id": 49406,
                        "eos_token_id": text_eos, "pad_token_id": 1},
        "vision_config": {**tower(vision), "image_size": vision["image_size"], "patch_size": vision["patch_size"],
                          "num_channels": 3},
    }


def _block(state: dict, source: str, target: str, out: dict) -> None:
    """One OpenAI `ResidualAttentionBlock` as a transformers `CLIPEncoderLayer`."""
    weight, bias = state[f"{source}.attn.in_proj_weight"], state[f"{source}.attn.in_proj_bias"]
    for name, w, b in zip("qkv", np.split(weight, 3), np.split(bias, 3)):
        out[f"{target}.self_attn.{name}_proj.weight"] = np.ascontiguousarray(w)
        out[f"{target}.self_attn.{name}_proj.bias"] = np.ascontiguousarray(b)
    for hf, open_clip in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                          ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
        for kind in ("weight", "bias"):
            out[f"{target}.{hf}.{kind}"] = state[f"{source}.{open_clip}.{kind}"]


def to_hf_clip(params: Any, model: Union[str, Mapping[str, Any]], **overrides: Any) -> dict[str, np.ndarray]:
    """The transformers `CLIPModel` state dict (float32 numpy arrays) of the jclip `params` of `model`, which
    must be one `hf_clip_config` accepts (with some end-of-text id)."""
    config = _model_config(model, overrides)
    hf_clip_config(config, eos_id=0)
    return hf_clip_state(to_open_clip(params, config), config)


def hf_clip_state(state: Mapping[str, np.ndarray], model: Union[str, Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """`to_hf_clip` from the model's OpenCLIP state dict (`to_open_clip`): the same arrays, renamed, the fused
    q/k/v rows split and the projections transposed."""
    config = _model_config(model, {})
    out = {"logit_scale": state["logit_scale"]}
    vision, text = "vision_model", "text_model"
    out[f"{vision}.embeddings.class_embedding"] = state["visual.class_embedding"]
    out[f"{vision}.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    out[f"{vision}.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    for hf, open_clip in ((f"{vision}.pre_layrnorm", "visual.ln_pre"), (f"{vision}.post_layernorm", "visual.ln_post"),
                          (f"{text}.final_layer_norm", "ln_final")):
        out[f"{hf}.weight"], out[f"{hf}.bias"] = state[f"{open_clip}.weight"], state[f"{open_clip}.bias"]
    for i in range(config["vision"]["depth"]):
        _block(state, f"visual.transformer.resblocks.{i}", f"{vision}.encoder.layers.{i}", out)
    out["visual_projection.weight"] = np.ascontiguousarray(state["visual.proj"].T)
    out[f"{text}.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    out[f"{text}.embeddings.position_embedding.weight"] = state["positional_embedding"]
    for i in range(config["text"]["depth"]):
        _block(state, f"transformer.resblocks.{i}", f"{text}.encoder.layers.{i}", out)
    out["text_projection.weight"] = np.ascontiguousarray(state["text_projection"].T)
    return out


def hf_preprocessor_config(spec: str, image_size: int) -> dict:
    """The `preprocessor_config.json` of a transformers `CLIPImageProcessor` for the jclip evaluation
    preprocessing `spec` (what `open_clip_preprocess_config` accepts)."""
    cfg = open_clip_preprocess_config(spec, image_size)
    size = cfg["size"]
    geometry = ({"size": {"shortest_edge": size}, "do_center_crop": True, "crop_size": {"height": size, "width": size}}
                if cfg["resize_mode"] == "shortest" else
                {"size": {"height": size, "width": size}, "do_center_crop": False})
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor", "do_convert_rgb": True,
            "do_resize": True, **geometry, "resample": {"bicubic": 3, "bilinear": 2}[cfg["interpolation"]],
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": cfg["mean"],
            "image_std": cfg["std"]}


def hf_tokenizer_files(tokenizer: Any, context_length: int) -> dict[str, str]:
    """The files (name -> text) of a transformers `CLIPTokenizer` with OpenAI's BPE, from jclip's
    `ClipTokenizer` (its vocabulary and merges)."""
    merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    # OpenAI's (and transformers') names of the special tokens, where OpenCLIP's tokenizer says <start_of_text>
    names = {tokenizer.decoder[tokenizer.start_id]: "<|startoftext|>", tokenizer.decoder[tokenizer.end_id]: "<|endoftext|>"}
    vocab = {names.get(piece, piece): i for piece, i in tokenizer.encoder.items()}
    config = {"tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor",
              "model_max_length": context_length, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True}
    return {"vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps({key: config[key] for key in
                                                   ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2)}
