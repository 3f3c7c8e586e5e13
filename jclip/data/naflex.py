"""NaFlex inputs: images at their own aspect ratio as padded sequences of patches within a token budget.

SigLIP 2's NaFlex variant (Tschannen et al. 2025, arXiv 2502.14786; after
NaViT, Dehghani et al. 2023) does not squash or crop images to a square. Each
image is resized, keeping its aspect ratio as nearly as whole patches allow,
to the largest grid of `patch_size` patches that fits `max_patches` (the token
budget), cut into those patches in row-major order, and padded with zero
patches to `max_patches`, so that images of any shape batch together. The ViT
(`jclip.models.vision`) gives each image position embeddings resized to its own
grid and masks the padding out of attention and pooling.

An image so prepared is a dict, the "patch input" that the image tower takes
in place of an `[H, W, 3]` array:

- `patches`: `[max_patches, patch_size, patch_size, 3]`, the image's patches
  first, then zeros;
- `grid`: int32 `[2]`, the (rows, columns) of its patch grid; the first
  rows * columns patches are the image's.

Batches stack both along a leading axis. The preprocessing op is
`naflex(patch_size, max_patches)` (`jclip.data.preprocess`); ops after it that
map pixel values (`value_range`, `clip_normalize`) map the patches.
"""

from typing import Any, Callable, Mapping, Sequence, Union

import jax
import numpy as np
import tensorflow as tf

# A patch input's keys (see above).
PATCHES, GRID = "patches", "grid"

# Steps of the search for the largest scale that fits the budget: the scale is found to 2^-40 of its range.
_SEARCH_STEPS = 40
_SMALLEST_SCALE, _LARGEST_SCALE = 1e-6, 1e4


def is_patch_input(images: Any) -> bool:
    """Whether `images` is a patch input (a mapping with "patches" and "grid") rather than an image array."""
    return isinstance(images, Mapping)


def map_patches(images: Any, function: Callable) -> Any:
    """`function` of the pixels: of an image array, or of a patch input's patches (its grid unchanged)."""
    if is_patch_input(images):
        return {**images, PATCHES: function(images[PATCHES])}
    return function(images)


def budget_grid(height: Union[int, tf.Tensor], width: Union[int, tf.Tensor], patch_size: int,
                max_patches: int) -> tf.Tensor:
    """The (rows, columns) int32 [2] patch grid of a `height` x `width` image under a budget of `max_patches`.

    The largest scale s (up or down) at which ceil(s * height / patch_size) *
    ceil(s * width / patch_size) <= max_patches, found by bisection; each side
    gets at least one patch. As SigLIP 2's NaFlex preprocessing, so that the
    grid keeps the aspect ratio up to the rounding to whole patches.
    """
    if max_patches < 1 or patch_size < 1:
        raise ValueError(f"naflex needs patch_size >= 1 and max_patches >= 1; got {patch_size} and {max_patches}")
    size = tf.cast(tf.stack([height, width]), tf.float64) / patch_size

    def grid_at(scale):
        return tf.maximum(tf.math.ceil(size * scale), 1.0)

    def step(low, high):
        middle = (low + high) / 2
        fits = tf.reduce_prod(grid_at(middle)) <= max_patches
        return tf.where(fits, middle, low), tf.where(fits, high, middle)

    low, _ = tf.while_loop(lambda low, high: True, step,
                           (tf.constant(_SMALLEST_SCALE, tf.float64), tf.constant(_LARGEST_SCALE, tf.float64)),
                           maximum_iterations=_SEARCH_STEPS)
    grid = grid_at(low)
    # A side of one patch at the smallest scale can still be too long for the budget: cap it.
    return tf.cast(tf.minimum(grid, float(max_patches)), tf.int32)


def patchify(image: tf.Tensor, patch_size: int, max_patches: int,
             resize: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]) -> dict[str, tf.Tensor]:
    """An image [H, W, 3] -> its patch input (see above): resized by `resize(image, [height, width])` to its
    `budget_grid` in pixels, cut into patches row by row, padded to `max_patches`."""
    grid = budget_grid(tf.shape(image)[0], tf.shape(image)[1], patch_size, max_patches)
    resized = resize(image, grid * patch_size)
    patches = tf.reshape(resized, [grid[0], patch_size, grid[1], patch_size, 3])
    patches = tf.reshape(tf.transpose(patches, [0, 2, 1, 3, 4]), [-1, patch_size, patch_size, 3])
    padding = tf.zeros([max_patches - tf.shape(patches)[0], patch_size, patch_size, 3], patches.dtype)
    patches = tf.ensure_shape(tf.concat([patches, padding], 0), [max_patches, patch_size, patch_size, 3])
    return {PATCHES: patches, GRID: grid}


def image_patches(image: np.ndarray, patch_size: int) -> dict[str, np.ndarray]:
    """An image [H, W, 3] whose sides are multiples of `patch_size` -> its patch input, without resizing or
    padding: the patches a fixed-resolution ViT's patch embedding sees, as NaFlex lays them out."""
    rows, columns = image.shape[0] // patch_size, image.shape[1] // patch_size
    if (rows * patch_size, columns * patch_size) != image.shape[:2]:
        raise ValueError(f"image sides {image.shape[:2]} are not multiples of patch_size={patch_size}")
    patches = image.reshape(rows, patch_size, columns, patch_size, 3).transpose(0, 2, 1, 3, 4)
    return {PATCHES: patches.reshape(-1, patch_size, patch_size, 3), GRID: np.array([rows, columns], np.int32)}


def padded(patch_input: Mapping[str, np.ndarray], max_patches: int) -> dict[str, np.ndarray]:
    """A patch input padded with zero patches to `max_patches` (a leading batch axis or none)."""
    patches = np.asarray(patch_input[PATCHES])
    count = patches.shape[-4]
    if count > max_patches:
        raise ValueError(f"{count} patches do not fit max_patches={max_patches}")
    widths = [(0, 0)] * patches.ndim
    widths[-4] = (0, max_patches - count)
    return {PATCHES: np.pad(patches, widths), GRID: np.asarray(patch_input[GRID], np.int32)}


def example(patch_size: int, max_patches: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """One all-padding patch input: the shapes and dtypes of a model input under `naflex(patch_size, max_patches)`."""
    return {PATCHES: np.zeros((max_patches, patch_size, patch_size, 3), dtype), GRID: np.zeros(2, np.int32)}



# Batches of model inputs, images or patch inputs alike (arrays, or dicts of arrays, with the examples first).

def row_count(inputs: Any) -> int:
    """The number of examples in a batch of model inputs."""
    return len(jax.tree.leaves(inputs)[0])


def stack(inputs: Sequence[Any]) -> Any:
    """One batch of the model inputs of single examples."""
    return jax.tree.map(lambda *rows: np.stack(rows), *inputs)


def pad_rows(inputs: Any, rows: int) -> Any:
    """A batch of model inputs with zero examples appended up to `rows`."""
    return jax.tree.map(lambda x: np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)]), inputs)
