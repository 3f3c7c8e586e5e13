"""CoCa: the tiny config runs, beam search is exact against exhaustive search, parity with OpenCLIP's CoCa.

The parity test needs the `torch` extra (torch, open_clip_torch) and is skipped
without it; it builds OpenCLIP's coca_ViT-B-32 with random weights (no download).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jclip import models
from jclip.convert import from_open_clip
from jclip.models.decoding import beam_search
from open_clip_support import assert_parity, random_open_clip

START, END, PAD = 1, 3, 0


@functools.lru_cache(maxsize=None)
def tiny_coca():
    """The `coca-test-micro` model, its variables and two images and captions (the second padded)."""
    model = models.create("coca-test-micro")
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
    tokens = rng.integers(4, 64, size=(2, 12)).astype(np.int32)
    tokens[:, 0], tokens[1, 6], tokens[1, 7:] = START, END, PAD
    variables = jax.jit(model.init)(jax.random.key(0), images, jnp.asarray(tokens))
    return model, variables, images, jnp.asarray(tokens)


def test_tiny_coca_outputs_have_the_contract_shapes_and_norms():
    model, variables, images, tokens = tiny_coca()
    out = jax.jit(model.apply)(variables, images, tokens)
    assert set(out) == {"zimg", "ztxt", "scale", "caption_logits"}
    assert out["zimg"].shape == out["ztxt"].shape == (2, 32)
    for z in (out["zimg"], out["ztxt"]):
        np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
    assert out["caption_logits"].shape == (2, 12, 64) and out["caption_logits"].dtype == jnp.float32
    assert float(out["scale"]) == pytest.approx(1 / 0.07, rel=1e-5)
    np.testing.assert_allclose(model.apply(variables, images, method=model.encode_image), out["zimg"], atol=1e-6)
    np.testing.assert_allclose(model.apply(variables, tokens, method=model.encode_text), out["ztxt"], atol=1e-6)


def test_caption_logits_are_causal():
    """Logits at position t depend on tokens <= t only, which teacher forcing and decoding rely on."""
    model, variables, images, tokens = tiny_coca()
    changed = tokens.at[:, 5].set(9)
    before, after = (jax.jit(model.apply)(variables, images, t)["caption_logits"] for t in (tokens, changed))
    np.testing.assert_allclose(before[:, :5], after[:, :5], rtol=1e-5, atol=1e-6)
    assert not np.allclose(before[:, 5:], after[:, 5:])


def markov_log_probs(vocab: int, max_length: int, seed: int):
    """A toy model: log p(next | prefix) depends on the position and the last two tokens."""
    table = jax.nn.log_softmax(jax.random.normal(jax.random.key(seed), (max_length, vocab, vocab, vocab)))

    def next_log_probs(tokens, position):
        last = jnp.take(tokens, position, axis=1)
        before = jnp.where(position > 0, jnp.take(tokens, jnp.maximum(position - 1, 0), axis=1), 0)
        return table[position, before, last]

    return next_log_probs, np.asarray(table)


def exhaustive_best(table, vocab: int, max_length: int):
    """The highest-scoring sequence over every sequence beam_search can produce, by enumeration."""
    best = (-np.inf, None)
    for length in range(1, max_length):
        for body in itertools.product(range(vocab), repeat=length):
            ends = [i for i, token in enumerate(body) if token == END]
            if (ends and ends[0] != length - 1) or (not ends and length < max_length - 1):
                continue  # continues past its end token, or ends early without the end token
            sequence = [START, *body]
            score = sum(table[t, sequence[t - 1] if t else 0, sequence[t], sequence[t + 1]] for t in range(length))
            if score > best[0]:
                best = (score, sequence + [PAD] * (max_length - 1 - length))
    return best


@pytest.mark.parametrize("seed", [1, 2, 5])
def test_beam_search_is_greedy_with_one_beam_and_exhaustive_with_enough(seed):
    vocab, max_length = 4, 5
    next_log_probs, table = markov_log_probs(vocab, max_length, seed)
    search = functools.partial(beam_search, next_log_probs, 1, max_length=max_length, start_id=START,
                               end_id=END, pad_id=PAD)
    greedy = [START]
    while len(greedy) < max_length and greedy[-1] != END:
        t = len(greedy) - 1
        greedy.append(int(np.argmax(table[t, greedy[t - 1] if t else 0, greedy[t]])))
    greedy += [PAD] * (max_length - len(greedy))
    tokens, _ = search(beam_size=1)
    assert tokens.tolist() == [greedy]
    want_score, want_tokens = exhaustive_best(table, vocab, max_length)
    tokens, score = search(beam_size=vocab ** (max_length - 2))
    assert tokens.tolist() == [want_tokens] and float(score[0]) == pytest.approx(want_score, rel=1e-5)


def test_beam_search_beats_greedy_on_a_toy_model():
    """The exhaustive test is only meaningful if beams find what greedy misses (seed 5: each wider beam does)."""
    next_log_probs, _ = markov_log_probs(4, 5, 5)
    scores = [float(beam_search(next_log_probs, 1, max_length=5, beam_size=k, start_id=START, end_id=END)[1][0])
              for k in (1, 2, 64)]
    assert scores[0] < scores[1] < scores[2]


def test_generate_stops_at_the_end_token():
    model, variables, images, _ = tiny_coca()
    logits = model.apply(variables, model.apply(variables, images, method=model.image_tokens),
                         jnp.full((2, 1), START, jnp.int32), method=model.caption_logits)
    end = int(np.argmax(logits[0, 0]))  # the first greedy token of image 0, made the end token
    for beam_size in (1, 3):
        generate = jax.jit(functools.partial(models.generate, model, max_length=8, start_id=START, end_id=end,
                                             beam_size=beam_size))
        tokens, scores = generate(variables, images)
        assert tokens.shape == (2, 8) and scores.shape == (2,)
        assert (tokens[:, 0] == START).all() and np.isfinite(scores).all()
        for row in np.asarray(tokens):
            if end in row:
                stop = list(row).index(end)
                assert (row[stop + 1:] == PAD).all()
    greedy = np.asarray(jax.jit(functools.partial(models.generate, model, max_length=8, start_id=START,
                                                  end_id=end))(variables, images)[0])
    assert greedy[0].tolist() == [START, end] + [PAD] * 6


def test_bad_generation_arguments_are_clear_errors():
    model, variables, images, _ = tiny_coca()
    with pytest.raises(ValueError, match="exceeds the text context length 12"):
        models.generate(model, variables, images, max_length=13, start_id=START, end_id=END)
    with pytest.raises(ValueError, match="end_id and pad_id must differ"):
        models.generate(model, variables, images, max_length=4, start_id=START, end_id=PAD)
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        models.generate(model, variables, images, max_length=4, start_id=START, end_id=END, beam_size=0)


@functools.lru_cache(maxsize=None)
def random_open_clip_coca():
    """OpenCLIP's coca_ViT-B-32 with random weights, its decoder projection initialised.

    OpenCLIP leaves `text_decoder.text_projection` as `torch.empty` (its
    `init_parameters` is never called), i.e. arbitrary memory.
    """
    torch, reference = random_open_clip("coca_ViT-B-32")
    with torch.no_grad():
        torch.nn.init.normal_(reference.text_decoder.text_projection, std=512**-0.5)
    return torch, reference


def test_converted_coca_matches_open_clip():
    torch, reference = random_open_clip_coca()
    params = from_open_clip(reference.state_dict(), "coca_ViT-B-32")
    model = models.create("coca_ViT-B-32")
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 3, 224, 224)).astype(np.float32)
    tokens = rng.integers(1, 49407, size=(2, 76))
    tokens[:, 0], tokens[0, 9], tokens[0, 10:] = 49406, 49407, 0  # start, end and padding, as a tokenizer writes
    with torch.no_grad():
        want = reference(torch.from_numpy(images), torch.from_numpy(tokens), output_labels=False)
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(images.transpose(0, 2, 3, 1)),
                               jnp.asarray(tokens, jnp.int32))
    assert_parity(got["zimg"], want["image_features"].numpy(), "image embeddings")
    assert_parity(got["ztxt"], want["text_features"].numpy(), "text embeddings")
    assert got["caption_logits"].shape == (2, 76, 49408)
    assert_parity(got["caption_logits"], want["logits"].numpy(), "caption logits")
    assert float(got["scale"]) == pytest.approx(float(want["logit_scale"]))
