"""Class names and prompt templates: turning class labels into text, for zero-shot classifiers and captions.

The template sets are those of Radford et al. 2021 (CLIP), as OpenAI published them
and OpenCLIP uses them: the 80 ImageNet templates, the 7-template subset CLIP selected
("simple"), and the 18 CIFAR templates. The ImageNet class names are CLIP's curated
names of the 1000 ILSVRC-2012 classes (in label order), which read far better in a
prompt than WordNet ids or synset lemmas.

For the standard CLIP benchmark suite, each dataset's own templates (OpenAI's published prompts) and class
names come from LAION's CLIP_benchmark, with CLIP's curated names where CLIP_benchmark takes them from
torchvision (`benchmark_prompts.json`, which names its sources), selected by the dataset's CLIP_benchmark
name: `templates("cifar10")`, `dataset_class_names("vtab/cifar10")`.
"""

import functools
import json
import os
from typing import Sequence, Union

TEMPLATES = {
    "openai_imagenet": (
        'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
        'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
        'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
        'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.',
        'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
        'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
        'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
        'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
        'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
        'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.',
        'a photo of a {}.', 'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.',
        'a origami {}.', 'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
        'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
        'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.',
        'a embroidered {}.', 'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
        'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
        'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
        'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
        'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
        'a photo of a small {}.', 'a tattoo of the {}.',
    ),
    "simple": (
        'itap of a {}.', 'a bad photo of the {}.', 'a origami {}.', 'a photo of the large {}.',
        'a {} in a video game.', 'art of the {}.', 'a photo of the small {}.',
    ),
    "cifar": (
        'a photo of a {}.', 'a blurry photo of a {}.', 'a black and white photo of a {}.',
        'a low contrast photo of a {}.', 'a high contrast photo of a {}.', 'a bad photo of a {}.',
        'a good photo of a {}.', 'a photo of a small {}.', 'a photo of a big {}.', 'a photo of the {}.',
        'a blurry photo of the {}.', 'a black and white photo of the {}.', 'a low contrast photo of the {}.',
        'a high contrast photo of the {}.', 'a bad photo of the {}.', 'a good photo of the {}.',
        'a photo of the small {}.', 'a photo of the big {}.',
    ),
    "photo": ("a photo of a {}.",),
    "name": ("{}",),
}


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """CLIP's names of the 1000 ImageNet classes, in label order."""
    with open(os.path.join(os.path.dirname(__file__), "imagenet_classnames.txt"), encoding="utf-8") as f:
        return tuple(line.rstrip("\n") for line in f)


@functools.cache
def _benchmark_table() -> dict[str, dict[str, tuple[str, ...]]]:
    """benchmark_prompts.json by dataset; imagenet1k's class names are CLIP's (identical to CLIP_benchmark's)."""
    with open(os.path.join(os.path.dirname(__file__), "benchmark_prompts.json"), encoding="utf-8") as f:
        table = {name: {key: tuple(values) for key, values in entry.items()}
                 for name, entry in json.load(f).items() if not name.startswith("_")}
    table["imagenet1k"]["class_names"] = imagenet_class_names()
    return table


def benchmark_datasets() -> tuple[str, ...]:
    """The datasets with templates in CLIP_benchmark (as it names them: "cifar10", "cars", "imagenet1k", ...)."""
    return tuple(sorted(_benchmark_table()))


def _benchmark_entry(name: str) -> tuple[str, bool, dict]:
    """(the table's name, whether `name` reads TFDS's labels, its entry), found as CLIP_benchmark looks up
    templates: "wds/vtab/cifar10", "vtab/cifar10" and "cifar10" all find "cifar10"."""
    key = name.removeprefix("wds/")
    tfds_labels = key.startswith(("vtab/", "tfds/"))
    if tfds_labels:
        key = key.split("/", 1)[1]
    if key not in _benchmark_table():
        raise ValueError(f"unknown benchmark dataset {name!r}; CLIP_benchmark's are {', '.join(benchmark_datasets())} "
                         "(also as 'vtab/NAME', 'tfds/NAME', 'wds/...')")
    return key, tfds_labels, _benchmark_table()[key]


def dataset_templates(name: str) -> tuple[str, ...]:
    """CLIP_benchmark's templates for the dataset `name` ("cifar10", "vtab/cifar10", "wds/vtab/cifar10")."""
    return _benchmark_entry(name)[2]["templates"]


def dataset_class_names(name: str) -> tuple[str, ...]:
    """The class names of the dataset `name`, in the label order of CLIP_benchmark's loader for that name:
    torchvision's for a plain name, TFDS's (VTAB's) for "vtab/NAME" and "tfds/NAME", which differs for
    caltech101 and food101."""
    key, tfds_labels, entry = _benchmark_entry(name)
    names = (tfds_labels and entry.get("tfds_class_names")) or entry.get("class_names")
    if names is None:
        named = [n for n in benchmark_datasets() if "class_names" in _benchmark_table()[n]]
        raise ValueError(f"CLIP_benchmark has no class names for {key!r}: it uses the dataset's own; use those or "
                         f"give a list (datasets with class names: {', '.join(named)})")
    return names


def templates(spec: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """The templates named `spec` (a key of TEMPLATES, else a benchmark dataset's name, see
    `dataset_templates`), or `spec` itself when it is a list of templates."""
    if isinstance(spec, str):
        if spec in TEMPLATES:
            return TEMPLATES[spec]
        try:
            return dataset_templates(spec)
        except ValueError:
            raise ValueError(f"unknown template set {spec!r}; use one of {sorted(TEMPLATES)}, a benchmark dataset's "
                             f"name ({', '.join(benchmark_datasets())}) or a list of templates") from None
    spec = tuple(spec)
    bad = [t for t in spec if t.count("{}") != 1]
    if not spec or bad:
        raise ValueError(f"templates must each hold one '{{}}' for the class name; got {bad or spec}")
    return spec


def class_names(spec: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """The class names `spec` gives: CLIP's ImageNet names ("imagenet"), a benchmark dataset's (its name, see
    `dataset_class_names`), or `spec` itself when it is a list of names."""
    if isinstance(spec, str):
        if spec == "imagenet":
            return imagenet_class_names()
        try:
            return dataset_class_names(spec)
        except ValueError as error:
            raise ValueError(f"class_names={spec!r}: use 'dataset', 'imagenet', a benchmark dataset's name or a list "
                             f"of names ({error})") from None
    return tuple(str(name) for name in spec)
