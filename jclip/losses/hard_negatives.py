"""Softmax contrastive losses that stress hard negatives: importance weighting (Robinson et al. 2021,
DiHT), extra hard-negative captions (NegCLIP) and synthetic negatives by mixing (MoCHi)."""

import jax
import jax.numpy as jnp
from jax import lax

from jclip.losses._device_axis import first_global_row, gather_rows, global_sum, own_columns
from jclip.losses._global_arrays import over_batch_axes
from jclip.losses._validation import as_scalar, check_has_negatives, prepare_embeddings


@over_batch_axes(batch=("zimg", "ztxt"), replicated=("scale",))
def hard_negative_clip_loss(zimg, ztxt, scale, *, beta, tau_plus=0.0, axis_name=None):
    """Symmetric InfoNCE with importance-weighted negatives over the global batch of B pairs.

    Robinson et al. 2021, Contrastive Learning with Hard Negative Samples (arXiv 2010.04592), as
    applied to image-text pre-training by DiHT (Radenovic et al. 2023, arXiv 2301.02280): each
    negative's term in the denominator is reweighted by a softmax of its own logit, so that
    negatives close to the query count more (β > 0), and optionally debiased for false negatives
    (τ⁺ > 0). With logits l_ij = scale · zimg_i · ztxt_j and N = B - 1 negatives per row:

        w_ij = exp(β l_ij) / Σ_{k≠i} exp(β l_ik)                    (j ≠ i)
        Ng_i = max((N Σ_{j≠i} w_ij e^{l_ij} - τ⁺ N e^{l_ii}) / (1 - τ⁺),  N e^{-scale})
        CE_i = -l_ii + log(e^{l_ii} + Ng_i)
        loss = (1 / 2B) Σ_i [CE_i(image→text) + CE_i(text→image)]

    the text→image direction using the transposed logits. The clamp of Ng at N e^{-scale}, the
    smallest negative mass unit embeddings allow, is Robinson's; for unit embeddings it acts only
    with τ⁺ > 0, where the debiased estimate falls below it. The weights w_ij are differentiated,
    as in Robinson's implementation (github.com/joshr17/HCL). Everything is computed in log
    space, so large scales do not overflow. With β = 0 and τ⁺ = 0 the loss is `clip_loss`.

    Args:
      zimg, ztxt: `[b, dim]` image and text embeddings (normalised by the model).
      scale: inverse temperature exp(t), a one-element array (see `jclip.losses.temperature`).
      beta: β ≥ 0, the concentration on hard negatives (a Python float; 0 weighs all alike).
      tau_plus: τ⁺ in [0, 1), the assumed probability that a negative is in fact a positive
        (a Python float).

    Returns:
      The scalar loss of the global batch, the same for every number of devices.
    """
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0 (0 weighs every negative alike); got {beta}")
    if not 0 <= tau_plus < 1:
        raise ValueError(f"tau_plus is a probability in [0, 1) (0 disables debiasing); got {tau_plus}")
    zimg, ztxt, local_batch, batch = prepare_embeddings(zimg, ztxt, axis_name=axis_name, ring=False, block_size=None)
    check_has_negatives(batch, "hard_negative_clip_loss")
    scale = as_scalar(scale, "scale").astype(zimg.dtype)
    is_positive = own_columns(local_batch, axis_name)
    negatives = batch - 1

    def over_negatives(logit):
        return jax.nn.logsumexp(jnp.where(is_positive, -jnp.inf, logit), axis=1)

    def cross_entropy(rows, columns):
        logit = scale * rows @ gather_rows(columns, axis_name).T
        positive = scale * jnp.sum(rows * columns, axis=1)
        # log(N Σ_j w_ij e^{l_ij}) = log N + logsumexp((1 + β) l) - logsumexp(β l), over j ≠ i.
        log_mass = jnp.log(negatives) + over_negatives((1 + beta) * logit) - over_negatives(beta * logit)
        if tau_plus:
            log_mass = _debiased(log_mass, positive, tau_plus, negatives)
        log_mass = jnp.maximum(log_mass, jnp.log(negatives) - scale)
        return jnp.logaddexp(positive, log_mass) - positive

    local = jnp.sum(cross_entropy(zimg, ztxt) + cross_entropy(ztxt, zimg))
    return global_sum(local, axis_name) / (2 * batch)


def _debiased(log_mass, positive, tau_plus, negatives):
    """log((e^log_mass - τ⁺ N e^positive) / (1 - τ⁺)); -inf where that difference is not positive."""
    # log of the share of the mass that the debiasing removes; the difference is positive below 0.
    removed = jnp.log(tau_plus * negatives) + positive - log_mass
    remains = removed < 0
    safe = jnp.where(remains, removed, -1.0)  # keeps log(0) and its gradient out of the other branch
    return jnp.where(remains, log_mass + jnp.log(-jnp.expm1(safe)) - jnp.log1p(-tau_plus), -jnp.inf)


@over_batch_axes(batch=("zimg", "ztxt", "negative_ztxt", "negative_mask"), replicated=("scale",))
def negclip_loss(zimg, ztxt, scale, negative_ztxt, *, negative_mask=None, axis_name=None):
    """CLIP loss with K extra hard-negative captions per image (NegCLIP, Yuksekgonul et al. 2023).

    NegCLIP (arXiv 2210.01936) fine-tunes CLIP on batches in which every image also brings
    captions that contradict it (words swapped, attributes exchanged), teaching the model word
    order and attribute binding. As in its training code, the negatives of the whole global batch are
    extra columns of the image→text logits only; the text→image direction is plain CLIP over
    the B real captions. With l_ij = scale · zimg_i · ztxt_j and n_i = scale · zimg_i · negative
    for each of the B·K negative captions of the global batch:

        CE_i(image→text) = logsumexp([l_i1 .. l_iB, n_i1 .. n_iBK]) - l_ii
        CE_i(text→image) = logsumexp_j l_ji - l_ii
        loss = (1 / 2B) Σ_i [CE_i(image→text) + CE_i(text→image)]

    With K = 0, or every negative masked out, the loss is `clip_loss`.

    Args:
      zimg, ztxt: `[b, dim]` image and text embeddings (normalised by the model).
      scale: inverse temperature exp(t), a one-element array (see `jclip.losses.temperature`).
      negative_ztxt: `[b, K, dim]` embeddings of the K negative captions made from each row's
        caption, sharded like `ztxt`.
      negative_mask: optional `[b, K]` bool; False marks a missing negative (a caption the
        perturbation could not produce), whose column is left out. None keeps all.

    Returns:
      The scalar loss of the global batch, the same for every number of devices.
    """
    zimg, ztxt, local_batch, batch = prepare_embeddings(zimg, ztxt, axis_name=axis_name, ring=False, block_size=None)
    dim = zimg.shape[1]
    shape = jnp.shape(negative_ztxt)
    if len(shape) != 3 or (shape[0], shape[2]) != (local_batch, dim):
        raise ValueError(
            f"negative_ztxt must be [batch, K, dim] = [{local_batch}, K, {dim}] like zimg {zimg.shape} "
            f"(use K = 0 for none); got {shape}"
        )
    count = shape[1]
    if negative_mask is not None and (
        jnp.shape(negative_mask) != (local_batch, count) or jnp.result_type(negative_mask) != jnp.bool_
    ):
        raise ValueError(
            f"negative_mask must be a bool array of shape [batch, K] = {(local_batch, count)} (True keeps a "
            f"negative); got {jnp.result_type(negative_mask)} {jnp.shape(negative_mask)}"
        )
    scale = as_scalar(scale, "scale").astype(zimg.dtype)
    positive = scale * jnp.sum(zimg * ztxt, axis=1)
    negatives = gather_rows(negative_ztxt.astype(zimg.dtype), axis_name).reshape(-1, dim)
    negative_logit = scale * zimg @ negatives.T
    if negative_mask is not None:
        keep = gather_rows(negative_mask, axis_name).reshape(-1)
        negative_logit = jnp.where(keep[None, :], negative_logit, -jnp.inf)
    text_logit = scale * zimg @ gather_rows(ztxt, axis_name).T
    image_to_text = jax.nn.logsumexp(jnp.concatenate([text_logit, negative_logit], axis=1), axis=1) - positive
    text_to_image = jax.nn.logsumexp(scale * ztxt @ gather_rows(zimg, axis_name).T, axis=1) - positive
    return global_sum(jnp.sum(image_to_text + text_to_image), axis_name) / (2 * batch)


@over_batch_axes(batch=("zimg", "ztxt"), replicated=("scale", "key"))
def mochi_loss(zimg, ztxt, scale, key, *, hardest, mixed, mixed_with_query=0, axis_name=None):
    """Symmetric InfoNCE with synthetic hard negatives mixed from the hardest ones (MoCHi).

    Kalantidis et al. 2020, Hard Negative Mixing for Contrastive Learning (arXiv 2010.01028),
    Sec. 4, adapted from MoCo's queue to the image-text batch. For each query row (an image
    against the B captions of the global batch, and a caption against the B images), let
    n_1 .. n_H be its H = `hardest` negatives of highest similarity, the positive excluded.
    Synthetic negatives, appended to that row's cross-entropy as extra columns, are

        h_k  = normalise(α_k n_a + (1 - α_k) n_c),   a ≠ c uniform in 1..H, α_k ~ U(0, 1)
        h'_k = normalise(β_k q + (1 - β_k) n_a),     a uniform in 1..H,     β_k ~ U(0, 0.5)

    `mixed` of the first kind and `mixed_with_query` of the second (q the query itself). They
    are unit vectors and carry no gradient (the paper's stop-gradient; the query's own factor
    q in q · h does). With c_1 .. c_B the columns (captions for an image, images for a caption)
    and logits l_ij = scale · q_i · c_j:

        CE_i = logsumexp([l_i1 .. l_iB, scale q_i · h_i1 .., scale q_i · h'_i1 ..]) - l_ii
        loss = (1 / 2B) Σ_i [CE_i(image→text) + CE_i(text→image)]

    With mixed = mixed_with_query = 0 the loss is `clip_loss`. The random draws of global row r
    are `mochi_mixing(jax.random.fold_in(key, direction), r)`, direction 0 for image→text and 1
    for text→image: a function of the key and the global row only, so the loss does not depend
    on the number of devices. Pass a new key every step.

    Args:
      zimg, ztxt: `[b, dim]` image and text embeddings, unit length like the synthetic
        negatives (normalised by the model).
      scale: inverse temperature exp(t), a one-element array (see `jclip.losses.temperature`).
      key: a JAX PRNG key, `jax.random.key(seed)` or the raw `jax.random.PRNGKey(seed)`,
        the same on every device.
      hardest: H, how many of each row's most similar negatives are mixed, 1 <= H <= B - 1
        (at least 2 when `mixed` > 0).
      mixed: how many negatives mixed from two hard negatives each row gets (s in the paper).
      mixed_with_query: how many negatives mixed from the query and a hard negative each row
        gets (s' in the paper).

    Returns:
      The scalar loss of the global batch, the same for every number of devices.
    """
    zimg, ztxt, local_batch, batch = prepare_embeddings(zimg, ztxt, axis_name=axis_name, ring=False, block_size=None)
    check_has_negatives(batch, "mochi_loss")
    for name, value in (("mixed", mixed), ("mixed_with_query", mixed_with_query)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(
                f"{name} must be a non-negative int, the number of synthetic negatives per row; got {value!r}"
            )
    if not isinstance(hardest, int) or not 1 <= hardest <= batch - 1 or (mixed and hardest < 2):
        raise ValueError(
            f"hardest must be an int from {2 if mixed else 1} (two distinct negatives to mix) to the "
            f"{batch - 1} negatives of a global batch of {batch}; got {hardest!r}"
        )
    _check_key(key)
    scale = as_scalar(scale, "scale").astype(zimg.dtype)
    rows = first_global_row(local_batch, axis_name) + jnp.arange(local_batch)
    is_positive = own_columns(local_batch, axis_name)

    def cross_entropy(queries, paired, direction):
        columns = gather_rows(paired, axis_name)
        draws = mochi_mixing(jax.random.fold_in(key, direction), rows, hardest=hardest, mixed=mixed,
                             mixed_with_query=mixed_with_query)
        synthetic = _synthetic_negatives(queries, columns, is_positive, hardest, draws)
        logit = scale * jnp.concatenate([queries @ columns.T, jnp.einsum("bd,bkd->bk", queries, synthetic)], axis=1)
        return jax.nn.logsumexp(logit, axis=1) - scale * jnp.sum(queries * paired, axis=1)

    local = jnp.sum(cross_entropy(zimg, ztxt, 0) + cross_entropy(ztxt, zimg, 1))
    return global_sum(local, axis_name) / (2 * batch)


def mochi_mixing(key, rows, *, hardest, mixed, mixed_with_query):
    """The random draws of `mochi_loss` for global rows `rows` (int `[n]`) of one direction.

    Row r's draws depend only on `jax.random.fold_in(key, r)`. Ranks count from 0, the most
    similar of the row's `hardest` negatives.

    Returns:
      (pairs, alpha, partners, beta): `pairs` int `[n, mixed, 2]`, the ranks of the two distinct
      negatives each mixed negative combines, and `alpha` `[n, mixed]` ~ U(0, 1), the weight of
      the first; `partners` int `[n, mixed_with_query]`, the rank of the negative mixed with the
      query, and `beta` `[n, mixed_with_query]` ~ U(0, 0.5), the weight of the query.
    """

    def draw(row):
        # One U(0, 1) number for each choice: a single draw compiles much faster than one per kind.
        uniform = jax.random.uniform(jax.random.fold_in(key, row), (3 * mixed + 2 * mixed_with_query,))
        ends = [mixed, 2 * mixed, 3 * mixed, 3 * mixed + mixed_with_query]
        first, second, alpha, partner, beta = jnp.split(uniform, ends)
        first, second = _uniform_ranks(first, hardest), _uniform_ranks(second, hardest - 1)
        second = second + (second >= first)  # uniform over the other hardest - 1 ranks
        return jnp.stack([first, second], axis=-1), alpha, _uniform_ranks(partner, hardest), 0.5 * beta

    return jax.vmap(draw)(rows)


def _uniform_ranks(uniform, count):
    """Integers uniform in 0 .. count - 1 from U(0, 1) draws."""
    return jnp.minimum(jnp.floor(uniform * count), count - 1).astype(jnp.int32)


def _synthetic_negatives(queries, columns, is_positive, hardest, draws):
    """`[b, mixed + mixed_with_query, dim]` unit synthetic negatives of each query row, without gradient."""
    queries, columns = lax.stop_gradient(queries), lax.stop_gradient(columns)
    pairs, alpha, partners, beta = draws
    _, ranked = lax.top_k(jnp.where(is_positive, -jnp.inf, queries @ columns.T), hardest)
    hard = columns[ranked]  # [b, hardest, dim], most similar first
    row = jnp.arange(queries.shape[0])[:, None]
    alpha, beta = alpha[..., None].astype(queries.dtype), beta[..., None].astype(queries.dtype)
    two_negatives = alpha * hard[row, pairs[..., 0]] + (1 - alpha) * hard[row, pairs[..., 1]]
    with_query = beta * queries[:, None, :] + (1 - beta) * hard[row, partners]
    synthetic = jnp.concatenate([two_negatives, with_query], axis=1)
    # + ε: an even mix of two opposite negatives is the zero vector.
    return synthetic / (jnp.linalg.norm(synthetic, axis=-1, keepdims=True) + 1e-12)


def _check_key(key):
    dtype, shape = jnp.result_type(key), jnp.shape(key)
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(f"key must be a single PRNG key, as from jax.random.key(seed); got shape {shape}")
    elif dtype != jnp.uint32 or len(shape) != 1:
        raise ValueError(
            f"key must be a JAX PRNG key, from jax.random.key(seed) or jax.random.PRNGKey(seed); "
            f"got {dtype} {shape}"
        )
