"""Evaluation metrics against hand-computed cases: zero-shot ensembling, top-K, per-class recall,
linear probes, compositionality."""

import numpy as np
import pytest

from jclip.data import shapes
from jclip.evaluate.classification import (ensemble_prompts, mean_per_class_recall, per_class_accuracy,
                                           top_k_accuracy, zero_shot_classifier)
from jclip.evaluate.compositionality import compositionality, perturbed_captions
from jclip.evaluate.linear_probe import probe_accuracy, sample_shots


def test_prompt_ensembling_normalises_each_prompt_then_the_mean():
    prompts = np.array([[[3.0, 0.0], [0.0, 1.0]],     # class 0: two templates, different lengths
                        [[0.0, -2.0], [0.0, -5.0]]])  # class 1
    ensembled = ensemble_prompts(prompts)
    np.testing.assert_allclose(ensembled, [[np.sqrt(0.5), np.sqrt(0.5)], [0.0, -1.0]], atol=1e-12)
    with pytest.raises(ValueError, match=r"\[classes, templates, dim\], got shape \(2, 2\)"):
        ensemble_prompts(prompts[0])


def test_zero_shot_classifier_fills_every_template_with_every_class():
    seen = []

    def embed_texts(texts):
        seen.extend(texts)
        return np.array([[1.0, len(t)] for t in texts])

    classifier = zero_shot_classifier(embed_texts, ["cat", "horse"], ["a {}.", "a photo of a {}."])
    assert seen == ["a cat.", "a photo of a cat.", "a horse.", "a photo of a horse."]
    assert classifier.shape == (2, 2)
    np.testing.assert_allclose(np.linalg.norm(classifier, axis=1), 1.0)


def test_top_k_accuracy_and_ties():
    scores = np.array([[0.1, 0.9, 0.0],
                       [0.5, 0.5, 0.0],   # a tie: class 0 ranks first
                       [0.2, 0.3, 0.1]])
    labels = np.array([1, 1, 2])
    assert top_k_accuracy(scores, labels, ks=(1, 2, 3, 5)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}


def test_mean_per_class_recall_weighs_classes_equally():
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    predictions = np.array([0, 0, 0, 0, 0, 2, 1])
    assert mean_per_class_recall(predictions, labels, 3) == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    accuracy = per_class_accuracy(predictions, labels, 4)
    np.testing.assert_allclose(accuracy[:3], [1.0, 0.0, 0.5])
    assert np.isnan(accuracy[3])


def test_linear_probe_separates_separable_classes_and_samples_shots():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 4
    labels = rng.integers(0, 4, 400)
    features = centres[labels] + rng.normal(size=(400, 8))
    results = probe_accuracy(features[:300], labels[:300], features[300:], labels[300:], 4)
    assert results["best"] > 0.95
    noise = probe_accuracy(rng.normal(size=(300, 8)), labels[:300], features[300:], labels[300:], 4)
    assert noise["best"] < 0.6  # random features: near chance
    index = sample_shots(labels, 5, seed=1)
    assert np.all(np.bincount(labels[index]) == 5)
    assert not np.array_equal(index, sample_shots(labels, 5, seed=2))
    assert probe_accuracy(features[:300], labels[:300], features[300:], labels[300:], 4, shots=5)["best"] > 0.8


def test_compositionality_counts_a_win_only_when_the_true_caption_scores_higher():
    captions = ["a small red circle left of a large blue square", "a large green star above a small red cross"]
    attributes = (shapes.COLOURS, shapes.SIZES)
    swapped = perturbed_captions(captions, "swap_attributes", attributes)
    assert all(s != c and sorted(s.split()) == sorted(c.split()) for s, c in zip(swapped, captions))
    images = np.eye(4)[:2]

    def embed_texts(texts):  # caption 0 and its true text align with image 0; all perturbations with nothing
        return np.array([np.eye(4)[captions.index(t)] if t in captions else np.eye(4)[3] for t in texts])

    results = compositionality(images, captions, embed_texts, attributes, kinds=("swap_attributes", "swap_words"))
    assert results["swap_attributes"] == {"accuracy": 1.0, "count": 2}
    single = compositionality(images[:1], ["a small red circle"], embed_texts, attributes, kinds=("swap_attributes",))
    assert single["swap_attributes"]["count"] == 0  # one colour, one size: nothing to swap, left out

    bags = [sorted(c.split()) for c in captions]

    def bag_of_words(texts):  # the same embedding for every arrangement of the same words: ties never win
        return np.array([np.eye(4)[bags.index(sorted(t.split()))] for t in texts])

    assert compositionality(images, captions, bag_of_words, attributes)["swap_words"]["accuracy"] == 0.0
