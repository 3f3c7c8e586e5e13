"""Parameter counts and forward-pass GFLOPs of the named models.

GFLOPs are XLA's cost analysis of the jitted image and text encoders at batch
size 1 (floating-point operations, a multiply-add counting as two), so they are
about twice the "GMACs" some tables list.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jclip.models.registry import model_class, model_config


def example_inputs(config: dict[str, Any], batch: int = 1, image_size: int = 224):
    """Shape structs of the images and tokens a model `config` takes (its own image_size if set)."""
    size = config["vision"].get("image_size") or image_size
    return (jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch, config["text"]["context_length"]), jnp.int32))


def summarize(name: str, **overrides: Any) -> dict[str, float]:
    """{"params_m", "image_size", "image_gflops", "text_gflops"} of model `name`, computed abstractly."""
    config = model_config(name, **overrides)
    model = model_class(config)(**config)
    images, tokens = example_inputs(config)
    params = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t), images, tokens)
    image_flops, text_flops = encoder_flops(model, images, tokens)
    return {
        "params_m": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
        "image_size": images.shape[1],
        "image_gflops": image_flops / 1e9,
        "text_gflops": text_flops / 1e9,
    }


def encoder_flops(model, images, tokens, init_images=None) -> tuple[float, float]:
    """Forward FLOPs of `model`'s image and text encoders on `images` and `tokens` (arrays or shape structs;
    `images` may be NaFlex patch inputs, with the model's parameters those of `init_images`)."""
    params = jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t),
                            images if init_images is None else init_images, tokens)

    def flops(method, inputs):
        return jax.jit(lambda p, x: model.apply(p, x, method=method)).lower(params, inputs).cost_analysis()["flops"]

    return flops(type(model).encode_image, images), flops(type(model).encode_text, tokens)


def training_flops_per_pair(model, image_shape: tuple[int, ...], text_length: int, image_input: Any = None,
                            frozen: Sequence[str] = ()) -> float:
    """Model FLOPs of one image–text pair in a training step: 3× a tower's forward pass (forward + backward),
    1× for a tower in `frozen` (its parameter group, "image_tower" or "text_tower": forward only, as the train
    step runs it). `image_input`: one example of the image inputs where they are not images of `image_shape`
    (a NaFlex patch input, whose FLOPs are those of its whole token budget)."""
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, text_length), jnp.int32)
    if image_input is None:
        image_flops, text_flops = encoder_flops(model, images, tokens)
    else:
        inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), image_input)
        image_flops, text_flops = encoder_flops(model, inputs, tokens, init_images=images)
    passes = {tower: 1 if tower in frozen else 3 for tower in ("image_tower", "text_tower")}
    return passes["image_tower"] * image_flops + passes["text_tower"] * text_flops
