"""The transformer's options, each off by default: ViT register tokens, RMSNorm, gated MLPs (SwiGLU), query-key
normalisation and rotary position embeddings, each against a float64 NumPy reference of its formula."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jclip import models, parallel
from jclip.models.partitioning import fsdp_param_shardings
from jclip.models.summary import summarize
from jclip.models.text import TextTransformer
from jclip.models.transformer import Attention, EncoderBlock, GatedMlpBlock, RMSNorm, rotary_embedding
from jclip.models.vision import VisionTransformer

# A text tower with every option of recent language models on: RMSNorm, SwiGLU, query-key norm, RoPE.
MODERN_TEXT = dict(norm="rms", mlp="gated", activation="silu", mlp_ratio=8 / 3, qk_norm=True, position="rope")


def numpy_params(variables):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), variables["params"])


def numpy_rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def numpy_layer_norm(x, scale, bias, eps):
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + eps) * scale + bias


def numpy_rotary(x, theta):
    """x [B, L, H, D] with feature pair (i, i + D/2) of position p read as the complex number x_i + i x_{i+D/2},
    multiplied by exp(i p theta^(-2i/D))."""
    half = x.shape[-1] // 2
    angles = np.arange(x.shape[1])[:, None] * theta ** (-2.0 * np.arange(half) / x.shape[-1])
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)[None, :, None, :]
    return np.concatenate([z.real, z.imag], axis=-1)


def numpy_attention(p, x, mask, heads, qk_norm, rope_theta, eps):
    """Multi-head attention of `Attention`'s parameters `p` on x [B, L, W], mask [B, 1, L, L], in float64."""
    q, k, v = (np.einsum("blw,whd->blhd", x, p[name]["kernel"]) + p[name]["bias"] for name in ("query", "key", "value"))
    if qk_norm == "rms":
        q, k = numpy_rms_norm(q, p["query_norm"]["scale"], eps), numpy_rms_norm(k, p["key_norm"]["scale"], eps)
    elif qk_norm == "layer":
        q = numpy_layer_norm(q, p["query_norm"]["scale"], p["query_norm"]["bias"], eps)
        k = numpy_layer_norm(k, p["key_norm"]["scale"], p["key_norm"]["bias"], eps)
    if rope_theta is not None:
        q, k = numpy_rotary(q, rope_theta), numpy_rotary(k, rope_theta)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask, scores, -1e30)  # a fully masked row (a padding query) attends uniformly, as in Flax
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("bhqk,bkhd,hdw->bqw", weights, v, p["out"]["kernel"]) + p["out"]["bias"]


def causal_padding_mask(valid):
    """Causal and padding mask [B, 1, L, L] of valid-token flags [B, L]."""
    return np.asarray(nn.combine_masks(nn.make_causal_mask(valid), nn.make_attention_mask(valid, valid)))


def test_rms_norm_matches_numpy_in_float64():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 4, 16)) * 5 + 2).astype(np.float32)
    scale = rng.normal(size=16).astype(np.float32)
    norm = RMSNorm(epsilon=1e-5)
    assert jax.tree.map(np.shape, norm.init(jax.random.key(0), x)) == {"params": {"scale": (16,)}}
    got = norm.apply({"params": {"scale": scale}}, x)
    np.testing.assert_allclose(got, numpy_rms_norm(x.astype(np.float64), scale, 1e-5), rtol=1e-5, atol=1e-6)
    low = RMSNorm(epsilon=1e-5, dtype=jnp.bfloat16).apply({"params": {"scale": scale}}, x.astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), got, rtol=2e-2, atol=2e-2)


def test_gated_mlp_matches_numpy_with_its_own_parameters():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    mlp = GatedMlpBlock(12, activation="silu")
    variables = mlp.init(jax.random.key(0), x)
    p = numpy_params(variables)
    assert set(p) == {"gate", "up", "proj"} and p["gate"]["kernel"].shape == (8, 12)
    gate = x @ p["gate"]["kernel"] + p["gate"]["bias"]
    up = x @ p["up"]["kernel"] + p["up"]["bias"]
    want = (gate / (1 + np.exp(-gate)) * up) @ p["proj"]["kernel"] + p["proj"]["bias"]
    np.testing.assert_allclose(mlp.apply(variables, x), want, rtol=1e-5, atol=1e-6)
    # In a block its hidden width is int(width * mlp_ratio), as the standard MLP's.
    block = EncoderBlock(2, mlp_ratio=8 / 3, mlp="gated", activation="silu")
    shapes = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 3, 32)))["params"]["mlp"]
    assert shapes["up"]["kernel"].shape == (32, 85) and shapes["proj"]["kernel"].shape == (85, 32)


def test_rotary_embedding_matches_a_numpy_rotation():
    x = np.random.default_rng(2).normal(size=(2, 7, 3, 8)).astype(np.float32)
    for theta in (10000.0, 10.0):
        got = rotary_embedding(jnp.asarray(x), theta)
        np.testing.assert_allclose(got, numpy_rotary(x.astype(np.float64), theta), rtol=1e-5, atol=1e-5)
    low = rotary_embedding(jnp.asarray(x, jnp.bfloat16), 10000.0)
    assert low.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="rotary position embeddings need an even head width; got 5"):
        rotary_embedding(jnp.zeros((1, 4, 2, 5)), 10000.0)


def test_rotary_scores_depend_only_on_the_relative_position():
    """The same query at every position and the same key at every position: score(m, n) is a function of m - n."""
    rng = np.random.default_rng(3)
    length, width = 24, 16
    q, k = (np.broadcast_to(rng.normal(size=width), (1, length, 1, width)).astype(np.float32) for _ in range(2))
    scores = np.einsum("md,nd->mn", rotary_embedding(jnp.asarray(q), 100.0)[0, :, 0],
                       rotary_embedding(jnp.asarray(k), 100.0)[0, :, 0])
    for shift in (1, 5):  # both positions shifted by the same offset: the same score
        np.testing.assert_allclose(scores[shift:, shift:], scores[:-shift, :-shift], rtol=1e-4, atol=1e-4)
    assert np.ptp(np.diagonal(scores, offset=1)) < 1e-4 and np.ptp(scores[0]) > 0.1  # they do depend on m - n


def test_attention_without_options_is_flax_attention():
    """`Attention`'s parameters are those of the default blocks' `nn.MultiHeadDotProductAttention`."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 8)), jnp.float32)
    mask = causal_padding_mask(jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool))
    flax_attention = nn.MultiHeadDotProductAttention(num_heads=2)
    variables = flax_attention.init(jax.random.key(0), x, x, mask=mask)
    np.testing.assert_allclose(Attention(2).apply(variables, x, x, mask=mask),
                               flax_attention.apply(variables, x, x, mask=mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("qk_norm, rope_theta", [("rms", None), ("layer", None), (None, 100.0), ("rms", 100.0)])
def test_attention_with_qk_norm_and_rope_matches_numpy(qk_norm, rope_theta):
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(2, 6, 16)) * 3).astype(np.float32)
    mask = causal_padding_mask(jnp.asarray([[1] * 6, [1, 1, 1, 1, 0, 0]], bool))
    attention = Attention(2, qk_norm=qk_norm, rope_theta=rope_theta, norm_eps=1e-5)
    variables = attention.init(jax.random.key(0), x, x, mask=mask)
    if qk_norm:  # norm parameters away from their initial values, so that the test sees them
        for name in ("query_norm", "key_norm"):
            variables["params"][name] = jax.tree.map(lambda s: s + rng.normal(size=s.shape), variables["params"][name])
    assert ("query_norm" in variables["params"]) == (qk_norm is not None)
    want = numpy_attention(numpy_params(variables), x.astype(np.float64), mask, 2, qk_norm, rope_theta, 1e-5)
    got = attention.apply(variables, x, x, mask=mask)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_rope_text_tower_has_no_position_embedding():
    tokens = jnp.ones((1, 8), jnp.int32)
    shapes = {position: jax.eval_shape(TextTransformer(16, 64, 8, 16, 1, 2, position=position).init,
                                       jax.random.key(0), tokens)["params"] for position in ("learned", "rope")}
    assert shapes["learned"]["pos_embedding"].shape == (8, 16) and "pos_embedding" not in shapes["rope"]
    assert set(shapes["learned"]) - set(shapes["rope"]) == {"pos_embedding"}


@pytest.mark.parametrize("causal", [True, False])
def test_text_tower_with_every_option_trains_under_jit(causal):
    tower = TextTransformer(embed_dim=16, vocab_size=64, context_length=8, width=32, depth=2, num_heads=2,
                            causal=causal, **MODERN_TEXT)
    tokens = np.array([[5, 9, 17, 3, 0, 0, 0, 0], [7, 2, 2, 8, 11, 4, 30, 6]], np.int32)
    variables = tower.init(jax.random.key(0), tokens)
    assert set(variables["params"]["encoder"]["block_0"]["attn"]) == {"query", "key", "value", "out",
                                                                     "query_norm", "key_norm"}

    @jax.jit
    def loss_and_grads(variables, tokens):
        return jax.value_and_grad(lambda v: jnp.sum(jnp.sin(tower.apply(v, tokens))))(variables)

    loss, grads = loss_and_grads(variables, tokens)
    assert np.isfinite(loss)
    for path, grad in jax.tree.leaves_with_path(grads):
        assert np.all(np.isfinite(grad)) and np.any(grad != 0), jax.tree_util.keystr(path)
    embeddings = jax.jit(tower.apply)(variables, tokens)
    unpadded = jax.jit(tower.apply)(variables, tokens[:1, :4])[0]  # the first caption without its padding
    if causal:  # the pooled end-of-text token sees none of the padding after it
        np.testing.assert_allclose(unpadded, embeddings[0], rtol=1e-5, atol=1e-6)
    else:
        assert not np.allclose(unpadded, embeddings[0], atol=1e-5)
    shuffled = tokens.copy()
    shuffled[1, :3] = shuffled[1, [1, 2, 0]]  # the same tokens in another order: rope tells them apart
    assert not np.allclose(jax.jit(tower.apply)(variables, shuffled)[1], embeddings[1], atol=1e-5)


def small_vit(**options):
    return VisionTransformer(**{**dict(embed_dim=8, patch_size=8, width=16, depth=1, num_heads=2), **options})


def test_no_registers_leave_the_parameters_as_they_were():
    images = jnp.zeros((1, 16, 16, 3))
    shapes = [jax.tree.map(np.shape, jax.eval_shape(vit.init, jax.random.key(0), images)["params"])
              for vit in (small_vit(), small_vit(num_registers=0), small_vit(num_registers=3))]
    assert shapes[0] == shapes[1]
    assert shapes[2] == {**shapes[0], "registers": (1, 3, 16)}


@pytest.mark.parametrize("pool", ["cls", "gap", "map"])
def test_registers_are_attended_to_and_left_out_of_the_pool(pool):
    images = jnp.asarray(np.random.default_rng(6).normal(size=(2, 16, 16, 3)), jnp.float32)
    plain, registered = small_vit(pool=pool), small_vit(pool=pool, num_registers=2)
    variables = registered.init(jax.random.key(0), images)
    without = {"params": {k: v for k, v in variables["params"].items() if k != "registers"}}
    out = registered.apply(variables, images)
    assert out.shape == (2, 8)
    assert not np.allclose(out, plain.apply(without, images), atol=1e-5)  # the patches attend to the registers
    other = jax.random.normal(jax.random.key(1), variables["params"]["registers"].shape)  # ln_pre would undo a shift
    moved = {"params": {**variables["params"], "registers": other}}
    assert not np.allclose(registered.apply(moved, images), out, atol=1e-5)
    # Without encoder blocks nothing attends: the registers must then be invisible to the pool.
    shallow, shallow_registered = small_vit(pool=pool, depth=0), small_vit(pool=pool, depth=0, num_registers=2)
    shallow_variables = shallow_registered.init(jax.random.key(0), images)
    shallow_without = {"params": {k: v for k, v in shallow_variables["params"].items() if k != "registers"}}
    np.testing.assert_array_equal(shallow_registered.apply(shallow_variables, images),
                                  shallow.apply(shallow_without, images))


def test_patch_dropout_keeps_the_registers():
    vit = small_vit(num_registers=3, patch_dropout=0.5)
    images = jnp.zeros((2, 32, 32, 3))  # 16 patches, of which 8 are kept
    variables = vit.init(jax.random.key(0), images)
    _, state = vit.apply(variables, images, train=True, rngs={"patch_dropout": jax.random.key(1)},
                         capture_intermediates=lambda module, _: type(module).__name__ == "Encoder")
    assert state["intermediates"]["encoder"]["__call__"][0].shape == (2, 1 + 8 + 3, 16)


@pytest.mark.parametrize("execution", [{}, dict(remat=True, dtype="bfloat16", matmul_dtype="bfloat16")],
                         ids=["float32", "remat-bfloat16"])
def test_clip_with_the_options_initialises_and_applies(execution):
    config = models.model_config("test-micro", text=MODERN_TEXT, vision={"num_registers": 2, "norm": "rms",
                                                                          "qk_norm": True}, **execution)
    model = models.model_class(config)(**config)
    images = jnp.asarray(np.random.default_rng(7).normal(size=(2, 32, 32, 3)), jnp.float32)
    tokens = jnp.asarray([[5, 9, 17, 0, 0, 0, 0, 0], [7, 2, 2, 8, 11, 4, 30, 6]], jnp.int32)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    assert variables["params"]["image_tower"]["registers"].shape == (1, 2, 32)
    out = jax.jit(model.apply)(variables, images, tokens)
    for z in (out["zimg"], out["ztxt"]):
        assert z.shape == (2, 16) and z.dtype == jnp.float32 and np.all(np.isfinite(z))


def test_the_options_parameters_have_logical_axes_for_fsdp():
    model = models.create("test-micro", text=MODERN_TEXT, vision={"num_registers": 2, "mlp": "gated"},
                          logical_axes=True)
    images, tokens = jnp.zeros((2, 32, 32, 3)), jnp.ones((2, 16), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]
    block = boxed["text_tower"]["encoder"]["block_0"]
    assert block["mlp"]["gate"]["kernel"].names == block["mlp"]["up"]["kernel"].names == ("embed", "mlp")
    assert block["attn"]["query"]["kernel"].names == ("embed", "heads", "kv")
    assert boxed["image_tower"]["registers"].names == (None, "seq", "embed")
    shardings = fsdp_param_shardings(model, parallel.make_mesh(8), images, tokens)
    assert shardings["image_tower"]["registers"].spec == P(None, None, "data")
    assert shardings["text_tower"]["encoder"]["block_0"]["mlp"]["up"]["kernel"].spec == P("data", None)
    assert shardings["text_tower"]["encoder"]["block_0"]["attn"]["query_norm"]["scale"].spec == P()


def test_bad_option_values_are_clear_errors():
    images, tokens = jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 16), jnp.int32)
    for overrides, message in [(dict(text={"norm": "batch"}), r"unknown norm 'batch'; use one of \['layer', 'rms'\]"),
                               (dict(vision={"norm": "batch"}), "unknown norm 'batch'"),
                               (dict(text={"mlp": "swiglu"}), r"unknown mlp 'swiglu'; use one of \['gated', "),
                               (dict(text={"position": "alibi"}), "unknown text position 'alibi'"),
                               (dict(vision={"num_registers": -1}), "num_registers must be >= 0; got -1")]:
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(models.create("test-micro", **overrides).init, jax.random.key(0), images, tokens)
    with pytest.raises(ValueError, match=r"unknown vision option\(s\) \['position'\]"):
        models.model_config("test-micro", vision={"position": "rope"})
    block = EncoderBlock(2, cross_attention=True, rope_theta=10000.0)
    with pytest.raises(ValueError, match="rotary position embeddings are for self-attention"):
        jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 3, 8)), None, jnp.zeros((1, 4, 8)))


def test_summary_counts_the_registers_flops():
    plain = summarize("test-micro")
    registered = summarize("test-micro", vision={"num_registers": 8})
    assert registered["image_gflops"] > plain["image_gflops"] and registered["text_gflops"] == plain["text_gflops"]
    assert registered["params_m"] * 1e6 == pytest.approx(plain["params_m"] * 1e6 + 8 * 32, abs=0.5)
