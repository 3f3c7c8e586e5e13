"""The training objective: a weighted sum of named `jclip.losses` terms, chosen in the config.

    config.losses.clip = dict(weight=1.0)                       # Radford et al. 2021
    config.losses.siglip = dict(weight=1.0, ring=True)          # Zhai et al. 2023, memory-linear
    config.losses.clip = dict(weight=1.0, block_size=1024, label_smoothing=0.1)
    config.losses.uniformity = dict(weight=0.1)                 # Wang & Isola 2020, a regulariser

Each entry names a term of `LOSSES` and gives its weight; the other keys are the keyword options
of its loss function (`ring`, `block_size`, `label_smoothing`, `beta`, ...), checked against the
function's signature before training. The trainer logs every term as `loss_<name>`.

Some terms need more than the two embeddings (the error says how to provide what is missing):
`siglip` a model bias, `caption` a CoCa model, `negclip` hard-negative captions in the batch
(`config.data.negative_kinds`), which the train step embeds with the text tower as
`negative_ztxt` [b, K, dim], `distillation` a teacher checkpoint (`config.teacher`,
`jclip.train.teacher`).
"""

import dataclasses
import inspect
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from jclip import losses

Outputs = dict[str, jax.Array]
Batch = dict[str, jax.Array]

# What a term may need beyond the embeddings and scale, and how a user provides it.
HOW_TO_PROVIDE = {
    "bias": "set config.model.init_bias (e.g. -10) for a learnable bias",
    "caption_logits": "train a CoCa model (e.g. config.model_name = 'coca_ViT-B-32')",
    "negative_ztxt": "set config.data.negative_kinds (e.g. ('swap_attributes',)) so batches carry negative_tokens",
    "teacher_zimg": "set config.teacher to the teacher's checkpoint (RUN/checkpoints/STEP)",
}


@dataclasses.dataclass(frozen=True)
class Term:
    """One named loss: the `jclip.losses` function and how to get its arguments.

    `arguments(outputs, batch, rng, axis_name)` returns the function's positional arguments from
    the model outputs (per device), the per-device batch and the step's random key.
    `embeds_negatives`: the step must embed the batch's `negative_tokens` as `negative_ztxt`.
    """

    function: Callable[..., jax.Array]
    arguments: Callable[[Outputs, Batch, jax.Array, Any], tuple]
    embeds_negatives: bool = False
    options_of: Optional[Callable[..., jax.Array]] = None  # whose keyword options `function` takes, if not its own


def _embeddings(out, batch, rng, axis_name):
    return out["zimg"], out["ztxt"], out["scale"]


def _views(out, batch, rng, axis_name):
    """An image and its caption as V = 2 views of one sample, `[b, 2, dim]`."""
    return jnp.stack([out["zimg"], out["ztxt"]], axis=1), out["scale"]


def caption_labels(tokens: jax.Array, axis_name) -> jax.Array:
    """Per-row labels [b] from the captions: the global index of the first row with identical tokens,
    so that pairs whose captions are the same count as positives, not negatives."""
    everyone = losses.gather_rows(tokens, axis_name)
    same = jnp.all(tokens[:, None, :] == everyone[None, :, :], axis=-1)
    return jnp.argmax(same, axis=1).astype(jnp.int32)


def _uniformity_of_both(zimg, ztxt, **options):
    """The in-modal uniformity of images and of texts, averaged (Wang & Isola 2020 for two modalities)."""
    return (losses.uniformity_loss(zimg, **options) + losses.uniformity_loss(ztxt, **options)) / 2


def _with(*extra):
    """The embeddings and scale followed by `extra(out, batch, rng, axis_name)`'s values."""
    return lambda out, batch, rng, axis: (*_embeddings(out, batch, rng, axis), *(e(out, batch, rng, axis) for e in extra))


LOSSES: dict[str, Term] = {
    "clip": Term(losses.clip_loss, _embeddings),
    "siglip": Term(losses.siglip_loss, _with(lambda out, *_: out["bias"])),
    "dcl": Term(losses.dcl_loss, _embeddings),
    "hard_negatives": Term(losses.hard_negative_clip_loss, _embeddings),
    "negclip": Term(losses.negclip_loss, _with(lambda out, *_: out["negative_ztxt"]), embeds_negatives=True),
    "mochi": Term(losses.mochi_loss, _with(lambda out, batch, rng, axis: rng)),
    "cwcl": Term(losses.cwcl_loss, _embeddings),
    "supervised": Term(losses.supervised_contrastive_loss, _with(
        lambda out, batch, rng, axis: batch["label"] if "label" in batch else caption_labels(batch["tokens"], axis))),
    "alignment": Term(losses.alignment_loss, lambda out, *_: (out["zimg"], out["ztxt"])),
    "uniformity": Term(_uniformity_of_both, lambda out, *_: (out["zimg"], out["ztxt"]),
                       options_of=losses.uniformity_loss),
    "cross_modal_uniformity": Term(losses.cross_modal_uniformity_loss, lambda out, *_: (out["zimg"], out["ztxt"])),
    "contrastive_gap": Term(losses.contrastive_gap_loss, _embeddings),
    "multi_view_infonce": Term(losses.multi_view_infonce_loss, _views),
    "multi_view_dhel": Term(losses.multi_view_dhel_loss, _views),
    "poly_view": Term(losses.poly_view_loss, _views),
    "caption": Term(losses.caption_loss, lambda out, batch, *_: (out["caption_logits"], batch["tokens"])),
    "distillation": Term(losses.distillation_loss, _with(
        lambda out, batch, *_: batch["teacher_zimg"], lambda out, batch, *_: batch["teacher_ztxt"],
        lambda out, batch, *_: batch["teacher_scale"][0])),
}


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """The options must be keyword-only arguments of the term's loss function (`axis_name` is the trainer's),
    and include those without a default."""
    function = LOSSES[name].options_of or LOSSES[name].function
    parameters = inspect.signature(function).parameters
    allowed = sorted(p for p, v in parameters.items() if v.kind is inspect.Parameter.KEYWORD_ONLY and p != "axis_name")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"config.losses.{name} has unknown option(s) {unknown}; {function.__name__} takes "
                         f"weight and {allowed}")
    required = sorted(p for p in allowed if parameters[p].default is inspect.Parameter.empty and p not in options)
    if required:
        raise ValueError(f"config.losses.{name} needs option(s) {required} of {function.__name__}, e.g. "
                         f"config.losses.{name} = dict(weight=1.0, {', '.join(f'{p}=...' for p in required)})")


def make_objective(spec: Mapping[str, Mapping[str, Any]], axis_name: Any,
                   ) -> Callable[[Outputs, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]:
    """`(outputs, batch, rng) -> (total loss, {"loss_<name>": term})` for the weighted terms of `spec`.

    Called per device inside `shard_map` with the per-device outputs and batch: every term
    gathers over `axis_name`, so the total is that of the global batch. `rng` is the step's key,
    the same on every device (for terms that draw random numbers, such as `mochi`).
    """
    if not spec:
        raise ValueError("config.losses is empty; add one, e.g. config.losses.clip = dict(weight=1.0)")
    terms = {}
    for name, options in spec.items():
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r} in config.losses; use one of {sorted(LOSSES)}")
        options = dict(options)
        weight = float(options.pop("weight", 1.0))
        check_options(name, options)
        terms[name] = (weight, options)

    def term_value(name, options, out, batch, rng):
        term = LOSSES[name]
        try:
            arguments = term.arguments(out, batch, rng, axis_name)
        except KeyError as missing:
            what = missing.args[0]
            raise ValueError(f"the {name!r} loss needs {what!r}, which this run does not have: "
                             f"{HOW_TO_PROVIDE.get(what, 'add it to the batch')}") from None
        return term.function(*arguments, axis_name=axis_name, **options)

    def objective(out: Outputs, batch: Batch, rng: jax.Array):
        values = {name: term_value(name, options, out, batch, rng) for name, (_, options) in terms.items()}
        total = sum(weight * values[name] for name, (weight, _) in terms.items())
        return total, {f"loss_{name}": value for name, value in values.items()}

    return objective


def embeds_negatives(spec: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a term of `spec` needs the batch's `negative_tokens` embedded as `negative_ztxt`."""
    return any(LOSSES[name].embeds_negatives for name in spec if name in LOSSES)
