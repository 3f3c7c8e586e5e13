"""`shapes`: a procedurally rendered image-caption dataset for testing compositional generalisation.

Each image shows one or two coloured shapes on a dark background, captioned
"a small red circle" or "a large blue star to the left of a small white cross".
Five shapes, seven colours and two sizes give 70 single-object descriptions, so
a contrastive model trained on it can be evaluated zero-shot exactly like on a
real classification benchmark, at a tiny fraction of the cost.

Five colour-shape combinations (`HELD_OUT`) never appear in the train and
validation splits, although each of their shapes and colours does appear with
other partners. The test split draws all 35 combinations uniformly, so
accuracy on its held-out objects measures whether the model composes attributes
it has only seen separately - the question compositionality benchmarks ask of
real CLIP models.

The dataset is a tfds builder: it is rendered offline on first use
(`prepare`), deterministically from a seed, and read with `tfds.load` like any
other tfds dataset. `prepare` also trains the BPE tokenizer on the train
captions and saves it beside the data (`tokenizer_path`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from jclip.data.bpe_tokenizer import Tokenizer

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "white")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")

# One combination per shape, each with a different colour; blue and white are never held out.
HELD_OUT = frozenset(
    (shape, COLOURS[(2 * k + 1) % len(COLOURS)]) for k, shape in enumerate(SHAPES)
)

# Clearly distinct hues, rows following COLOURS; channels stay in [12, 243] so jitter never clips.
COLOUR_RGB = np.array(
    [
        (225, 35, 35),  # red
        (243, 140, 15),  # orange
        (243, 228, 40),  # yellow
        (40, 190, 60),  # green
        (45, 95, 235),  # blue
        (155, 55, 215),  # purple
        (235, 235, 235),  # white
    ]
)

SPLITS = ("train", "validation", "test")
DEFAULT_DATA_DIR = os.environ.get(
    "JCLIP_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "jclip", "datasets")
)

_RELATION_PHRASES = ("to the left of", "to the right of", "above", "below")
_COLOUR_JITTER = 12  # per RGB channel, uniform in [-12, 12]
# Inclusive ranges of the objects' extent in pixels at 64 px, scaled linearly with the image size.
_DIAMETER_RANGE_AT_64PX = {"small": (16, 20), "large": (26, 30)}
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: crisp anti-aliased edges


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """Image size, split sizes and seed of one variant of the dataset."""

    image_size: int = 64
    num_train: int = 50_000
    num_validation: int = 2_000
    num_test: int = 5_000
    single_object_fraction: float = 0.5
    seed: int = 0

    def num_examples(self, split: str) -> int:
        sizes = {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}
        return sizes[split]


@functools.lru_cache(maxsize=None)
def _combinations(allow_held_out: bool) -> tuple[tuple[int, int], ...]:
    return tuple(
        (s, c)
        for s, shape in enumerate(SHAPES)
        for c, colour in enumerate(COLOURS)
        if allow_held_out or (shape, colour) not in HELD_OUT
    )


@functools.lru_cache(maxsize=None)
def shape_mask(shape: str, diameter: int) -> Image.Image:
    """Anti-aliased coverage of `shape` in a `diameter`-pixel square box, as a PIL "L" image."""
    n = diameter * _SUPERSAMPLE
    canvas = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse((0, 0, n - 1, n - 1), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, n - 1, n - 1), fill=255)
    elif shape == "triangle":
        draw.polygon([(n / 2, 0.05 * n), (n - 1, 0.95 * n), (0, 0.95 * n)], fill=255)
    elif shape == "star":
        outer, inner = n / 2, 0.42 * n / 2
        # The star spans 1.81 outer radii vertically: shift it down to centre it in the box.
        cx, cy = n / 2, n / 2 + 0.095 * outer
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, outer, inner)
        draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=255)
    elif shape == "cross":
        arm = 0.36 * n
        draw.rectangle((0, (n - arm) / 2, n - 1, (n + arm) / 2), fill=255)
        draw.rectangle(((n - arm) / 2, 0, (n + arm) / 2, n - 1), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return canvas.resize((diameter, diameter), Image.Resampling.BOX)


def _diameter(rng: np.random.Generator, size: int, image_size: int) -> int:
    low, high = _DIAMETER_RANGE_AT_64PX[SIZES[size]]
    scale = image_size / 64
    return int(rng.integers(round(low * scale), round(high * scale) + 1))


def _colour(rng: np.random.Generator, colour: int) -> tuple[int, int, int]:
    jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
    return tuple((COLOUR_RGB[colour] + jitter).tolist())


def _sample_object(
    rng: np.random.Generator, combinations: tuple[tuple[int, int], ...]
) -> tuple[int, int, int]:
    shape, colour = combinations[rng.integers(len(combinations))]
    return shape, colour, int(rng.integers(len(SIZES)))


def _describe(obj: tuple[int, int, int]) -> str:
    shape, colour, size = obj
    return f"a {SIZES[size]} {COLOURS[colour]} {SHAPES[shape]}"


def _offset_in(rng: np.random.Generator, start: int, extent: int, d: int, margin: int) -> int:
    """Uniform position of a `d`-wide object in [start, start + extent), `margin` from its edges."""
    low, high = start + margin, start + extent - margin - d
    return int(rng.integers(low, max(low, high) + 1))


def _positions(
    rng: np.random.Generator, diameters: list[int], relation: int | None, s: int
) -> list[tuple[int, int]]:
    """(top, left) of each object: one near the centre, or two in opposite halves.

    The halves are split along the relation's axis; object 1 is in the left /
    top half for "left of" / "above", in the right / bottom half otherwise.
    """
    jitter = 0.12 * s

    def near_centre(d: int) -> int:
        return round(s / 2 - d / 2 + rng.uniform(-jitter, jitter))

    if relation is None:
        (d,) = diameters
        return [(near_centre(d), near_centre(d))]
    half, margin = s // 2, s // 64
    name = RELATIONS[relation]
    starts = (0, half) if name in ("left of", "above") else (half, 0)
    positions = []
    for d, start in zip(diameters, starts):
        along, across = _offset_in(rng, start, half, d, margin), near_centre(d)
        positions.append((across, along) if name in ("left of", "right of") else (along, across))
    return positions


def render_example(
    rng: np.random.Generator,
    image_size: int = 64,
    allow_held_out: bool = False,
    single_object_fraction: float = 0.5,
) -> dict:
    """Draws one random example: the uint8 image [S, S, 3], its caption and its label fields.

    The fields are those of `Shapes` features; object 2 fields use the "none"
    class and `relation` is 0 ("none") in single-object images. The two objects
    of an image never have the same description.
    """
    s = image_size
    combinations = _combinations(allow_held_out)
    objects = [_sample_object(rng, combinations)]
    relation = None
    if rng.random() >= single_object_fraction:
        while (second := _sample_object(rng, combinations)) == objects[0]:
            pass
        objects.append(second)
        relation = int(rng.integers(len(RELATIONS)))

    background = int(rng.integers(0, 26))  # near-black, brightness varies per image
    image = Image.new("RGB", (s, s), (background,) * 3)
    diameters = [_diameter(rng, size, s) for _, _, size in objects]
    positions = _positions(rng, diameters, relation, s)
    for (shape, colour, _), d, (top, left) in zip(objects, diameters, positions):
        top, left = min(max(top, 0), s - d), min(max(left, 0), s - d)
        box = (left, top, left + d, top + d)
        image.paste(_colour(rng, colour), box, shape_mask(SHAPES[shape], d))

    caption = _describe(objects[0])
    if relation is not None:
        caption += f" {_RELATION_PHRASES[relation]} {_describe(objects[1])}"
    first = objects[0]
    none = (len(SHAPES), len(COLOURS), len(SIZES))  # the "none" class of each object-2 field
    second = objects[1] if relation is not None else none
    return {
        "image": np.asarray(image),
        "caption": caption,
        "num_objects": np.int32(len(objects)),
        "shape": first[0],
        "colour": first[1],
        "size": first[2],
        "relation": 0 if relation is None else relation + 1,
        "shape2": second[0],
        "colour2": second[1],
        "size2": second[2],
        "held_out": any((SHAPES[k], COLOURS[c]) in HELD_OUT for k, c, _ in objects),
    }


def _encode_png(image: np.ndarray) -> bytes:
    """PNG bytes, by PIL: twice as fast as tfds's TF-graph encoder, which dominated build time."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="png", compress_level=1)
    return buffer.getvalue()


class Shapes(tfds.core.GeneratorBasedBuilder):
    """tfds builder of the `shapes` dataset; every example is a function of (seed, split, index)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        ShapesConfig(name="default", description="64 px; 50k train, 2k validation, 5k test."),
        ShapesConfig(
            name="tiny",
            description="64 px; 512 train, 128 validation, 256 test; for tests.",
            num_train=512,
            num_validation=128,
            num_test=256,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(s, s, 3)),
                    "caption": tfds.features.Text(),
                    "num_objects": np.int32,
                    "shape": tfds.features.ClassLabel(names=SHAPES),
                    "colour": tfds.features.ClassLabel(names=COLOURS),
                    "size": tfds.features.ClassLabel(names=SIZES),
                    "relation": tfds.features.ClassLabel(names=("none",) + RELATIONS),
                    "shape2": tfds.features.ClassLabel(names=SHAPES + ("none",)),
                    "colour2": tfds.features.ClassLabel(names=COLOURS + ("none",)),
                    "size2": tfds.features.ClassLabel(names=SIZES + ("none",)),
                    "held_out": np.bool_,
                }
            ),
            disable_shuffling=True,  # stored in index order; examples are i.i.d. anyway
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # rendered locally, nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        config = self.builder_config
        for index in range(config.num_examples(split)):
            rng = np.random.default_rng([config.seed, SPLITS.index(split), index])
            example = render_example(
                rng,
                image_size=config.image_size,
                allow_held_out=split == "test",
                single_object_fraction=config.single_object_fraction,
            )
            yield index, {**example, "image": _encode_png(example["image"])}


def tokenizer_path(builder: tfds.core.DatasetBuilder) -> str:
    """Where `prepare` saves the tokenizer trained on this dataset's train captions."""
    return os.path.join(builder.data_dir, "tokenizer.json")


def _train_captions(builder: tfds.core.DatasetBuilder):
    dataset = builder.as_dataset(
        split="train", decoders=tfds.decode.PartialDecoding({"caption": True})
    )
    for batch in tfds.as_numpy(dataset.batch(4096)):
        yield from (caption.decode() for caption in batch["caption"])


def prepare(config_name: str = "default", data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Builds `shapes/{config_name}` and its tokenizer if missing; returns the builder. Offline.

    Safe to call from several processes at once on one machine: a file lock lets
    one of them build while the others wait, then all read the same files.
    """
    data_dir = data_dir or DEFAULT_DATA_DIR
    builder = Shapes(config=config_name, data_dir=data_dir)
    if builder.is_prepared() and os.path.exists(tokenizer_path(builder)):
        return builder
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".shapes-{config_name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        builder = Shapes(config=config_name, data_dir=data_dir)  # sees what another process built
        if not builder.is_prepared():
            print(f"Building shapes/{config_name} into {builder.data_dir}", flush=True)
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
        if not os.path.exists(tokenizer_path(builder)):
            Tokenizer.train(_train_captions(builder)).save(tokenizer_path(builder))
    return builder


def attribute_prompts() -> list[dict]:
    """The 70 single-object prompts with their labels, for zero-shot shape / colour / size."""
    return [
        {"prompt": _describe((shape, colour, size)), "shape": shape, "colour": colour, "size": size}
        for shape in range(len(SHAPES))
        for colour in range(len(COLOURS))
        for size in range(len(SIZES))
    ]
