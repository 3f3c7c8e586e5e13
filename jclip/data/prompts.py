"""Class names and prompt templates: turning class labels into text, for zero-shot classifiers and captions.

The template sets are those of Radford et al. 2021 (CLIP), as OpenAI published them
and OpenCLIP uses them: the 80 ImageNet templates, the 7-template subset CLIP selected
("simple"), and the 18 CIFAR templates. The ImageNet class names are CLIP's curated
names of the 1000 ILSVRC-2012 classes (in label order), which read far better in a
prompt than WordNet ids or synset lemmas.
"""

import functools
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


def templates(spec: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """The templates named `spec` (a key of TEMPLATES), or `spec` itself when it is a list of templates."""
    if isinstance(spec, str):
        if spec not in TEMPLATES:
            raise ValueError(f"unknown template set {spec!r}; use one of {sorted(TEMPLATES)} or a list of templates")
        return TEMPLATES[spec]
    spec = tuple(spec)
    bad = [t for t in spec if t.count("{}") != 1]
    if not spec or bad:
        raise ValueError(f"templates must each hold one '{{}}' for the class name; got {bad or spec}")
    return spec
