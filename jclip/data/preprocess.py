"""Image preprocessing ops, composed from a big_vision-style spec string.

    "decode|resize_small(256)|center_crop(224)|value_range(-1, 1)"
    "decode|inception_crop(224, 0.4, 1.0)|flip_lr|clip_normalize"
    "decode|resize_small(224, 'bicubic')|center_crop(224)|clip_normalize"   # OpenCLIP's evaluation transform

Each op maps an image tensor to an image tensor; `decode` turns encoded
bytes (PNG, JPEG, GIF, BMP) into uint8 [H, W, 3]. Random ops draw from a
stateless seed per example, so the same (seed, example position) always gives
the same crop: a resumed run preprocesses exactly as an uninterrupted one.

Resizes are bilinear and antialiased (TensorFlow's) by default; `"bicubic"` is
PIL's bicubic resize of uint8 images, which torchvision, and so OpenCLIP, applies
to PIL images. `resize_small` and `center_crop` round sizes and offsets as
torchvision does, so a spec can reproduce OpenCLIP's transform exactly.

`naflex(patch_size, max_patches)` ends the geometry of a NaFlex spec
(`jclip.data.naflex`): it turns the image into a patch input, a dict of padded
patches and their grid, whose patches the per-pixel ops after it map.
"""

import ast
import re
from typing import Any, Callable, Optional

import numpy as np
import tensorflow as tf
from PIL import Image

from jclip.data import naflex

# OpenAI CLIP's per-channel image statistics (on [0, 1] values).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

ImageOp = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]  # (image, seed [2]) -> image


def _decode(image, seed):
    decoded = tf.io.decode_image(image, channels=3, expand_animations=False)
    decoded.set_shape([None, None, 3])
    return decoded


RESIZE_METHODS = ("bilinear", "bicubic")


def _pil_bicubic(image: np.ndarray, height: np.ndarray, width: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((int(width), int(height)), Image.BICUBIC))


def _resized(image, target, method="bilinear"):
    """`image` resized to `target` [height, width], keeping uint8 images uint8: TensorFlow's antialiased
    bilinear resize, or PIL's bicubic (uint8 images only)."""
    if method == "bicubic":
        if image.dtype != tf.uint8:
            raise ValueError("the 'bicubic' resize (PIL's) takes uint8 images: put it before value_range / "
                             "clip_normalize")
        resized = tf.numpy_function(_pil_bicubic, [image, target[0], target[1]], tf.uint8, stateful=False)
        resized.set_shape([None, None, 3])
        return resized
    resized = tf.image.resize(image, target, antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8) if image.dtype == tf.uint8 else resized


def _check_method(method):
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method {method!r}; use one of {RESIZE_METHODS}")


def _resize(size, width=None, method="bilinear"):
    """Resize to exactly [size, width or size] (`resize(224, 'bicubic')`: a square, keeping the width)."""
    if isinstance(width, str):
        width, method = None, width
    _check_method(method)
    return lambda image, seed: _resized(image, tf.constant([size, width or size]), method)


def _resize_small(size, method="bilinear"):
    """Resize so that the shorter side is `size`, keeping the aspect ratio: the longer side becomes
    floor(size * long / short), as torchvision's (OpenCLIP's) Resize computes it."""
    _check_method(method)

    def op(image, seed):
        shape = tf.shape(image)[:2]
        short = tf.reduce_min(shape)
        target = tf.where(shape == short, size, (size * shape) // short)
        return _resized(image, target, method)
    return op


def _center_crop(size, width=None):
    """The central [size, width or size] window; offsets rounded half to even, as torchvision's CenterCrop."""
    def op(image, seed):
        height, target_width = size, width or size
        shape = tf.shape(image)
        top = tf.cast(tf.round(tf.cast(shape[0] - height, tf.float32) / 2), tf.int32)
        left = tf.cast(tf.round(tf.cast(shape[1] - target_width, tf.float32) / 2), tf.int32)
        return tf.image.crop_to_bounding_box(image, top, left, height, target_width)
    return op


def _inception_crop(size, min_scale=0.08, max_scale=1.0):
    """Random-resized ("inception") crop: area fraction in [min_scale, max_scale], aspect 3/4..4/3."""
    def op(image, seed):
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed,
            area_range=(min_scale, max_scale), aspect_ratio_range=(3 / 4, 4 / 3),
            min_object_covered=0.0, use_image_if_no_bounding_boxes=True,
        )
        crop = tf.slice(image, begin, crop_size)
        crop.set_shape([None, None, 3])
        return _resize(size)(crop, seed)
    return op


def _naflex(patch_size, max_patches, method="bilinear"):
    _check_method(method)
    return lambda image, seed: naflex.patchify(image, patch_size, max_patches,
                                               lambda image, target: _resized(image, target, method))


def _flip_lr(image, seed):
    return tf.image.stateless_random_flip_left_right(image, seed=seed + 1)


class PerPixelOp:
    """An op that maps each pixel's float32 values on their own, the same way in every image.

    `values` uses only operators that NumPy, TensorFlow and JAX arrays share, so the one
    definition runs in tf.data and, on a batch, inside a compiled JAX step (`batch_op`).
    """

    def __init__(self, values: Callable):
        self.values = values

    def __call__(self, image, seed):
        return naflex.map_patches(image, lambda pixels: self.values(tf.cast(pixels, tf.float32)))


def _value_range(low, high):
    """[0, 255] -> float32 [low, high]."""
    return PerPixelOp(lambda values: values / np.float32(255) * np.float32(high - low) + np.float32(low))


_MEAN, _STD = np.float32(OPENAI_MEAN), np.float32(OPENAI_STD)
# [0, 255] -> float32 standardised with OpenAI CLIP's mean and std.
_clip_normalize = PerPixelOp(lambda values: (values / np.float32(255) - _MEAN) / _STD)


OPS: dict[str, Callable] = {
    "decode": lambda: _decode,
    "resize": _resize,
    "resize_small": _resize_small,
    "center_crop": _center_crop,
    "inception_crop": _inception_crop,
    "flip_lr": lambda: _flip_lr,
    "naflex": _naflex,
    "value_range": _value_range,
    "clip_normalize": lambda: _clip_normalize,
}

# The `PerPixelOp`s: at the end of a spec they run on a whole batch at once (`stages`), in the train step.
PER_PIXEL_OPS = ("value_range", "clip_normalize")
# Ops that use no randomness and keep uint8 pixels: at the start of a spec they can run once per image, and
# their results be kept (`jclip.data.in_memory`).
ONCE_OPS = ("decode", "resize", "resize_small", "center_crop")

_OP_PATTERN = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")

Ops = list[tuple[str, ImageOp]]


def parse_ops(spec: str) -> Ops:
    """The (name, op) of each op in `spec` ("op|op(args)|...")."""
    ops = []
    for part in spec.split("|"):
        match = _OP_PATTERN.match(part)
        if not match or match.group(1) not in OPS:
            raise ValueError(
                f"unknown preprocessing op {part.strip()!r} in {spec!r}; known ops: {', '.join(sorted(OPS))}"
            )
        name, arguments = match.groups()
        try:
            args = ast.literal_eval(f"({arguments},)") if arguments else ()
            ops.append((name, OPS[name](*args)))
        except (ValueError, SyntaxError, TypeError) as error:
            raise ValueError(f"bad arguments for preprocessing op {part.strip()!r}: {error}") from None
    return ops


def compose(ops: Ops) -> ImageOp:
    """The ops one after the other, as one `(image, seed) -> image` (the identity for none)."""
    def apply(image, seed):
        for _, op in ops:
            image = op(image, seed)
        return image
    return apply


def parse(spec: str) -> ImageOp:
    """The composition of the ops in `spec` ("op|op(args)|..."), as one `(image, seed) -> image`."""
    return compose(parse_ops(spec))


def evaluation_spec(image_size: int, training_spec: str) -> str:
    """The evaluation preprocessing of a model trained with `training_spec` on `image_size` images: decode,
    bring the image to `image_size` as training did, then the training spec's value range or normalisation
    (its trailing per-pixel ops), so evaluation feeds the inputs training did. A training spec that squashes
    images to the square (`resize`, as big_vision's SigLIP recipes) is followed by a squash; a NaFlex one by
    its `naflex` op (whole images, at their aspect ratio, in its token budget); any other (crops, or none) by a
    resize of the shorter side and a centre crop (OpenCLIP's evaluation transform)."""
    parts = [part.strip() for part in training_spec.split("|")]
    value_ops = parts[len(parts) - len(stages(training_spec)[2]):]
    names = [name for name, _ in parse_ops(training_spec)]
    if "naflex" in names:
        geometry = [parts[names.index("naflex")]]
    elif "resize" in names:
        geometry = [f"resize({image_size})"]
    else:
        geometry = [f"resize_small({image_size})", f"center_crop({image_size})"]
    return "|".join(["decode", *geometry, *value_ops])


def _naflex_op(spec: str) -> Optional[tuple[list[str], int, list]]:
    """(the ops of `spec` as written, the index of its `naflex` op, that op's arguments); None without one."""
    parse_ops(spec)  # a clear error for a bad spec
    parts = [part.strip() for part in spec.split("|")]
    for index, part in enumerate(parts):
        name, arguments = _OP_PATTERN.match(part).groups()
        if name == "naflex":
            return parts, index, list(ast.literal_eval(f"({arguments},)"))
    return None


def naflex_budget(spec: str) -> Optional[tuple[int, int]]:
    """(patch_size, max_patches) of the `naflex` op of `spec`; None: `spec` makes images, not patch inputs."""
    op = _naflex_op(spec)
    return None if op is None else (op[2][0], op[2][1])


def with_max_patches(spec: str, max_patches: int) -> str:
    """`spec` with its `naflex` op's token budget set to `max_patches` (evaluating a NaFlex model at another
    sequence length); an error for a spec without one."""
    op = _naflex_op(spec)
    if op is None:
        raise ValueError(f"max_patches is for NaFlex models, whose preprocessing has a naflex op; {spec!r} has none")
    parts, index, arguments = op
    arguments[1] = max_patches
    parts[index] = f"naflex({', '.join(map(repr, arguments))})"
    return "|".join(parts)


def example_input(spec: str, image_size: int) -> Any:
    """One zero model input of what `spec` makes, as evaluation feeds it: a float32 image
    [image_size, image_size, 3], or for a NaFlex spec an all-padding patch input."""
    budget = naflex_budget(spec)
    return naflex.example(*budget) if budget else np.zeros((image_size, image_size, 3), np.float32)


def stages(spec: str) -> tuple[Ops, Ops, Ops]:
    """`spec`'s ops split in the order they run: (once, per image, per batch).

    `once`: the leading `ONCE_OPS`, whose results can be kept; `per batch`: the
    trailing `PER_PIXEL_OPS`, applied to a batch of images at once; `per image`:
    the ops between. Applying the first two to each image and the last to the
    batch of their results gives the same images as `parse(spec)`.

    The training input stops before the per-batch ops: it hands its batches'
    images on as the per-image ops leave them (uint8 for most specs, a quarter
    of float32's bytes to copy), and the train step applies `batch_op(spec)` on
    the devices, where XLA fuses it into the model's first layer.
    """
    ops = parse_ops(spec)
    end = len(ops)
    while end > 0 and ops[end - 1][0] in PER_PIXEL_OPS:
        end -= 1
    begin = 0
    while begin < end and ops[begin][0] in ONCE_OPS:
        begin += 1
    return ops[:begin], ops[begin:end], ops[end:]


def batch_op(spec: str) -> Callable:
    """`spec`'s per-batch ops (see `stages`) as one function of a batch of images, NumPy or JAX: the
    images `jclip.data.pipeline.TrainInput` hands out, to what `parse(spec)` gives (the identity for none)."""
    ops = [op for _, op in stages(spec)[2]]

    def apply(images):
        for op in ops:
            images = naflex.map_patches(images, lambda pixels: op.values(pixels.astype(np.float32)))
        return images
    return apply


def batch_image_dtype(spec: str) -> np.dtype:
    """The dtype of the images `jclip.data.pipeline.TrainInput` hands out for `spec`: float32 when a per-pixel
    op comes before the end of the per-image ops, else the decoder's uint8."""
    once, per_image, _ = stages(spec)
    return np.dtype(np.float32 if any(name in PER_PIXEL_OPS for name, _ in once + per_image) else np.uint8)
