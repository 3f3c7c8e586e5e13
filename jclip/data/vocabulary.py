"""CatLIP's class vocabulary: the frequent nouns of the captions, and multi-hot targets from it.

CatLIP (Mehta et al. 2024, arXiv 2404.15653) pre-trains an image model on image-text data as
multi-label classification: the classes are the nouns of the captions (the caption's words,
lemmatised with NLTK, that have a WordNet noun synset of their own, word.n.01) occurring at least
a threshold number of times, and an image's target is the set of classes in its caption
(`jclip.losses.multi_label.catlip_loss`).

This module does the same without NLTK's data files, in plain Python:

- words: a caption's lower-case runs of letters a-z ("A dog's T-shirt" → a, dog, s, t, shirt);
- nouns: by default `looks_like_noun`, an approximation: a word of at least 3 letters that is
  not in a built-in list of English function words, common verbs and common adjectives.
  Colour and material words stay (WordNet has nouns such as red.n.01 and glass.n.01, so CatLIP
  keeps them too); any other non-noun outside the lists passes as a noun. Pass `is_noun` (a predicate or a collection of
  nouns) to do better, for example with WordNet as CatLIP does:

      from nltk.corpus import wordnet   # after nltk.download("wordnet")

      def wordnet_noun(word):  # CatLIP's test, on the noun lemma (dogs -> dog)
          lemma = wordnet.morphy(word, wordnet.NOUN)
          return lemma is not None and any(s.name() == f"{lemma}.n.01" for s in wordnet.synsets(lemma, "n"))

      vocabulary = build_vocabulary(captions, min_count=500, is_noun=wordnet_noun)

  (CatLIP's classes are synsets, so synonyms share a class; here a class is a word.)
- plurals: a word ending in -s counts as its singular when the captions' nouns contain that
  singular: "-ies" → "-y" (puppies → puppy), then "-es" → "" (boxes → box, buses → bus), then
  "-s" → "" (dogs → dog, horses → horse), the first candidate found; "-ss" is never stripped
  (glass). A plural whose singular never occurs stays a class of its own (pants).
  `multi_hot` maps a word to its class the same way: its first singular candidate in the
  vocabulary, else the word itself if it is there.
"""

import collections
import numbers
import re
from typing import Callable, Collection, Iterable, Optional, Sequence, Union

import numpy as np

FUNCTION_WORDS = frozenset("""
    a an the this that these those there here some any each every all both either neither no none
    and or but nor so yet if then than because while when where which who whom whose what why how
    of in on at by for with without within into onto upon from to up down over under above below
    across along around behind beside besides between beyond near off out through toward towards
    about against among during after before since until via per like unlike
    i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
    myself yourself himself herself itself ourselves themselves one ones
    is are was were be been being am do does did done doing have has had having will would shall
    should can could may might must not also just only very too quite really still even ever never
    again already almost maybe perhaps often always sometimes together away back more most less
    least much many few several other another such same own else
    two three four five six seven eight nine ten first second third
""".split())

# Verb forms that are rarely nouns in captions (so not "park", "watch", "swing" or "building").
COMMON_VERBS = frozenset("""
    sit sits sitting sat stand stands standing stood hold holds holding held wear wears wearing
    wore worn eat eats eating ate eaten lie lying lay laying take takes taking took taken see sees
    seeing saw seen get gets getting got go goes going went gone come comes coming came carry
    carries carrying carried prepare preparing prepared surround surrounded surrounding contain
    contains containing appear appears appeared seem seems seemed include includes including
    included say says said find finds found give gives giving gave given keep keeps keeping kept
    let lets put puts putting think thought want wanted need needed create created creating
    graze grazing
    looking looked walking walked playing played riding rode flying flew running ran parked making
    made covered showing showed shown using used waiting staying watching watched posing posed
    placed displayed displaying hanging hung lined throwing threw thrown catching caught swinging
    smiling smiled talking talked driving drove driven pulling pulled pushing pushed leaning
    leaned topped selling sold reading fixing trying featuring featured designed filled
""".split())

# Adjectives of captions; colours and materials stay (WordNet has red.n.01 and glass.n.01).
COMMON_ADJECTIVES = frozenset("""
    big small large little tiny huge giant tall short long high low wide narrow thick thin heavy
    old young new modern ancient good bad great nice beautiful pretty cute lovely ugly happy sad
    full empty open closed clean dirty wet dry hot cold warm cool fresh ripe raw cooked different
    various single double next last front rear left right top bottom upper lower inside outside
    middle close far early late busy quiet fast slow hard soft real fake free simple plain fancy
    colorful colourful dark bright shiny clear sunny cloudy snowy rainy wooden outdoor indoor
    vintage abstract isolated professional famous best better worst available possible male female
""".split())

NOT_NOUNS = FUNCTION_WORDS | COMMON_VERBS | COMMON_ADJECTIVES

NounTest = Union[Callable[[str], bool], Collection[str]]


def caption_words(caption: str) -> list[str]:
    """The caption's lower-case words: its runs of letters a-z."""
    return re.findall(r"[a-z]+", caption.lower())


def looks_like_noun(word: str) -> bool:
    """The default noun test: at least 3 letters and not a listed function word, verb or adjective."""
    return len(word) >= 3 and word.isalpha() and word not in NOT_NOUNS


def singular_candidates(word: str) -> list[str]:
    """The singulars a plural-looking word might have, in the order they are tried."""
    if not word.endswith("s") or word.endswith("ss"):
        return []
    candidates = []
    if word.endswith("ies") and len(word) > 4:
        candidates.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        candidates.append(word[:-2])
    candidates.append(word[:-1])
    return candidates


def _singular_in(word: str, known: Collection[str]) -> str:
    """`word`'s first singular candidate in `known`, else `word` itself."""
    return next((c for c in singular_candidates(word) if c in known), word)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_captions(captions):
    if isinstance(captions, str):
        raise ValueError(f"captions must be a sequence of strings, not one string; got {captions[:40]!r}")


def build_vocabulary(captions: Iterable[str], *, min_count: int, max_size: Optional[int] = None,
                     is_noun: NounTest = looks_like_noun) -> list[str]:
    """The nouns occurring at least `min_count` times in `captions`, most frequent first.

    Every occurrence counts (a word twice in one caption counts twice); plurals count towards
    their singular (see the module docstring). Ties are broken alphabetically, so the result is
    a function of the captions alone.

    Args:
      captions: the captions, strings.
      min_count: the threshold, a positive int (CatLIP keeps synsets seen at least 500 times in
        DataComp-1.3B).
      max_size: keep at most this many of the most frequent nouns; None keeps all.
      is_noun: a predicate on a lower-case word, or a collection of nouns; `looks_like_noun` by
        default.

    Returns:
      The vocabulary, a list of words whose position is the class index.
    """
    _check_captions(captions)
    if not _is_int(min_count) or min_count < 1:
        raise ValueError(f"min_count must be a positive int; got {min_count!r}")
    if max_size is not None and (not _is_int(max_size) or max_size < 0):
        raise ValueError(f"max_size must be None or a non-negative int; got {max_size!r}")
    if not callable(is_noun):
        is_noun = frozenset(is_noun).__contains__
    counts = collections.Counter(w for caption in captions for w in caption_words(caption) if is_noun(w))
    folded = collections.Counter()
    for word, count in counts.items():
        folded[_singular_in(word, counts)] += count
    frequent = sorted((w for w, c in folded.items() if c >= min_count), key=lambda w: (-folded[w], w))
    return frequent if max_size is None else frequent[:max_size]


def multi_hot(captions: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
    """`[n, C]` float32 targets: row i is 1 at the classes of the words of caption i, else 0.

    A word's class is its first singular candidate in `vocabulary` (dogs → dog), else the word
    itself if it is there; words of no class are ignored.
    """
    _check_captions(captions)
    index = {word: k for k, word in enumerate(vocabulary)}
    if len(index) != len(vocabulary):
        repeated = sorted(w for w, c in collections.Counter(vocabulary).items() if c > 1)
        raise ValueError(f"vocabulary words must be distinct; repeated: {repeated[:10]}")
    targets = np.zeros((len(captions), len(vocabulary)), np.float32)
    for row, caption in enumerate(captions):
        for word in caption_words(caption):
            word_class = _singular_in(word, index)
            if word_class in index:
                targets[row, index[word_class]] = 1.0
    return targets
