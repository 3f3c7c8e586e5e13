"""jclip parameters -> OpenCLIP state dicts and OpenCLIP's model and preprocessing configurations.

`to_open_clip(params, name)` is the inverse of `from_open_clip`: the same rules
(`conversion_rules`), each transform inverted (transposes, reshapes and the rows
of fused q/k/v tensors put back together), so

    from_open_clip(to_open_clip(params, name), name) == params
    to_open_clip(from_open_clip(state_dict, name), name) == state_dict

exactly, but for the entries of a state dict that hold no parameter, which
`from_open_clip` ignores: BatchNorm's `num_batches_tracked` counters are written
as 0 (OpenCLIP's strict loading wants them; they do not change what a model
computes), and the `attn_mask` buffer and sizes of OpenAI's TorchScript archives
(`input_resolution`, `context_length`, `vocab_size`) are left out.

`open_clip_model_config(config)` is the model in OpenCLIP's terms (the `model_cfg`
of an `open_clip_config.json`, as open_clip's `model_configs/*.json`), and
`open_clip_preprocess_config(spec, image_size)` a jclip evaluation preprocessing
spec as OpenCLIP's `preprocess_cfg`. What OpenCLIP cannot express raises
`NotExpressible`, naming the feature.
"""

import ast
import re
from typing import Any, Mapping, Optional, Union

import jax
import numpy as np

from jclip import models
from jclip.convert.open_clip import conversion_rules
from jclip.data import preprocess

# OpenCLIP's defaults, which its model configs leave out.
_NORM_EPS = 1e-5
_MLP_RATIO = 4.0
_HEAD_WIDTH = 64
_POOLER_QUERIES = 256

# The tokenizers OpenCLIP gives models whose weights jclip converts without one (`data_settings`: SigLIP's
# SentencePiece model comes from the hub), as their `text_cfg` entries in open_clip's model configs.
HUB_TOKENIZERS = {
    name: {"hf_tokenizer_name": f"timm/{name}", "tokenizer_kwargs": {"clean": "canonicalize"}}
    for name in ("ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "ViT-B-16-SigLIP2-256", "ViT-L-16-SigLIP2-256",
                 "ViT-SO400M-14-SigLIP2")
}

# timm's MAP-pooled SigLIP ViTs with exact GELU, which OpenCLIP builds SigLIP image towers from (by name):
# (patch size, width, depth, heads, mlp ratio) -> (timm name prefix, image sizes).
TIMM_SIGLIP = {
    (16, 768, 12, 12, 4.0): ("vit_base_patch16_siglip", (224, 256, 384, 512)),
    (16, 1024, 24, 16, 4.0): ("vit_large_patch16_siglip", (256, 384)),
    (14, 1152, 27, 16, 3.7362): ("vit_so400m_patch14_siglip", (224, 378)),
}


class NotExpressible(ValueError):
    """A model or preprocessing that OpenCLIP has no configuration for."""


def _model_config(model: Union[str, Mapping[str, Any]], overrides: Mapping[str, Any]) -> dict:
    if isinstance(model, str):
        return models.model_config(model, **overrides)
    if overrides:
        raise ValueError("overrides go with a model name, not a model configuration")
    return _plain(model)


def _plain(value: Any) -> Any:
    """A configuration (dicts, ConfigDicts, tuples) as plain dicts and lists."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def to_open_clip(params: Any, model: Union[str, Mapping[str, Any]], **overrides: Any) -> dict[str, np.ndarray]:
    """The OpenAI / OpenCLIP state dict (names and layouts) of the jclip `params` of `model`: a name of
    `jclip.models.list_models` (with `model_config` `overrides`) or a model configuration. float32 numpy
    arrays, and int64 zeros for BatchNorm's `num_batches_tracked`. Raises ValueError when `params` are
    not those of the model (a parameter missing or left over)."""
    config = _model_config(model, overrides)
    flat = {tuple(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    rules = conversion_rules(config)
    paths = [path for path, _, _ in rules]
    missing = [path for path in paths if path not in flat]
    if missing:
        raise ValueError(f"the parameters have no {'/'.join(missing[0])}, which the model needs; are they "
                         "parameters of this model?")
    left_over = sorted(set(flat) - set(paths))
    if left_over:
        raise ValueError(f"the parameters hold {'/'.join(left_over[0])}, which the model has no place for; are "
                         "they parameters of this model?")
    pieces: dict[str, list[tuple[slice, np.ndarray]]] = {}
    for path, key, transform in rules:
        if not hasattr(transform, "inverse"):
            raise NotImplementedError(f"the conversion rule for {key!r} has no inverse (jclip.convert.open_clip)")
        value = np.asarray(jax.device_get(flat[path]), dtype=np.float32)
        pieces.setdefault(key, []).append((transform.part, transform.inverse(value)))
    state = {key: _assemble(key, parts) for key, parts in pieces.items()}
    for key in [key for key in state if key.endswith(".running_mean")]:
        state[key.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros((), np.int64)
    return state


def _assemble(key: str, parts: list[tuple[slice, np.ndarray]]) -> np.ndarray:
    """A state-dict tensor, in C order, from the rows each rule gave (one rule: the whole tensor)."""
    if len(parts) == 1 and parts[0][0] == slice(None):
        return np.array(parts[0][1], order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)
    parts = sorted(parts, key=lambda part: part[0].start or 0)
    end = 0
    for part, rows in parts:
        if part.step not in (None, 1) or (part.start or 0) != end or part.stop - end != rows.shape[0]:
            raise ValueError(f"the conversion rules for {key!r} do not tile its rows: {[p for p, _ in parts]}")
        end = part.stop
    # C order: np.concatenate keeps its inputs' (transposed: Fortran) order, which safetensors.numpy writes wrongly
    return np.ascontiguousarray(np.concatenate([rows for _, rows in parts]))


# Model configurations.

def _refuse(feature: str, why: str):
    raise NotExpressible(f"OpenCLIP cannot express {feature}: {why}")


# The layer options of jclip's towers that neither OpenCLIP's ViT / text transformer nor timm's SigLIP ViTs
# have, with the value that means "off".
MODERN_LAYER_OPTIONS = {"num_registers": 0, "norm": "layer", "mlp": "standard", "qk_norm": False,
                        "position": "learned"}


def refuse_modern_layers(config: Mapping[str, Any], refuse=None) -> None:
    """`NotExpressible` (through `refuse`, default OpenCLIP's wording) for a tower with a layer option of
    `MODERN_LAYER_OPTIONS` switched on: register tokens, RMSNorm, a gated MLP, qk-norm, rotary positions."""
    for tower in ("vision", "text"):
        for option, off in MODERN_LAYER_OPTIONS.items():
            value = config.get(tower, {}).get(option, off)
            if value != off:
                (refuse or _refuse)(f"{tower}.{option}={value!r}", "its transformers have no such option")


def _eps(config: dict, default: float = 1e-6) -> dict:
    eps = config.get("norm_eps", default)
    return {} if eps == _NORM_EPS else {"norm_kwargs": {"eps": eps}}


def _mlp_ratio(config: dict) -> dict:
    ratio = config.get("mlp_ratio", _MLP_RATIO)
    return {} if ratio == _MLP_RATIO else {"mlp_ratio": ratio}


def _image_size(vision: dict) -> int:
    if not vision.get("image_size"):
        _refuse("a model without vision.image_size",
                "its position embeddings are for the training images' size; give the model an image_size")
    return vision["image_size"]


def _vit(vision: dict) -> dict:
    """OpenCLIP's own (OpenAI-layout) ViT: class token, ln_pre, ln_post, projection."""
    if vision.get("stem", "patch") != "patch":
        _refuse(f"vision.stem={vision['stem']!r}", "its ViTs embed patches with one convolution (stem='patch')")
    pool = vision.get("pool", "cls")
    if pool != "cls":
        _refuse(f"vision.pool={pool!r}", "its ViTs pool at a class token ('cls'); attention pooling ('map') is "
                "that of timm's SigLIP towers only")
    for option, default, why in (("patch_bias", False, "its patch embedding has no bias"),
                                 ("ln_pre", True, "jclip converts its ViTs with their ln_pre"),
                                 ("projection", True, "its ViTs end in a projection")):
        if vision.get(option, default) != default:
            _refuse(f"vision.{option}={vision[option]!r} with pool='cls'", why)
    width, heads = vision["width"], vision["num_heads"]
    cfg = {"image_size": _image_size(vision), "layers": vision["depth"], "width": width,
           "patch_size": vision["patch_size"]}
    if width // heads != _HEAD_WIDTH:
        cfg["head_width"] = width // heads
    cfg.update(_mlp_ratio(vision))
    if vision.get("patch_dropout"):
        cfg["patch_dropout"] = vision["patch_dropout"]
    return {**cfg, **_eps(vision)}


def _timm_siglip(vision: dict) -> dict:
    """A MAP-pooled ViT as OpenCLIP builds SigLIP's: timm's model of that shape, no projection."""
    required = (("stem", "patch", "patch"), ("patch_bias", False, True), ("ln_pre", True, False),
                ("projection", True, False), ("activation", "gelu", "gelu"), ("norm_eps", 1e-6, 1e-6))
    for option, default, needed in required:
        if vision.get(option, default) != needed:
            _refuse(f"vision.{option}={vision.get(option, default)!r} with pool='map'",
                    f"its MAP-pooled towers are timm's SigLIP ViTs, which have {option}={needed!r}")
    size = _image_size(vision)
    shape = (vision["patch_size"], vision["width"], vision["depth"], vision["num_heads"],
             vision.get("mlp_ratio", _MLP_RATIO))
    name, sizes = TIMM_SIGLIP.get(shape, (None, ()))
    if size not in sizes:
        known = "; ".join(f"patch {p}, width {w}, depth {d}, {h} heads, mlp ratio {r} at {s}"
                          for (p, w, d, h, r), (_, s) in TIMM_SIGLIP.items())
        _refuse(f"a MAP-pooled ViT with patch_size={shape[0]}, width={shape[1]}, depth={shape[2]}, "
                f"num_heads={shape[3]}, mlp_ratio={shape[4]} at image_size={size}",
                f"OpenCLIP builds such towers from timm's SigLIP ViTs by name, which exist for: {known}")
    return {"image_size": size, "timm_model_name": f"{name}_{size}", "timm_model_pretrained": False,
            "timm_pool": "map", "timm_proj": "none"}


def _resnet(vision: dict) -> dict:
    width, heads = vision.get("width", 64), vision.get("num_heads", 32)
    if (width * 32) % heads:
        _refuse(f"vision.num_heads={heads} with width={width}", "its ResNets' attention pool has "
                "width * 32 / head_width heads; num_heads must divide width * 32")
    cfg = {"image_size": _image_size(vision), "layers": list(vision["layers"]), "width": width, "patch_size": None}
    if width * 32 // heads != _HEAD_WIDTH:
        cfg["head_width"] = width * 32 // heads
    return cfg


def _text(text: dict, tokenizer: Optional[Mapping[str, Any]], eos_id: Optional[int]) -> dict:
    cfg = {"context_length": text["context_length"], "vocab_size": text["vocab_size"], **(tokenizer or {}),
           "width": text["width"], "heads": text["num_heads"], "layers": text["depth"]}
    cfg.update(_mlp_ratio(text))
    if not text.get("causal", True):
        cfg["no_causal_mask"] = True
    if text.get("proj_bias"):
        cfg["proj_bias"] = True
    if text.get("activation") == "gelu_tanh":
        cfg["act_kwargs"] = {"approximate": "tanh"}
    pool = text.get("pool", "eos")
    if pool == "eos":
        if eos_id is None:
            _refuse("text.pool='eos' without the tokenizer's end-of-text id", "its 'eos' pool looks for that id")
        cfg.update(pool_type="eos", eos_id=int(eos_id))
    elif pool != "argmax":
        cfg["pool_type"] = pool
    return {**cfg, **_eps(text)}


def _quick_gelu(activations: list[tuple[str, str]]) -> dict:
    """OpenCLIP's one `quick_gelu` switch for the towers it governs (not a timm tower, not a ResNet)."""
    kinds = {"gelu" if activation == "gelu_tanh" else activation for _, activation in activations}  # act_kwargs
    if len(kinds) > 1:
        _refuse(", ".join(f"{where}.activation={activation!r}" for where, activation in activations),
                "one quick_gelu switch sets the activation of all its towers")
    return {"quick_gelu": True} if kinds == {"quick_gelu"} else {}


def open_clip_model_config(model: Union[str, Mapping[str, Any]], *, eos_id: Optional[int] = None,
                           tokenizer: Optional[Mapping[str, Any]] = None, **overrides: Any) -> dict:
    """The `model_cfg` of an `open_clip_config.json` that builds `model` (a name of
    `jclip.models.list_models` with `overrides`, or a model configuration) in OpenCLIP, in the terms of
    open_clip's `model_configs/*.json` (their defaults left out). `eos_id` is the tokenizer's end-of-text id,
    which a text tower pooled at it ('eos') needs; `tokenizer` holds `text_cfg` entries naming OpenCLIP's
    tokenizer (`hf_tokenizer_name`, `tokenizer_kwargs`). Raises `NotExpressible` naming what OpenCLIP has
    no configuration for."""
    config = _model_config(model, overrides)
    refuse_modern_layers(config)
    if "decoder" in config:
        return _coca(config, tokenizer)
    vision, text = config["vision"], config["text"]
    activations = [("text", text.get("activation", "gelu"))]
    custom_text = False
    if vision.get("type") == "resnet":
        vision_cfg = _resnet(vision)
    elif vision.get("pool") == "map":
        vision_cfg, custom_text = _timm_siglip(vision), True  # text under `text.`
    else:
        vision_cfg = _vit(vision)
        activations.insert(0, ("vision", vision.get("activation", "gelu")))
    cfg = {"embed_dim": config["embed_dim"], **_quick_gelu(activations)}
    if config.get("init_bias") is not None:
        cfg["init_logit_bias"] = config["init_bias"]
    if custom_text:
        cfg["custom_text"] = True
    return {**cfg, "vision_cfg": vision_cfg, "text_cfg": _text(text, tokenizer, eos_id)}


def _coca(config: dict, tokenizer: Optional[Mapping[str, Any]]) -> dict:
    vision, text, decoder = config["vision"], config["text"], config["decoder"]
    if vision["width"] == config["embed_dim"]:
        _refuse(f"a CoCa with vision.width == embed_dim ({config['embed_dim']})", "its image pooler then fuses "
                "the q/k/v projections into one in_proj_weight, which jclip's conversion rules do not map")
    vision_cfg = {**_vit(vision), "attentional_pool": True, "attn_pooler_heads": vision.get("pooler_heads", 8),
                  "output_tokens": True}
    if vision.get("pooler_queries", _POOLER_QUERIES) != _POOLER_QUERIES:
        vision_cfg["attn_pooler_queries"] = vision["pooler_queries"]
    text_cfg = {"context_length": text["context_length"], "vocab_size": text["vocab_size"], **(tokenizer or {}),
                "width": text["width"], "heads": text["num_heads"], "layers": text["depth"], **_mlp_ratio(text),
                "embed_cls": True, "output_tokens": True}
    if text.get("pad_id", 0):
        text_cfg["pad_id"] = text["pad_id"]
    text_cfg.update(_eps(text))
    if vision.get("norm_eps", 1e-6) != _NORM_EPS:
        _refuse(f"vision.norm_eps={vision.get('norm_eps', 1e-6)!r} in a CoCa", "the LayerNorms of its CoCa image "
                f"pooler have eps={_NORM_EPS!r} whatever the config")
    for option, default, needed in (("norm_eps", 1e-6, _NORM_EPS), ("mlp_ratio", _MLP_RATIO, _MLP_RATIO)):
        if decoder.get(option, default) != needed:
            _refuse(f"decoder.{option}={decoder.get(option, default)!r}",
                    f"its CoCa decoder has {option}={needed!r} whatever the config")
    multimodal_cfg = {"context_length": text["context_length"], "vocab_size": text["vocab_size"],
                      "width": text["width"], "heads": decoder["num_heads"], "layers": decoder["depth"],
                      "attn_pooler_heads": vision.get("pooler_heads", 8)}
    activations = [(part, config[part].get("activation", "gelu")) for part in ("vision", "text", "decoder")]
    return {"embed_dim": config["embed_dim"], **_quick_gelu(activations), "vision_cfg": vision_cfg,
            "text_cfg": text_cfg, "multimodal_cfg": multimodal_cfg, "custom_text": True}


# Preprocessing.

_OP = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")


def _ops(spec: str) -> list[tuple[str, tuple]]:
    """(name, arguments) of each op of a preprocessing spec (checked by `jclip.data.preprocess`)."""
    preprocess.parse_ops(spec)
    ops = []
    for part in spec.split("|"):
        name, arguments = _OP.match(part).groups()
        ops.append((name, ast.literal_eval(f"({arguments},)") if arguments else ()))
    return ops


def open_clip_preprocess_config(spec: str, image_size: int) -> dict:
    """OpenCLIP's `preprocess_cfg` (size, mean, std, interpolation, resize_mode) for the jclip evaluation
    preprocessing `spec` of a model taking `image_size` images: `decode`, then the shorter side resized and a
    centre crop (`resize_mode` "shortest") or a squash to the square ("squash"), then `clip_normalize` or one
    `value_range` (a mean and std). Raises `NotExpressible` for anything else."""
    ops = _ops(spec)
    if [name for name, _ in ops[:1]] != ["decode"] or len(ops) < 2:
        _refuse(f"the preprocessing {spec!r}", "an evaluation preprocessing starts with decode and ends in a "
                "normalisation")
    *geometry, (value_name, value_arguments) = ops[1:]
    if value_name not in ("clip_normalize", "value_range"):
        _refuse(f"the preprocessing {spec!r}", "it ends in one normalisation (clip_normalize or value_range)")
    names = [name for name, _ in geometry]
    if names == ["resize_small", "center_crop"]:
        (_, (size, *method)), (_, crop) = geometry
        mode = "shortest"
        if crop not in ((size,), (size, size)):
            _refuse(f"the preprocessing {spec!r}", "its centre crop is the square of the resized shorter side")
    elif names == ["resize"]:
        size, *rest = geometry[0][1]
        if rest and not isinstance(rest[0], str):
            if rest[0] != size:
                _refuse(f"the preprocessing {spec!r}", "it squashes images to a square")
            rest = rest[1:]
        method, mode = rest, "squash"
    else:
        _refuse(f"the preprocessing {spec!r}", "its evaluation transform resizes the shorter side and centre-crops"
                " (resize_small + center_crop) or squashes (resize), between decode and the normalisation")
    if size != image_size:
        _refuse(f"the preprocessing {spec!r} of a model made for {image_size} px images",
                "it feeds the model images of its own size")
    if value_name == "clip_normalize":
        mean, std = preprocess.OPENAI_MEAN, preprocess.OPENAI_STD
    else:
        low, high = value_arguments
        mean, std = (-low / (high - low),) * 3, (1 / (high - low),) * 3
    return {"size": size, "mean": list(mean), "std": list(std), "interpolation": (method or ["bilinear"])[0],
            "resize_mode": mode}
