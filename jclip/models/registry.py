"""Named model configurations, in the spirit of OpenCLIP's model-config table.

Each entry is the keyword arguments of `jclip.models.clip.CLIP` (a plain,
JSON-compatible dict). The OpenCLIP names have OpenCLIP's shapes
(`open_clip/model_configs/*.json`), so `jclip.convert` can load their weights.
The text tower's `vocab_size` of the small built-in models is a placeholder
that the trainer replaces with the tokenizer's size. A config with a `decoder`
is a CoCa (`jclip.models.coca.CoCa`).
"""

import copy
import dataclasses
from typing import Any

import flax.linen as nn

from jclip.models.clip import CLIP, vision_tower_class
from jclip.models.coca import CoCa, CoCaTextTower, CoCaVisionTower, MultimodalDecoder
from jclip.models.text import TextTransformer


def _openai_vit(embed_dim, patch_size, width, depth, text_width, text_heads, activation="gelu"):
    """An OpenAI / OpenCLIP ViT CLIP at 224 px with the 77-token, 49408-id BPE text tower."""
    return dict(
        embed_dim=embed_dim,
        vision=dict(image_size=224, patch_size=patch_size, width=width, depth=depth, num_heads=width // 64,
                    activation=activation, norm_eps=1e-5),
        text=_openai_text(text_width, text_heads, activation),
    )


def _openai_text(width, heads, activation="gelu"):
    return dict(vocab_size=49408, context_length=77, width=width, depth=12, num_heads=heads,
                activation=activation, pool="argmax", norm_eps=1e-5)


def _openai_resnet(embed_dim, layers, text_width, text_heads):
    """An OpenAI ModifiedResNet CLIP at 224 px (64 base channels, 32 attention-pool heads)."""
    return dict(
        embed_dim=embed_dim,
        vision=dict(type="resnet", layers=list(layers), width=64, image_size=224, num_heads=32),
        text=_openai_text(text_width, text_heads),
    )


def _siglip(patch_size, width, depth, heads, image_size, vocab_size, mlp_ratio=4.0, text_activation="gelu"):
    """A SigLIP model as OpenCLIP builds it from timm's ViT of that shape, with towers of equal width and
    depth and a 64-token text tower."""
    return dict(
        embed_dim=width,
        vision=dict(image_size=image_size, patch_size=patch_size, width=width, depth=depth, num_heads=heads,
                    mlp_ratio=mlp_ratio, pool="map", patch_bias=True, ln_pre=False, projection=False, norm_eps=1e-6),
        text=dict(vocab_size=vocab_size, context_length=64, width=width, depth=depth, num_heads=heads,
                  mlp_ratio=mlp_ratio, activation=text_activation, causal=False, pool="last", proj_bias=True,
                  norm_eps=1e-6),
        init_scale=10.0,
        init_bias=-10.0,
        max_scale=None,
    )


SIGLIP2_TEXT = dict(vocab_size=256000, text_activation="gelu_tanh")

MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # The demo model: 64 px images of the built-in `shapes` dataset, a conv stem
    # down to a 4x4 grid, captions of at most 16 tokens.
    "shapes-tiny": dict(
        embed_dim=128,
        vision=dict(patch_size=16, width=128, depth=4, num_heads=4, stem="conv", pool="cls"),
        text=dict(vocab_size=1000, context_length=16, width=128, depth=2, num_heads=4),
    ),
    # The smallest model that still exercises every code path; used by tests.
    "test-micro": dict(
        embed_dim=16,
        vision=dict(patch_size=16, width=32, depth=1, num_heads=2, stem="patch"),
        text=dict(vocab_size=512, context_length=16, width=32, depth=1, num_heads=2),
    ),
    # The throughput benchmark's model (benchmarks/train_throughput.py): OpenAI CLIP's
    # architecture at 64 px, small enough to time on a CPU; 22,332,417 parameters, as
    # OpenCLIP's model of the same shape.
    "bench-small": dict(
        embed_dim=256,
        vision=dict(image_size=64, patch_size=8, width=256, depth=6, num_heads=4, norm_eps=1e-5),
        text=dict(vocab_size=49408, context_length=32, width=256, depth=6, num_heads=4, pool="argmax",
                  norm_eps=1e-5),
    ),
    "ViT-S-32": _openai_vit(384, 32, 384, 12, 384, 6),
    "ViT-B-32": _openai_vit(512, 32, 768, 12, 512, 8),
    "ViT-B-32-quickgelu": _openai_vit(512, 32, 768, 12, 512, 8, activation="quick_gelu"),
    "ViT-B-16": _openai_vit(512, 16, 768, 12, 512, 8),
    "ViT-L-14": _openai_vit(768, 14, 1024, 24, 768, 12),
    "RN50": _openai_resnet(1024, (3, 4, 6, 3), 512, 8),
    "RN101": _openai_resnet(512, (3, 4, 23, 3), 512, 8),
    # SigLIP (Zhai et al. 2023) as OpenCLIP builds it: timm's ViT without class
    # token or ln_pre, MAP pooling, no projection; a bidirectional text tower
    # pooled at the last token with a biased projection; sigmoid scale and bias.
    "ViT-B-16-SigLIP": _siglip(16, 768, 12, 12, 224, vocab_size=32000),
    # SigLIP 2 (Tschannen et al. 2025, arXiv 2502.14786) at fixed resolution, as OpenCLIP's
    # configs: SigLIP's towers with Gemma's 256k vocabulary and tanh-GELU in the text tower.
    "ViT-B-16-SigLIP2": _siglip(16, 768, 12, 12, 224, **SIGLIP2_TEXT),
    "ViT-B-16-SigLIP2-256": _siglip(16, 768, 12, 12, 256, **SIGLIP2_TEXT),
    "ViT-L-16-SigLIP2-256": _siglip(16, 1024, 24, 16, 256, **SIGLIP2_TEXT),
    "ViT-SO400M-14-SigLIP2": _siglip(14, 1152, 27, 16, 224, mlp_ratio=3.7362, **SIGLIP2_TEXT),
    # CoCa (Yu et al. 2022) as OpenCLIP's coca_ViT-B-32: 256 pooler queries (1
    # contrastive, 255 caption tokens), a 76-token text tower plus class token,
    # a 12-layer multimodal decoder.
    "coca_ViT-B-32": dict(
        embed_dim=512,
        vision=dict(image_size=224, patch_size=32, width=768, depth=12, num_heads=12, norm_eps=1e-5,
                    pooler_queries=256, pooler_heads=8),
        text=dict(vocab_size=49408, context_length=76, width=512, depth=12, num_heads=8, norm_eps=1e-5),
        decoder=dict(depth=12, num_heads=8, norm_eps=1e-5),
    ),
    # The smallest CoCa; used by tests.
    "coca-test-micro": dict(
        embed_dim=32,
        vision=dict(image_size=32, patch_size=16, width=32, depth=1, num_heads=2, pooler_queries=5, pooler_heads=2),
        text=dict(vocab_size=64, context_length=12, width=32, depth=1, num_heads=2),
        decoder=dict(depth=1, num_heads=2),
    ),
}


# How a model computes, not what (`ExecutionOptions`, a ViT's patch dropout), with their defaults. Every
# configuration spells them out, so that a command line can set them (`--config.model.dtype=bfloat16`);
# checkpoints of one architecture match whatever their values (`architecture_differences`).
EXECUTION_DEFAULTS = {"dtype": "float32", "matmul_dtype": "float32", "remat": False}
VISION_EXECUTION_DEFAULTS = {"patch_dropout": 0.0}
# Tower options spelled out with their defaults in every configuration whose tower has them, so that a command
# line can set them (`--config.model.text.position=rope`): the MLP's shape and activation and the layer options
# of recent models (register tokens, RMSNorm, gated MLPs, qk-norm, rotary positions). A configuration saved
# before they were spelled out leaves them out, which means their defaults (`architecture_differences`).
SPELLED_OUT_TOWER_OPTIONS = ("mlp_ratio", "activation", "num_registers", "norm", "mlp", "qk_norm", "position",
                             "rope_theta")


def list_models() -> list[str]:
    """The names `create` accepts."""
    return sorted(MODEL_CONFIGS)


def _tower_options(cls: type[nn.Module]) -> set[str]:
    """The arguments of tower `cls` a config sets: all but `embed_dim` and `options`, which the model sets."""
    return {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name", "embed_dim", "options"}


def model_class(config: dict[str, Any]) -> type[nn.Module]:
    """The module a model config builds: CoCa if it has a `decoder`, else CLIP."""
    return CoCa if "decoder" in config else CLIP


def _tower_classes(config: dict[str, Any]) -> dict[str, type[nn.Module]]:
    if "decoder" in config:
        return {"vision": CoCaVisionTower, "text": CoCaTextTower, "decoder": MultimodalDecoder}
    return {"vision": vision_tower_class(config["vision"]), "text": TextTransformer}


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of model `name`, with `overrides` merged in.

    A dict override of `vision`, `text` or (CoCa) `decoder` updates that
    tower's arguments (`vision={"depth": 2}`); any other override replaces the
    value.
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    config = copy.deepcopy(MODEL_CONFIGS[name])
    top_level = _top_level_options(model_class(config))
    config.update({key: value for key, value in EXECUTION_DEFAULTS.items() if key in top_level})
    vision_options = _tower_options(_tower_classes(config)["vision"])
    config["vision"].update({key: value for key, value in VISION_EXECUTION_DEFAULTS.items() if key in vision_options})
    for tower, cls in _tower_classes(config).items():
        for key, value in _spelled_out_defaults(cls).items():
            config[tower].setdefault(key, value)
    for key, value in overrides.items():
        if key in ("vision", "text", "decoder") and key in config:
            config[key].update(value)
        elif key in top_level:
            config[key] = value
        else:
            raise ValueError(f"unknown model option {key!r}; options are {sorted(top_level)}")
    for key, cls in _tower_classes(config).items():
        unknown = set(config[key]) - _tower_options(cls) - ({"type"} if key == "vision" else set())
        if unknown:
            raise ValueError(f"unknown {key} option(s) {sorted(unknown)} for model {name!r}; "
                             f"{cls.__name__} takes {sorted(_tower_options(cls))}")
    return config


def architecture_differences(a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """`config_differences` in what the models compute, leaving out how (the execution options) and the
    layer options left off (both of whose defaults an older configuration may not spell out)."""
    def architecture(config):
        if not isinstance(config, dict):
            return config

        towers = {}
        for tower, cls in (_tower_classes(config).items() if "vision" in config else ()):
            defaults = {**_spelled_out_defaults(cls), **VISION_EXECUTION_DEFAULTS}
            towers[tower] = {k: v for k, v in config[tower].items() if k not in defaults or
                             (k not in VISION_EXECUTION_DEFAULTS and v != defaults[k])}
        return {**{k: v for k, v in config.items() if k not in EXECUTION_DEFAULTS}, **towers}
    return config_differences(architecture(a), architecture(b))


def config_differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, a's value, b's value) wherever two model configurations (nested dicts) differ."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [(prefix.rstrip("."), a, b)]
    return [difference for key in sorted(set(a) | set(b))
            for difference in config_differences(a.get(key), b.get(key), f"{prefix}{key}.")]


def create(name: str, **overrides: Any) -> nn.Module:
    """The CLIP (or CoCa) module of model `name` (see `list_models`), with `overrides` applied."""
    config = model_config(name, **overrides)
    return model_class(config)(**config)


def _spelled_out_defaults(cls: type[nn.Module]) -> dict[str, Any]:
    """The `SPELLED_OUT_TOWER_OPTIONS` that tower `cls` takes, with its defaults."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name in SPELLED_OUT_TOWER_OPTIONS}


def _top_level_options(cls: type[nn.Module]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name"))
