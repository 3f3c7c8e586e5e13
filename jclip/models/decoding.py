"""Beam search (and, with one beam, greedy decoding) over any autoregressive next-token model.

The model is a function `next_log_probs(tokens, position)`: token ids
[N, max_length] (the ones after `position` are padding and must not matter, as
under a causal mask) -> log-probabilities [N, vocab] of the token at
`position + 1`. Everything runs in one `lax.fori_loop`, so the search jits.
"""

from typing import Callable

import jax
import jax.numpy as jnp

NextLogProbs = Callable[[jax.Array, jax.Array], jax.Array]


def beam_search(next_log_probs: NextLogProbs, batch_size: int, *, max_length: int, beam_size: int, start_id: int,
                end_id: int, pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """The most probable sequences found: (token ids [batch_size, max_length], log-probabilities [batch_size]).

    Every sequence starts with `start_id`; a sequence ends at its first
    `end_id`, after which it holds `pad_id`s and keeps its score (the sum of its
    tokens' log-probabilities, no length penalty); one that never ends is cut
    at `max_length`. Each step keeps the `beam_size` best of all one-token
    extensions of the current beams, so `beam_size=1` is greedy decoding and a
    beam as large as the number of possible prefixes is exhaustive search.
    `next_log_probs` sees the beams of example b at rows b * beam_size ...
    (b + 1) * beam_size - 1.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (the start token and one more); got {max_length}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1; got {beam_size}")
    if end_id == pad_id:
        raise ValueError(f"end_id and pad_id must differ (padding marks finished sequences); both are {end_id}")
    tokens = jnp.full((batch_size, beam_size, max_length), pad_id, jnp.int32).at[:, :, 0].set(start_id)
    # One live beam at first, so that the beams do not start as copies of each other.
    scores = jnp.broadcast_to(jnp.where(jnp.arange(beam_size) == 0, 0.0, -jnp.inf), (batch_size, beam_size))
    finished = jnp.zeros((batch_size, beam_size), bool)

    def step(position, state):
        tokens, scores, finished = state
        log_probs = next_log_probs(tokens.reshape(batch_size * beam_size, max_length), position)
        log_probs = log_probs.astype(jnp.float32).reshape(batch_size, beam_size, -1)
        vocab = log_probs.shape[-1]
        # A finished beam has one continuation, padding, at no cost.
        padding_only = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf)
        log_probs = jnp.where(finished[..., None], padding_only, log_probs)
        candidates = (scores[..., None] + log_probs).reshape(batch_size, beam_size * vocab)
        scores, index = jax.lax.top_k(candidates, beam_size)
        parent, token = index // vocab, index % vocab
        tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1).at[:, :, position + 1].set(token)
        finished = jnp.take_along_axis(finished, parent, axis=1) | (token == end_id)
        return tokens, scores, finished

    tokens, scores, _ = jax.lax.fori_loop(0, max_length - 1, step, (tokens, scores, finished))
    best = jnp.argmax(scores, axis=1)
    rows = jnp.arange(batch_size)
    return tokens[rows, best], scores[rows, best]
