"""Hard-negative captions made by perturbing the true one (NegCLIP, Yuksekgonul et al. 2023).

A model that reads captions as bags of words scores "a red circle left of a
blue square" and "a blue circle left of a red square" alike; training against
such perturbed captions, as extra negatives of their own image, teaches order
and binding. The perturbations here need no parser:

- `swap_attributes`: exchange two different words of the caption from one
  group of interchangeable attributes (two colours, two sizes): the binding
  test of ARO;
- `swap_words`: exchange two distinct words at random positions;
- `shuffle_trigrams`: cut the caption into word trigrams and shuffle them.

A perturbation that cannot change a caption (too short, fewer than two
attribute words) falls back to the next kind, and finally to `swap_words`.
Every choice is drawn from `np.random.default_rng([seed, index])`: the
negatives of an example are a function of its position in the stream.
"""

from typing import Sequence

import numpy as np

KINDS = ("swap_attributes", "swap_words", "shuffle_trigrams")


def _swap_random_pair(words: list[str], rng: np.random.Generator, swappable) -> list[str]:
    """`words` with one random pair (i, j) for which `swappable(i, j)` holds exchanged."""
    pairs = [(i, j) for i in range(len(words)) for j in range(i + 1, len(words)) if swappable(i, j)]
    if not pairs:
        return words
    i, j = pairs[rng.integers(len(pairs))]
    words = list(words)
    words[i], words[j] = words[j], words[i]
    return words


def _swap_attributes(words: list[str], rng: np.random.Generator, attributes: dict) -> list[str]:
    group = [attributes.get(w.lower()) for w in words]
    return _swap_random_pair(words, rng, lambda i, j: group[i] is not None and group[i] == group[j]
                             and words[i].lower() != words[j].lower())


def _swap_words(words: list[str], rng: np.random.Generator, attributes: dict) -> list[str]:
    return _swap_random_pair(words, rng, lambda i, j: words[i] != words[j])


def _shuffle_trigrams(words: list[str], rng: np.random.Generator, attributes: dict) -> list[str]:
    trigrams = [words[i:i + 3] for i in range(0, len(words), 3)]
    if len(trigrams) < 2:
        return words
    order = rng.permutation(len(trigrams))
    if (order == np.arange(len(trigrams))).all():
        order = np.roll(order, 1)
    return [w for k in order for w in trigrams[k]]


_PERTURB = {"swap_attributes": _swap_attributes, "swap_words": _swap_words, "shuffle_trigrams": _shuffle_trigrams}


def _check_kinds(kinds: Sequence[str]) -> None:
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown hard-negative kind(s) {sorted(unknown)}; use {list(KINDS)}")


def _vocabulary(attributes: Sequence[Sequence[str]]) -> dict[str, int]:
    return {word.lower(): group for group, words in enumerate(attributes) for word in words}


def perturb(caption: str, kind: str, *, seed: int, index: int, attributes: Sequence[Sequence[str]] = ()) -> str:
    """`caption` perturbed by `kind` alone, drawn from (seed, index); unchanged where `kind` cannot change it."""
    _check_kinds((kind,))
    rng = np.random.default_rng([seed, index])
    return " ".join(_PERTURB[kind](caption.split(), rng, _vocabulary(attributes)))


def hard_negatives(caption: str, kinds: Sequence[str], *, seed: int, index: int,
                   attributes: Sequence[Sequence[str]] = ()) -> list[str]:
    """One perturbed caption per entry of `kinds`, each different from `caption` where possible.

    `attributes` are groups of interchangeable words (colours, sizes, ...); `swap_attributes`
    exchanges two different words of one group.
    """
    _check_kinds(kinds)
    rng = np.random.default_rng([seed, index])
    vocabulary = _vocabulary(attributes)
    words = caption.split()
    negatives = []
    for kind in kinds:
        for attempt in (kind, *KINDS[KINDS.index(kind) + 1:], "swap_words"):
            perturbed = _PERTURB[attempt](words, rng, vocabulary)
            if perturbed != words:
                break
        negatives.append(" ".join(perturbed))
    return negatives
