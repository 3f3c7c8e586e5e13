"""CoCa's caption loss, CatLIP's multi-label loss and CatLIP's vocabulary extraction."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import loss_checks
from jclip.data.vocabulary import build_vocabulary, caption_words, looks_like_noun, multi_hot
from jclip.losses.captioning import caption_loss
from jclip.losses.multi_label import catlip_loss

VOCAB, LENGTH, PAD = 7, 5, 0


def make_captions(batch, seed=0, real_lengths=None):
    """Logits `[batch, LENGTH, VOCAB]` and tokens: a start token, real ids, then PAD to the end."""
    rng = np.random.default_rng(seed)
    if real_lengths is None:
        real_lengths = rng.integers(1, LENGTH + 1, size=batch)
    tokens = np.full((batch, LENGTH), PAD, np.int32)
    for row, length in enumerate(real_lengths):
        tokens[row, :length] = rng.integers(1, VOCAB, size=length)
    return 2.0 * rng.normal(size=(batch, LENGTH, VOCAB)), tokens


def caption_reference(caption_logits, tokens, label_smoothing=0.0):
    """Mean over the non-pad targets tokens[i, t + 1] of the smoothed cross-entropy of logits[i, t]."""
    total, count = 0.0, 0
    batch, length, vocab = caption_logits.shape
    for i in range(batch):
        for t in range(length - 1):
            target = tokens[i, t + 1]
            if target == PAD:
                continue
            logits = caption_logits[i, t]
            log_probs = logits - np.log(np.sum(np.exp(logits)))
            smoothed = np.full(vocab, label_smoothing / vocab)
            smoothed[target] += 1.0 - label_smoothing
            total -= smoothed @ log_probs
            count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_caption_loss_matches_float64_reference(label_smoothing):
    caption_logits, tokens = make_captions(8)
    assert (tokens[:, 1:] == PAD).any() and (tokens[:, 1:] != PAD).any()
    loss_checks.assert_matches_reference(
        caption_loss, functools.partial(caption_reference, label_smoothing=label_smoothing),
        {"caption_logits": caption_logits, "tokens": tokens}, sharded=("caption_logits", "tokens"),
        label_smoothing=label_smoothing,
    )


def test_caption_loss_label_smoothing_is_optax():
    caption_logits, tokens = make_captions(8, seed=1, real_lengths=[LENGTH] * 8)
    targets = optax.smooth_labels(jax.nn.one_hot(tokens[:, 1:], VOCAB), 0.2)
    expected = jnp.mean(optax.softmax_cross_entropy(caption_logits[:, :-1], targets))
    loss_checks.assert_close(caption_loss(np.float32(caption_logits), tokens, label_smoothing=0.2), expected)


def test_caption_loss_sharded_equals_single_device():
    caption_logits, tokens = make_captions(16, seed=2)
    loss_checks.assert_sharded_equals_single_device(
        caption_loss, {"caption_logits": caption_logits, "tokens": tokens},
        sharded=("caption_logits", "tokens"), label_smoothing=0.1,
    )


def test_caption_loss_ignores_logits_without_a_target():
    caption_logits, tokens = make_captions(8, seed=3)
    no_target = np.concatenate([tokens[:, 1:] == PAD, np.ones((8, 1), bool)], axis=1)  # and the last position
    noise = 5.0 * np.random.default_rng(0).normal(size=caption_logits.shape)
    moved = np.where(no_target[..., None], caption_logits + noise, caption_logits)
    loss_checks.assert_close(caption_loss(np.float32(moved), tokens), caption_loss(np.float32(caption_logits), tokens))
    grad = jax.grad(caption_loss)(np.float32(caption_logits), tokens)
    assert np.all(grad[no_target] == 0) and np.all(np.any(grad[~no_target] != 0, axis=-1))


def test_caption_loss_all_pad_caption_adds_nothing():
    caption_logits, tokens = make_captions(8, seed=4)
    padded_logits = np.concatenate([caption_logits, make_captions(1, seed=5)[0]])
    padded_tokens = np.concatenate([tokens, np.full((1, LENGTH), PAD, np.int32)])
    loss_checks.assert_close(caption_loss(np.float32(padded_logits), padded_tokens),
                             caption_loss(np.float32(caption_logits), tokens))
    assert caption_loss(np.float32(padded_logits[-1:]), padded_tokens[-1:]) == 0.0  # no target at all


def test_caption_loss_normalises_by_the_global_token_count():
    # Device 0 holds short captions (2 targets each), device 1 full ones (4 targets each).
    caption_logits, tokens = make_captions(8, seed=6, real_lengths=[3] * 4 + [LENGTH] * 4)
    inputs = {"caption_logits": caption_logits, "tokens": tokens}
    loss_checks.assert_sharded_equals_single_device(
        caption_loss, inputs, sharded=("caption_logits", "tokens"), devices=(2,), modes=("shard_map",)
    )
    per_device_mean = np.mean([caption_reference(caption_logits[:4], tokens[:4]),
                               caption_reference(caption_logits[4:], tokens[4:])])
    assert abs(caption_reference(caption_logits, tokens) - per_device_mean) > 1e-2  # the check can tell


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: caption_loss(np.ones((2, 5)), np.ones((2, 5), np.int32)), r"3-D.*\(2, 5\)"),
        (lambda: caption_loss(np.ones((2, 5, 7)), np.ones((2, 4), np.int32)), r"agree.*\(2, 5, 7\).*\(2, 4\)"),
        (lambda: caption_loss(np.ones((2, 1, 7)), np.ones((2, 1), np.int32)), "at least 2 tokens"),
        (lambda: caption_loss(np.ones((2, 5, 7)), np.ones((2, 5))), "integer.*float"),
        (lambda: caption_loss(np.ones((2, 5, 7)), np.ones((2, 5), np.int32), label_smoothing=1.5), "1.5"),
    ],
)
def test_caption_loss_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def catlip_reference(class_logits, targets):
    """Σ over classes of the binary cross-entropy of σ(x) against y, averaged over the batch."""
    probability = 1.0 / (1.0 + np.exp(-class_logits))
    terms = targets * np.log(probability) + (1 - targets) * np.log(1 - probability)
    return -np.sum(terms) / len(class_logits)


def make_classes(batch, classes=6, seed=0):
    rng = np.random.default_rng(seed)
    return 2.0 * rng.normal(size=(batch, classes)), np.int8(rng.random((batch, classes)) < 0.3)


def test_catlip_loss_matches_float64_reference():
    class_logits, targets = make_classes(8)
    loss_checks.assert_matches_reference(catlip_loss, catlip_reference,
                                         {"class_logits": class_logits, "targets": targets},
                                         sharded=("class_logits", "targets"))


def test_catlip_loss_sharded_equals_single_device():
    class_logits, targets = make_classes(16, seed=1)
    loss_checks.assert_sharded_equals_single_device(
        catlip_loss, {"class_logits": class_logits, "targets": targets}, sharded=("class_logits", "targets")
    )


def test_catlip_loss_sums_over_classes_and_takes_any_target_dtype():
    class_logits, targets = make_classes(8, classes=10, seed=2)
    logits32 = np.float32(class_logits)
    value = catlip_loss(logits32, targets)
    per_element = optax.sigmoid_binary_cross_entropy(logits32, np.float32(targets))
    loss_checks.assert_close(value, jnp.sum(per_element) / 8)  # not the mean over batch and classes
    for dtype in (bool, np.int32, np.float32, jnp.bfloat16):
        loss_checks.assert_close(catlip_loss(logits32, targets.astype(dtype)), value)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: catlip_loss(np.ones((4, 6)), np.ones((4, 5))), r"same shape.*\(4, 6\).*\(4, 5\)"),
        (lambda: catlip_loss(np.ones(6), np.ones(6)), r"2-D.*\(6,\)"),
    ],
)
def test_catlip_loss_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


CAPTIONS = [
    "A dog sitting on a red couch.",
    "Two dogs and a cat in the park",
    "Puppies playing with a box and two boxes",
    "The cat is looking at the dog's ball",
    "A man with glasses holding a glass of water and a puppy",
    "Black pants on a chair",
]


def test_caption_words_are_lower_case_letter_runs():
    assert caption_words("A dog's T-shirt, 2 CATS!") == ["a", "dog", "s", "t", "shirt", "cats"]


def test_default_noun_test_drops_short_words_function_words_verbs_and_adjectives():
    kept = [w for w in caption_words("The big dog is sitting on a red car in an old park") if looks_like_noun(w)]
    assert kept == ["dog", "red", "car", "park"]


def test_build_vocabulary_counts_folds_plurals_and_sorts_by_count_then_word():
    # dog 3 (dog, dogs, dog), box 2 (box, boxes), cat 2, glass 2 (glasses, glass), puppy 2 (puppies, puppy),
    # then once each: ball, chair, couch, man, pants (no "pant" anywhere), park, red, water.
    assert build_vocabulary(CAPTIONS, min_count=2) == ["dog", "box", "cat", "glass", "puppy"]
    everything = build_vocabulary(CAPTIONS, min_count=1)
    assert everything[5:] == ["ball", "black", "chair", "couch", "man", "pants", "park", "red", "water"]
    assert build_vocabulary(CAPTIONS, min_count=1, max_size=3) == ["dog", "box", "cat"]
    assert build_vocabulary(CAPTIONS[::-1], min_count=1) == everything  # order of the captions is irrelevant
    assert build_vocabulary(CAPTIONS, min_count=4) == []


def test_build_vocabulary_takes_a_noun_list_or_predicate():
    assert build_vocabulary(CAPTIONS, min_count=1, is_noun=["cat", "dogs", "park"]) == ["cat", "dogs", "park"]
    assert build_vocabulary(CAPTIONS, min_count=1, is_noun={"cat", "dogs", "dog"}) == ["dog", "cat"]
    assert build_vocabulary(CAPTIONS, min_count=2, is_noun=lambda w: w.startswith("c")) == ["cat"]


def test_multi_hot_marks_each_caption_classes():
    vocabulary = ["dog", "box", "cat", "glass", "puppy"]
    expected = np.array([
        [1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [0, 1, 0, 0, 1],
        [1, 0, 1, 0, 0],
        [0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0],
    ], np.float32)
    targets = multi_hot(CAPTIONS, vocabulary)
    assert targets.dtype == np.float32
    np.testing.assert_array_equal(targets, expected)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: build_vocabulary("a dog", min_count=1), "sequence of strings"),
        (lambda: build_vocabulary(CAPTIONS, min_count=0), "min_count.*0"),
        (lambda: build_vocabulary(CAPTIONS, min_count=1, max_size=-1), "max_size.*-1"),
        (lambda: multi_hot("a dog", ["dog"]), "sequence of strings"),
        (lambda: multi_hot(CAPTIONS, ["dog", "cat", "dog"]), r"distinct.*\['dog'\]"),
    ],
)
def test_vocabulary_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
