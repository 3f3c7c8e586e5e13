"""dcl_loss, hard_negative_clip_loss, negclip_loss and mochi_loss: float64 references, sharding,
the special cases that reduce to clip_loss, input checks."""

import jax
import numpy as np
import pytest

from jclip.losses.decoupled import dcl_loss
from jclip.losses.hard_negatives import hard_negative_clip_loss, mochi_loss, mochi_mixing, negclip_loss
from jclip.losses.softmax import clip_loss
from loss_checks import assert_close, assert_matches_reference, assert_sharded_equals_single_device

BATCH, SHARDED_BATCH, DIM, NEGATIVES = 8, 16, 4, 2
SHARDED = ("zimg", "ztxt")  # the batch inputs


def unit_pairs(batch, seed=0):
    """Unit image and text embeddings, each caption correlated with its image."""
    rng = np.random.default_rng(seed)
    x, noise = rng.normal(size=(2, batch, DIM))
    y = x + 0.8 * noise
    return tuple(z / np.linalg.norm(z, axis=1, keepdims=True) for z in (x, y))


def negative_captions(ztxt, seed=1):
    """`[B, K, dim]` unit negatives near each caption (as attribute-swapped captions are) and a mask."""
    rng = np.random.default_rng(seed)
    negatives = ztxt[:, None, :] + 0.7 * rng.normal(size=(len(ztxt), NEGATIVES, DIM))
    mask = rng.random((len(ztxt), NEGATIVES)) < 0.7
    return negatives / np.linalg.norm(negatives, axis=2, keepdims=True), mask


def logsumexp(values):
    values = np.asarray(values)
    return values.max() + np.log(np.sum(np.exp(values - values.max())))


def clip_value_and_grads(zimg, ztxt, scale):
    return jax.value_and_grad(clip_loss, argnums=(0, 1, 2))(np.float32(zimg), np.float32(ztxt), np.float32(scale))


# ---------------------------------------------------------------------------------------------
# Decoupled contrastive loss


def dcl_reference(weight_sigma, weights_from=None):
    """DCL / DCLW written out; `weights_from`: compute w from these fixed embeddings instead (no gradient)."""

    def reference(zimg, ztxt, scale):
        batch = len(zimg)
        logit = scale * zimg @ ztxt.T
        weight = np.ones(batch)
        if weight_sigma is not None:
            x, y = weights_from if weights_from is not None else (zimg, ztxt)
            similarity = np.sum(x * y, axis=1)
            weight = 2 - np.exp(similarity / weight_sigma) / np.mean(np.exp(similarity / weight_sigma))
        total = 0.0
        for i in range(batch):
            others = [j for j in range(batch) if j != i]
            total += -weight[i] * logit[i, i] + logsumexp(logit[i, others])  # image i against other captions
            total += -weight[i] * logit[i, i] + logsumexp(logit[others, i])  # caption i against other images
        return total / (2 * batch)

    return reference


@pytest.mark.parametrize("weight_sigma", [None, 0.5])
def test_dcl_matches_reference(weight_sigma):
    zimg, ztxt = unit_pairs(BATCH)
    inputs = {"zimg": zimg, "ztxt": ztxt, "scale": np.float64(5.0)}
    assert_matches_reference(dcl_loss, dcl_reference(weight_sigma), inputs, sharded=SHARDED,
                             weight_sigma=weight_sigma)


def test_dclw_weight_carries_gradient():
    # The reference implementation differentiates the weight; one that stops its gradient would
    # give the same value, and the gradient comparison must tell them apart.
    zimg, ztxt = unit_pairs(BATCH)
    inputs = {"zimg": zimg, "ztxt": ztxt, "scale": np.float64(5.0)}
    with pytest.raises(AssertionError):
        assert_matches_reference(dcl_loss, dcl_reference(0.5, weights_from=(zimg, ztxt)), inputs,
                                 sharded=SHARDED, weight_sigma=0.5)


def test_dcl_differs_from_infonce():
    zimg, ztxt = (np.float32(z) for z in unit_pairs(BATCH))
    assert abs(dcl_loss(zimg, ztxt, 5.0) - clip_loss(zimg, ztxt, 5.0)) > 0.05


def test_dclw_sharded_equals_single_device():
    # The weighted loss: its global mean of exp(s_kk / σ) on top of DCL's gathered negatives.
    zimg, ztxt = unit_pairs(SHARDED_BATCH)
    inputs = {"zimg": zimg, "ztxt": ztxt, "scale": np.float32(5.0)}
    assert_sharded_equals_single_device(dcl_loss, inputs, sharded=("zimg", "ztxt"), weight_sigma=0.5)


# ---------------------------------------------------------------------------------------------
# Importance-weighted hard negatives


def negative_mass(logit, beta, tau_plus):
    """Ng_i of every row of `logit` before the clamp: the weighted, debiased mass of its negatives."""
    batch = len(logit)
    count = batch - 1
    mass = np.zeros(batch)
    for i in range(batch):
        negatives = np.array([logit[i, j] for j in range(batch) if j != i])
        weight = np.exp(beta * negatives) / np.sum(np.exp(beta * negatives))
        mass[i] = (count * np.sum(weight * np.exp(negatives)) - tau_plus * count * np.exp(logit[i, i])) / (1 - tau_plus)
    return mass


def hard_negative_reference(beta, tau_plus):
    def reference(zimg, ztxt, scale):
        batch = len(zimg)
        floor = (batch - 1) * np.exp(-scale)
        total = 0.0
        for logit in (scale * zimg @ ztxt.T, scale * ztxt @ zimg.T):
            mass = np.maximum(negative_mass(logit, beta, tau_plus), floor)
            total += np.sum(-np.diag(logit) + np.log(np.exp(np.diag(logit)) + mass))
        return total / (2 * batch)

    return reference


@pytest.mark.parametrize("beta, tau_plus, scale", [(0.5, 0.0, 5.0), (1.0, 0.05, 8.0), (0.5, 0.1, 50.0)])
def test_hard_negative_matches_reference(beta, tau_plus, scale):
    zimg, ztxt = unit_pairs(BATCH)
    inputs = {"zimg": zimg, "ztxt": ztxt, "scale": np.float64(scale)}
    assert_matches_reference(hard_negative_clip_loss, hard_negative_reference(beta, tau_plus), inputs,
                             sharded=SHARDED, beta=beta, tau_plus=tau_plus)


def test_hard_negative_test_data_exercises_the_clamp():
    # With τ⁺ = 0.05 at scale 8 the debiased mass falls below the clamp on some rows only, so the
    # reference comparison above checks both branches.
    zimg, ztxt = unit_pairs(BATCH)
    clamped = negative_mass(8.0 * zimg @ ztxt.T, 1.0, 0.05) < (BATCH - 1) * np.exp(-8.0)
    assert 0 < clamped.sum() < BATCH


def test_hard_negative_without_weighting_is_clip_loss():
    zimg, ztxt = unit_pairs(BATCH)
    for scale in (5.0, 100.0):  # a large scale must not overflow
        value, grads = jax.value_and_grad(
            lambda *a: hard_negative_clip_loss(*a, beta=0.0, tau_plus=0.0), argnums=(0, 1, 2)
        )(np.float32(zimg), np.float32(ztxt), np.float32(scale))
        assert_close((value, grads), clip_value_and_grads(zimg, ztxt, scale), rtol=1e-5)


def test_hard_negative_weighting_changes_the_loss():
    zimg, ztxt = (np.float32(z) for z in unit_pairs(BATCH))
    plain, weighted = (hard_negative_clip_loss(zimg, ztxt, 5.0, beta=beta) for beta in (0.0, 1.0))
    assert weighted > plain + 0.05  # hard negatives weigh more: larger denominator


def test_hard_negative_sharded_equals_single_device():
    zimg, ztxt = unit_pairs(SHARDED_BATCH)
    inputs = {"zimg": zimg, "ztxt": ztxt, "scale": np.float32(8.0)}
    assert_sharded_equals_single_device(hard_negative_clip_loss, inputs, sharded=("zimg", "ztxt"),
                                        beta=1.0, tau_plus=0.05)


# ---------------------------------------------------------------------------------------------
# NegCLIP


def negclip_reference(zimg, ztxt, scale, negative_ztxt, negative_mask):
    batch, count = negative_mask.shape
    negatives = [negative_ztxt[r, k] for r in range(batch) for k in range(count) if negative_mask[r, k]]
    total = 0.0
    for i in range(batch):
        positive = scale * zimg[i] @ ztxt[i]
        image_to_text = [scale * zimg[i] @ ztxt[j] for j in range(batch)] + [scale * zimg[i] @ n for n in negatives]
        text_to_image = [scale * ztxt[i] @ zimg[j] for j in range(batch)]
        total += logsumexp(image_to_text) - positive + logsumexp(text_to_image) - positive
    return total / (2 * batch)


def negclip_inputs(batch):
    zimg, ztxt = unit_pairs(batch)
    negative_ztxt, negative_mask = negative_captions(ztxt)
    return {"zimg": zimg, "ztxt": ztxt, "scale": np.float64(5.0), "negative_ztxt": negative_ztxt,
            "negative_mask": negative_mask}


def test_negclip_matches_reference():
    inputs = negclip_inputs(BATCH)
    assert 0 < inputs["negative_mask"].sum() < inputs["negative_mask"].size  # some negatives are missing
    assert_matches_reference(negclip_loss, negclip_reference, inputs,
                             sharded=("zimg", "ztxt", "negative_ztxt", "negative_mask"))


def test_negclip_without_mask_keeps_every_negative():
    inputs = negclip_inputs(BATCH)
    args = [inputs[k] for k in ("zimg", "ztxt", "scale", "negative_ztxt")]
    everything = np.ones((BATCH, NEGATIVES), bool)
    assert_close(negclip_loss(*(np.float32(a) for a in args)), negclip_reference(*args, everything))


def test_negclip_masked_negatives_have_no_effect():
    inputs = negclip_inputs(BATCH)
    mask = inputs["negative_mask"]
    moved = np.where(mask[..., None], inputs["negative_ztxt"], inputs["zimg"][:, None, :])  # hardest possible
    args = [np.float32(inputs[k]) for k in ("zimg", "ztxt", "scale")]
    assert_close(negclip_loss(*args, np.float32(moved), negative_mask=mask),
                 negclip_loss(*args, np.float32(inputs["negative_ztxt"]), negative_mask=mask), rtol=1e-6)
    assert negclip_loss(*args, np.float32(moved)) > negclip_loss(*args, np.float32(inputs["negative_ztxt"]))


@pytest.mark.parametrize("case", ["no negatives", "all masked"])
def test_negclip_without_negatives_is_clip_loss(case):
    zimg, ztxt = unit_pairs(BATCH)
    negative_ztxt, mask = negative_captions(ztxt)
    if case == "no negatives":
        negative_ztxt, mask = negative_ztxt[:, :0], None
    else:
        mask = np.zeros_like(mask)
    value, grads = jax.value_and_grad(
        lambda *a: negclip_loss(*a, np.float32(negative_ztxt), negative_mask=mask), argnums=(0, 1, 2)
    )(np.float32(zimg), np.float32(ztxt), np.float32(5.0))
    assert_close((value, grads), clip_value_and_grads(zimg, ztxt, 5.0), rtol=1e-6)


def test_negclip_sharded_equals_single_device():
    inputs = negclip_inputs(SHARDED_BATCH)
    assert_sharded_equals_single_device(negclip_loss, inputs,
                                        sharded=("zimg", "ztxt", "negative_ztxt", "negative_mask"))


# ---------------------------------------------------------------------------------------------
# MoCHi

MOCHI = {"hardest": 4, "mixed": 3, "mixed_with_query": 2}
draw = jax.jit(mochi_mixing, static_argnames=("hardest", "mixed", "mixed_with_query"))


def mochi_reference(key, synthetic_from, hardest, mixed, mixed_with_query):
    """MoCHi written out, with `mochi_mixing`'s random draws for `key`.

    The synthetic negatives carry no gradient: they are built from the fixed embeddings
    `synthetic_from`, so that the finite differences of the reference see them as constants.
    """
    batch = len(synthetic_from[0])
    draws = [[np.asarray(a) for a in draw(jax.random.fold_in(key, direction), np.arange(batch),
                                            hardest=hardest, mixed=mixed, mixed_with_query=mixed_with_query)]
             for direction in (0, 1)]

    def reference(zimg, ztxt, scale, key):  # the draws above come from this key
        frozen_img, frozen_txt = synthetic_from
        total = 0.0
        directions = ((zimg, ztxt, frozen_img, frozen_txt), (ztxt, zimg, frozen_txt, frozen_img))
        for (queries, keys, frozen_queries, frozen_keys), (pairs, alpha, partners, beta) in zip(directions, draws):
            for i in range(batch):
                similarity = frozen_queries[i] @ frozen_keys.T
                ranked = [j for j in np.argsort(-similarity) if j != i][:hardest]  # most similar first
                hard = frozen_keys[ranked]
                synthetic = [alpha[i, k] * hard[pairs[i, k, 0]] + (1 - alpha[i, k]) * hard[pairs[i, k, 1]]
                             for k in range(mixed)]
                synthetic += [beta[i, k] * frozen_queries[i] + (1 - beta[i, k]) * hard[partners[i, k]]
                              for k in range(mixed_with_query)]
                logits = [scale * queries[i] @ keys[j] for j in range(batch)]
                logits += [scale * queries[i] @ (h / np.linalg.norm(h)) for h in synthetic]
                total += logsumexp(logits) - scale * queries[i] @ keys[i]
        return total / (2 * batch)

    return reference


def mochi_inputs(batch, seed=0):
    zimg, ztxt = unit_pairs(batch, seed)
    return {"zimg": zimg, "ztxt": ztxt, "scale": np.float64(8.0), "key": np.asarray(jax.random.PRNGKey(seed))}


def test_mochi_matches_reference():
    inputs = mochi_inputs(BATCH)
    reference = mochi_reference(inputs["key"], (inputs["zimg"], inputs["ztxt"]), **MOCHI)
    assert_matches_reference(mochi_loss, reference, inputs, sharded=SHARDED, **MOCHI)


def test_mochi_synthetic_negatives_carry_no_gradient():
    # A reference that differentiates through the synthetic negatives has the same value but other
    # gradients; the comparison must see it.
    inputs = mochi_inputs(BATCH)
    frozen = mochi_reference(inputs["key"], (inputs["zimg"], inputs["ztxt"]), **MOCHI)

    def differentiated(zimg, ztxt, scale, key):
        return mochi_reference(key, (zimg, ztxt), **MOCHI)(zimg, ztxt, scale, key)

    assert differentiated(**inputs) == pytest.approx(frozen(**inputs), rel=1e-12)
    with pytest.raises(AssertionError):
        assert_matches_reference(mochi_loss, differentiated, inputs, sharded=SHARDED, **MOCHI)


def test_mochi_mixing_draws():
    key = jax.random.PRNGKey(3)
    options = {"hardest": 5, "mixed": 6, "mixed_with_query": 4}
    pairs, alpha, partners, beta = (np.asarray(a) for a in draw(key, np.arange(64), **options))
    assert pairs.shape == (64, 6, 2) and partners.shape == (64, 4)
    assert np.all(pairs[..., 0] != pairs[..., 1]) and set(np.unique(pairs)) == set(range(5))
    assert set(np.unique(partners)) == set(range(5))
    assert 0 <= alpha.min() and alpha.max() < 1 and 0.4 < alpha.mean() < 0.6
    assert 0 <= beta.min() and beta.max() < 0.5 and 0.2 < beta.mean() < 0.3
    # A row's draws depend on the key and the global row only: what makes sharding exact.
    reversed_rows = draw(key, np.arange(64)[::-1], **options)
    assert_close(reversed_rows, tuple(a[::-1] for a in (pairs, alpha, partners, beta)), rtol=0)
    typed = draw(jax.random.key(3), np.arange(64), **options)
    assert_close(typed, (pairs, alpha, partners, beta), rtol=0)
    other = draw(jax.random.PRNGKey(4), np.arange(64), **options)
    assert not np.allclose(other[1], alpha)


def test_mochi_without_mixing_is_clip_loss():
    zimg, ztxt = unit_pairs(BATCH)
    value, grads = jax.value_and_grad(
        lambda *a: mochi_loss(*a, jax.random.key(0), hardest=3, mixed=0, mixed_with_query=0), argnums=(0, 1, 2)
    )(np.float32(zimg), np.float32(ztxt), np.float32(5.0))
    assert_close((value, grads), clip_value_and_grads(zimg, ztxt, 5.0), rtol=1e-6)


def test_mochi_accepts_raw_and_typed_keys():
    zimg, ztxt = (np.float32(z) for z in unit_pairs(BATCH))
    loss = jax.jit(lambda key: mochi_loss(zimg, ztxt, 5.0, key, **MOCHI))
    assert loss(jax.random.PRNGKey(1)) == loss(jax.random.key(1)) != loss(jax.random.key(2))


def test_mochi_sharded_equals_single_device():
    # The draws depend on the global row: drawing by local row would fail on 2 and 8 devices.
    inputs = mochi_inputs(SHARDED_BATCH)
    assert_sharded_equals_single_device(mochi_loss, inputs, sharded=("zimg", "ztxt"), **MOCHI)


# ---------------------------------------------------------------------------------------------
# Input checks

X, Y = np.ones((4, 8)), np.ones((4, 8))
KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dcl_loss(X, np.ones((4, 7)), 1.0), r"\(4, 8\).*\(4, 7\)"),
        (lambda: dcl_loss(X, Y, 1.0, weight_sigma=0.0), "weight_sigma.*positive.*0.0"),
        (lambda: dcl_loss(X[:1], Y[:1], 1.0), "at least 2.*1"),
        (lambda: dcl_loss(X, Y, np.ones(2)), r"scale.*\(2,\)"),
        (lambda: hard_negative_clip_loss(X, Y, 1.0, beta=-1.0), "beta.*>= 0.*-1.0"),
        (lambda: hard_negative_clip_loss(X, Y, 1.0, beta=0.5, tau_plus=1.0), r"tau_plus.*\[0, 1\).*1.0"),
        (lambda: hard_negative_clip_loss(X, Y, 1.0, beta=0.5, tau_plus=-0.1), "tau_plus.*-0.1"),
        (lambda: hard_negative_clip_loss(X[:1], Y[:1], 1.0, beta=0.5), "at least 2"),
        (lambda: negclip_loss(X, Y, 1.0, np.ones((4, 8))), r"negative_ztxt.*\[4, K, 8\].*\(4, 8\)"),
        (lambda: negclip_loss(X, Y, 1.0, np.ones((3, 2, 8))), r"negative_ztxt.*\(3, 2, 8\)"),
        (lambda: negclip_loss(X, Y, 1.0, np.ones((4, 2, 7))), r"negative_ztxt.*\(4, 2, 7\)"),
        (lambda: negclip_loss(X, Y, 1.0, np.ones((4, 2, 8)), negative_mask=np.ones((4, 3), bool)),
         r"negative_mask.*\(4, 2\).*\(4, 3\)"),
        (lambda: negclip_loss(X, Y, 1.0, np.ones((4, 2, 8)), negative_mask=np.ones((4, 2))), "negative_mask.*bool"),
        (lambda: mochi_loss(X, Y, 1.0, KEY, hardest=0, mixed=1), "hardest.*2.*3.*got 0"),
        (lambda: mochi_loss(X, Y, 1.0, KEY, hardest=4, mixed=1), "hardest.*3 negatives.*got 4"),
        (lambda: mochi_loss(X, Y, 1.0, KEY, hardest=1, mixed=1), "hardest.*from 2.*got 1"),
        (lambda: mochi_loss(X, Y, 1.0, KEY, hardest=2, mixed=-1), "mixed.*non-negative.*-1"),
        (lambda: mochi_loss(X, Y, 1.0, KEY, hardest=2, mixed=1, mixed_with_query=1.5), "mixed_with_query.*1.5"),
        (lambda: mochi_loss(X, Y, 1.0, np.zeros(2, np.float32), hardest=2, mixed=1), "key.*PRNG.*float32"),
        (lambda: mochi_loss(X, Y, 1.0, jax.random.split(jax.random.key(0)), hardest=2, mixed=1),
         r"single.*\(2,\)"),
        (lambda: mochi_loss(X[:1], Y[:1], 1.0, KEY, hardest=1, mixed=0), "at least 2"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
