"""OpenAI / OpenCLIP PyTorch state dicts -> jclip parameters.

`from_open_clip(state_dict, name)` maps every parameter of the jclip model
`name` to its PyTorch counterpart, transposing to Flax's layouts:

    Linear weight [out, in]            -> Dense kernel [in, out]
    Conv2d weight [out, in, kh, kw]    -> Conv kernel [kh, kw, in, out]
    fused q/k/v [3 * width, width]     -> query / key / value kernels [width, heads, head_width]
    attention out [width_out, width]   -> out kernel [heads, head_width, width_out]
    LayerNorm / BatchNorm weight       -> scale (BatchNorm running stats -> mean / var)

Four layouts are known: OpenAI's `CLIP` (ViT or ModifiedResNet image tower,
text tower at the top level), OpenCLIP's `CustomTextCLIP` with a timm image
trunk (`visual.trunk.*`) and the text tower under `text.*` (SigLIP), and
OpenCLIP's `CoCa` (`visual.attn_pool.*`, `text.cls_emb`, `text_decoder.*`).

Each transform carries its inverse, with which `jclip.convert.open_clip_export.to_open_clip` writes
state dicts by the same rules.
"""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jclip import models

# Entries of a state dict that hold no parameter: BatchNorm's counter, OpenAI's
# JIT-archive metadata and the causal mask buffer of older OpenCLIP versions.
IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")

Transform = Callable[[np.ndarray], np.ndarray]
Rule = tuple[tuple[str, ...], str, Transform]


def _invertible(forward: Transform, inverse: Transform, part: slice = slice(None)) -> Transform:
    """`forward`, carrying its `inverse` (the jclip parameter -> the rows `part` of the state-dict tensor that
    `forward` reads), which `jclip.convert.open_clip_export.to_open_clip` applies to write state dicts."""
    forward.inverse, forward.part = inverse, part
    return forward


def _same(x):
    return x


def _linear(x):
    return x.T


def _conv(x):
    return x.transpose(2, 3, 1, 0)


_invertible(_same, _same)
_invertible(_linear, _linear)
_invertible(_conv, lambda x: x.transpose(3, 2, 0, 1))


def _heads_in(heads: int, part: slice = slice(None)) -> Transform:
    """A (slice of a fused) projection weight [n * width, width] -> kernel [width, heads, head_width]."""
    return _invertible(lambda w: w[part].T.reshape(w.shape[1], heads, -1),
                       lambda k: k.reshape(k.shape[0], -1).T, part)


def _heads_bias(heads: int, part: slice = slice(None)) -> Transform:
    return _invertible(lambda b: b[part].reshape(heads, -1), lambda b: b.reshape(-1), part)


def _heads_out(heads: int) -> Transform:
    """Attention output weight [width_out, width] -> kernel [heads, head_width, width_out]."""
    return _invertible(lambda w: w.T.reshape(heads, -1, w.shape[0]), lambda k: k.reshape(-1, k.shape[-1]).T)


def _norm(path, key, stats: bool = False) -> list[Rule]:
    rules = [((*path, "scale"), f"{key}.weight", _same), ((*path, "bias"), f"{key}.bias", _same)]
    if stats:
        rules += [((*path, "mean"), f"{key}.running_mean", _same), ((*path, "var"), f"{key}.running_var", _same)]
    return rules


def _dense(path, key, bias: bool = True) -> list[Rule]:
    return [((*path, "kernel"), f"{key}.weight", _linear)] + ([((*path, "bias"), f"{key}.bias", _same)] if bias else [])


def _attention(path, heads: int, query: tuple[str, str], key: tuple[str, str], value: tuple[str, str],
               out: str) -> list[Rule]:
    """Rules for an nn.MultiHeadDotProductAttention; each of q/k/v is (state-dict prefix, slice index)."""
    rules = []
    for name, (prefix, part) in (("query", query), ("key", key), ("value", value)):
        weight, bias = (f"{prefix}_weight", f"{prefix}_bias") if prefix.endswith("in_proj") else (
            f"{prefix}.weight", f"{prefix}.bias")
        rules += [((*path, name, "kernel"), weight, _heads_in(heads, part)),
                  ((*path, name, "bias"), bias, _heads_bias(heads, part))]
    return rules + [((*path, "out", "kernel"), f"{out}.weight", _heads_out(heads)),
                    ((*path, "out", "bias"), f"{out}.bias", _same)]


def _thirds(width: int, fused: str, count: int = 3) -> list[tuple[str, slice]]:
    return [(fused, slice(i * width, (i + 1) * width)) for i in range(count)]


def _openai_block(block, prefix, heads: int, width: int) -> list[Rule]:
    """One `ResidualAttentionBlock` (with `ln_1_kv` when it is a cross-attention block)."""
    rules = _norm((*block, "ln_1"), f"{prefix}.ln_1")
    rules += _attention((*block, "attn"), heads, *_thirds(width, f"{prefix}.attn.in_proj"),
                        out=f"{prefix}.attn.out_proj")
    rules += _norm((*block, "ln_2"), f"{prefix}.ln_2")
    return rules + _dense((*block, "mlp", "fc"), f"{prefix}.mlp.c_fc") + _dense((*block, "mlp", "proj"), f"{prefix}.mlp.c_proj")


def _openai_blocks(path, key, depth: int, heads: int, width: int) -> list[Rule]:
    rules = []
    for i in range(depth):
        rules += _openai_block((*path, "encoder", f"block_{i}"), f"{key}.resblocks.{i}", heads, width)
    return rules


def _openai_vit(vision: dict) -> list[Rule]:
    path, width = ("image_tower",), vision["width"]
    rules = [
        ((*path, "patch_embed", "kernel"), "visual.conv1.weight", _conv),
        ((*path, "cls_token"), "visual.class_embedding",
         _invertible(lambda x: x.reshape(1, 1, -1), lambda x: x.reshape(-1))),
        ((*path, "pos_embedding"), "visual.positional_embedding", _invertible(lambda x: x[None], lambda x: x[0])),
    ]
    rules += _norm((*path, "ln_pre"), "visual.ln_pre")
    rules += _openai_blocks(path, "visual.transformer", vision["depth"], vision["num_heads"], width)
    rules += _norm((*path, "ln_post"), "visual.ln_post")
    return rules + [((*path, "proj", "kernel"), "visual.proj", _same)]


def _timm_vit(vision: dict) -> list[Rule]:
    path, width, heads = ("image_tower",), vision["width"], vision["num_heads"]
    trunk = "visual.trunk"
    rules = [((*path, "patch_embed", "kernel"), f"{trunk}.patch_embed.proj.weight", _conv),
             ((*path, "patch_embed", "bias"), f"{trunk}.patch_embed.proj.bias", _same),
             ((*path, "pos_embedding"), f"{trunk}.pos_embed", _same)]
    for i in range(vision["depth"]):
        block, prefix = (*path, "encoder", f"block_{i}"), f"{trunk}.blocks.{i}"
        rules += _norm((*block, "ln_1"), f"{prefix}.norm1")
        rules += _attention((*block, "attn"), heads, *_thirds(width, f"{prefix}.attn.qkv"), out=f"{prefix}.attn.proj")
        rules += _norm((*block, "ln_2"), f"{prefix}.norm2")
        rules += _dense((*block, "mlp", "fc"), f"{prefix}.mlp.fc1") + _dense((*block, "mlp", "proj"), f"{prefix}.mlp.fc2")
    rules += _norm((*path, "ln_post"), f"{trunk}.norm")
    head, pool = (*path, "map_head"), f"{trunk}.attn_pool"
    rules += [((*head, "latent"), f"{pool}.latent", _same)]
    rules += _attention((*head, "attn"), heads, (f"{pool}.q", slice(None)), *_thirds(width, f"{pool}.kv", 2),
                        out=f"{pool}.proj")
    rules += _norm((*head, "ln"), f"{pool}.norm")
    return rules + _dense((*head, "mlp", "fc"), f"{pool}.mlp.fc1") + _dense((*head, "mlp", "proj"), f"{pool}.mlp.fc2")


def _resnet(vision: dict) -> list[Rule]:
    path, rules = ("image_tower",), []
    for i in (1, 2, 3):
        rules += [((*path, f"stem_conv{i}", "kernel"), f"visual.conv{i}.weight", _conv)]
        rules += _norm((*path, f"stem_bn{i}"), f"visual.bn{i}", stats=True)
    for stage, count in enumerate(vision["layers"], 1):
        for i in range(count):
            block, prefix = (*path, f"layer{stage}_{i}"), f"visual.layer{stage}.{i}"
            for j in (1, 2, 3):
                rules += [((*block, f"conv{j}", "kernel"), f"{prefix}.conv{j}.weight", _conv)]
                rules += _norm((*block, f"bn{j}"), f"{prefix}.bn{j}", stats=True)
            if i == 0:
                rules += [((*block, "downsample", "kernel"), f"{prefix}.downsample.0.weight", _conv)]
                rules += _norm((*block, "downsample_bn"), f"{prefix}.downsample.1", stats=True)
    pool, heads = (*path, "attnpool"), vision["num_heads"]
    rules += [((*pool, "pos_embedding"), "visual.attnpool.positional_embedding", _same)]
    return rules + _attention((*pool, "attn"), heads, ("visual.attnpool.q_proj", slice(None)),
                              ("visual.attnpool.k_proj", slice(None)), ("visual.attnpool.v_proj", slice(None)),
                              out="visual.attnpool.c_proj")


def _text(text: dict, prefix: str) -> list[Rule]:
    path = ("text_tower",)
    rules = [((*path, "token_embedding", "embedding"), f"{prefix}token_embedding.weight", _same),
             ((*path, "pos_embedding"), f"{prefix}positional_embedding", _same)]
    rules += _openai_blocks(path, f"{prefix}transformer", text["depth"], text["num_heads"], text["width"])
    rules += _norm((*path, "ln_final"), f"{prefix}ln_final")
    if text.get("proj_bias"):
        return rules + _dense((*path, "proj"), f"{prefix}text_projection")
    return rules + [((*path, "proj", "kernel"), f"{prefix}text_projection", _same)]


def _coca(config: dict) -> list[Rule]:
    """OpenCLIP's `CoCa`: an OpenAI-layout ViT with an attentional pooler, a text tower with an
    appended class token, and the multimodal decoder `text_decoder`."""
    vision, text, decoder = config["vision"], config["text"], config["decoder"]
    image = _openai_vit(vision)
    pool, path, heads = "visual.attn_pool", ("image_tower", "pooler"), vision["pooler_heads"]
    parts = [slice(i * config["embed_dim"], (i + 1) * config["embed_dim"]) for i in range(3)]
    image += [((*path, "query"), f"{pool}.query", _same)]
    image += _norm((*path, "ln_q"), f"{pool}.ln_q") + _norm((*path, "ln_k"), f"{pool}.ln_k")
    for name, part in zip(("query", "key", "value"), parts):
        image += [((*path, "attn", name, "kernel"), f"{pool}.attn.{name[0]}_proj_weight", _heads_in(heads)),
                  ((*path, "attn", name, "bias"), f"{pool}.attn.in_proj_bias", _heads_bias(heads, part))]
    image += [((*path, "attn", "out", "kernel"), f"{pool}.attn.out_proj.weight", _heads_out(heads)),
              ((*path, "attn", "out", "bias"), f"{pool}.attn.out_proj.bias", _same)]
    rules = image + _text(text, "text.") + [(("text_tower", "cls_token"), "text.cls_emb", _same)]
    path, width, heads = ("text_decoder",), text["width"], decoder["num_heads"]
    for i in range(decoder["depth"]):
        rules += _openai_block((*path, f"block_{i}"), f"text_decoder.resblocks.{i}", heads, width)
        rules += _openai_block((*path, f"cross_{i}"), f"text_decoder.cross_attn.{i}", heads, width)
        rules += _norm((*path, f"cross_{i}", "ln_1_kv"), f"text_decoder.cross_attn.{i}.ln_1_kv")
    rules += _norm((*path, "ln_final"), "text_decoder.ln_final")
    return rules + [((*path, "proj", "kernel"), "text_decoder.text_projection", _same),
                    (("logit_scale",), "logit_scale", _same)]


def conversion_rules(config: dict) -> list[Rule]:
    """(jclip parameter path, state-dict key, transform) for every parameter of the CLIP or CoCa `config`."""
    if "decoder" in config:
        return _coca(config)
    vision = config["vision"]
    if vision.get("type") == "resnet":
        image = _resnet(vision)
    elif vision.get("pool") == "map":
        image = _timm_vit(vision)
    else:
        image = _openai_vit(vision)
    # OpenCLIP keeps the text tower at the top level for CLIP and under `text.` for CustomTextCLIP (timm towers).
    text = _text(config["text"], "text." if vision.get("pool") == "map" else "")
    scalars = [(("logit_scale",), "logit_scale", _same)]
    if config.get("init_bias") is not None:
        scalars.append((("logit_bias",), "logit_bias", _same))
    return image + text + scalars


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _expected_shapes(config: dict) -> dict[tuple[str, ...], tuple[int, ...]]:
    model = models.model_class(config)(**config)
    size = config["vision"].get("image_size")
    if size is None:
        raise ValueError("converting needs a model config with vision.image_size set (the weights' resolution)")
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    tokens = jnp.zeros((1, config["text"]["context_length"]), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens)["params"])
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _nest(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(value)
    return tree


def data_settings(name: str) -> dict[str, Any]:
    """The inputs OpenCLIP's model `name` takes, as jclip's data settings: `image_size`, `text_length`,
    `tokenizer` (None for SigLIP, whose SentencePiece model OpenCLIP downloads from the hub: give your
    own `"sentencepiece:PATH"`) and `preprocess`, OpenCLIP's evaluation transform (PIL's bicubic resize of
    the shorter side and a centre crop with OpenAI's normalisation; SigLIP squashes the image to the square
    and scales it to [-1, 1])."""
    config = models.model_config(name)
    size = config["vision"]["image_size"]
    siglip = "SigLIP" in name
    preprocess = (f"decode|resize({size}, 'bicubic')|value_range(-1, 1)" if siglip
                  else f"decode|resize_small({size}, 'bicubic')|center_crop({size})|clip_normalize")
    return {"image_size": size, "text_length": config["text"]["context_length"],
            "tokenizer": None if siglip else "clip", "preprocess": preprocess}


def from_open_clip(state_dict: Mapping[str, Any], name: str, **overrides: Any) -> dict:
    """The jclip parameters of model `name` (see `jclip.models.list_models`) from a PyTorch state dict.

    `state_dict` maps OpenAI / OpenCLIP parameter names to tensors or arrays (a
    "module." prefix from DistributedDataParallel is dropped). `overrides` are
    passed to `jclip.models.model_config`. Raises ValueError naming the first
    key that is missing, has another shape, or is left over, as happens with a
    state dict of another architecture.
    """
    config = models.model_config(name, **overrides)
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    expected = _expected_shapes(config)
    rules = conversion_rules(config)
    missing_rules = set(expected) - {path for path, _, _ in rules}
    if missing_rules:
        raise ValueError(f"model {name!r} has parameters jclip.convert cannot map: {sorted(missing_rules)[:3]}")
    flat = {}
    for path, key, transform in rules:
        if key not in state:
            raise ValueError(
                f"the state dict has no {key!r}, which model {name!r} needs for {'/'.join(path)}; "
                f"is it a checkpoint of {name}? Its first keys are {list(state)[:3]}"
            )
        value = transform(_to_numpy(state[key]))
        if value.shape != expected[path]:
            raise ValueError(
                f"state dict key {key!r} has shape {tuple(np.shape(state[key]))}, which gives {value.shape} "
                f"for {'/'.join(path)}, but model {name!r} expects {expected[path]}; "
                f"the checkpoint is of another architecture than {name}"
            )
        flat[path] = value
    used = {key for _, key, _ in rules}
    left_over = [k for k in state if k not in used and k not in IGNORED_KEYS and not k.endswith(IGNORED_SUFFIXES)]
    if left_over:
        raise ValueError(
            f"the state dict has {len(left_over)} entries model {name!r} has no place for, the first is "
            f"{left_over[0]!r} with shape {tuple(np.shape(state[left_over[0]]))}; "
            f"the checkpoint is of another architecture than {name}"
        )
    return _nest(flat)
