"""Model: parameter counts against published figures, causality, cache, padding, scan/unrolled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import config as model_config
from rlhf_jax.models import transformer as M

FAMILIES = [("gpt2", False), ("gpt2", True), ("llama", False), ("llama", True)]
# Gemma 3 style: local (window 3) and global layers, q/k and sandwich norms, GeGLU, soft-caps.
GEMMA = dict(
    **model_config.VARIANTS["gemma3"],
    head_dim=32,
    sliding_window=3,
    window_pattern="LG",
    rope_local_theta=1e4,
    rope_theta=1e6,
    attn_softcap=0.05,
    final_softcap=0.5,
    query_pre_attn_scalar=24,
)


def jitted(m):
    """The model as a jitted function of (tokens, **kwargs): one compile instead of eager ops."""
    graphdef, params = nnx.split(m)

    @jax.jit
    def f(params, tokens, kw):
        return nnx.merge(graphdef, params)(tokens, **kw)

    return lambda tokens, **kw: f(params, tokens, kw)


def tiny(family, scan=False, **kw):
    kv = 2 if family == "llama" else None
    return model_config.preset(
        "tiny", family=family, scan_layers=scan, dtype="float32", n_kv_heads=kv, **kw
    )


@pytest.mark.parametrize(
    "size,expected",
    # Hugging Face's GPT-2 checkpoints (vocab 50257, tied embeddings) have exactly these counts.
    [
        ("small", 124_439_808),
        ("medium", 354_823_168),
        ("large", 774_030_080),
        ("xl", 1_557_611_200),
    ],
)
def test_gpt2_param_counts_match_published(size, expected):
    _, params, _ = M.abstract(model_config.preset(size, vocab_size=50257))
    assert M.param_count(params) == expected


@pytest.mark.parametrize("size,billions", [("1.3b", 1.3), ("6b", 6.7), ("175b", 175.0)])
def test_instructgpt_sizes_match_gpt3_table(size, billions):
    _, params, _ = M.abstract(model_config.preset(size, scan_layers=True))  # scan: fast to trace
    assert abs(M.param_count(params) / 1e9 - billions) / billions < 0.03


def test_llama_family_has_gqa_rmsnorm_swiglu_untied():
    cfg = tiny("llama")
    _, p, axes = M.abstract(cfg)
    attn = p["blocks"][0]["attn"]
    assert attn["q"].shape == (64, 4, 16) and attn["k"].shape == (64, 2, 16)
    assert "gate" in p["blocks"][0]["mlp"] and "bias" not in p["blocks"][0]["ln1"]
    assert "lm_head" in p and "pos_embed" not in p
    assert axes["blocks"][0]["attn"]["k"] == ("embed", "kv_heads", "head_dim")


@pytest.mark.parametrize("family,scan", FAMILIES)
def test_causality(family, scan):
    """Changing token t never changes logits before t, and does change them at t."""
    m = jitted(M.build(tiny(family, scan), seed=0))
    toks = jax.random.randint(jax.random.key(0), (2, 12), 0, 512)
    base, _ = m(toks)
    for t in (0, 5, 11):
        changed = toks.at[:, t].set((toks[:, t] + 7) % 512)
        out, _ = m(changed)
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
        assert not np.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize(
    "family,scan,kw", [(f, s, {}) for f, s in FAMILIES] + [("llama", True, GEMMA)]
)
def test_cached_decoding_matches_full_forward(family, scan, kw):
    cfg = tiny(family, scan, **kw)
    m = jitted(M.build(cfg, seed=1))
    toks = jax.random.randint(jax.random.key(1), (3, 9), 0, 512)
    full, _ = m(toks)
    cache = M.init_cache(cfg, 3, 16)
    logits, cache = m(toks[:, :4], cache=cache)  # prefill 4, then one token at a time
    outs = [logits]
    for t in range(4, 9):
        logits, cache = m(toks[:, t : t + 1], cache=cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
    assert int(cache["index"]) == 9


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padding_does_not_change_logits(family):
    """A left-padded row, masked and with positions counted from its first real token,
    gives the same logits for its real tokens as the unpadded sequence."""
    m = jitted(M.build(tiny(family), seed=2))
    toks = jax.random.randint(jax.random.key(2), (1, 7), 4, 512)
    ref, _ = m(toks)
    pad = 5
    padded = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), toks], 1)
    mask = jnp.arange(12)[None] >= pad
    pos = jnp.maximum(jnp.arange(12)[None] - pad, 0)
    out, _ = m(padded, positions=pos, key_mask=mask)
    np.testing.assert_allclose(out[:, pad:], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,kw", [("gpt2", {}), ("llama", {}), ("llama", GEMMA)])
def test_scan_layers_equals_unrolled(family, kw):
    """Also where layers differ (local vs global): the scan picks each layer's window/RoPE."""
    unrolled = M.build(tiny(family, **kw), seed=3)
    scanned = M.build(tiny(family, scan=True, **kw), seed=3)
    _, p_unrolled = nnx.split(unrolled, nnx.Param)
    g_scanned, p_scanned = nnx.split(scanned, nnx.Param)
    p = nnx.to_pure_dict(p_unrolled)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[p["blocks"][i] for i in range(2)])
    q = {**{k: v for k, v in p.items() if k != "blocks"}, "layers": stacked}
    assert jax.tree.structure(q) == jax.tree.structure(nnx.to_pure_dict(p_scanned))
    toks = jax.random.randint(jax.random.key(3), (2, 10), 0, 512)
    a, _ = jitted(unrolled)(toks)
    b, _ = jitted(nnx.merge(g_scanned, q))(toks)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_sliding_window_bounds_what_a_position_sees(scan):
    """Every layer local with window 3 (keys t-2..t): after 2 layers position t sees tokens
    t-4..t, so changing token 0 changes the logits at 0..4 and none after."""
    m = jitted(M.build(tiny("llama", scan, sliding_window=3), seed=5))
    toks = jax.random.randint(jax.random.key(5), (1, 9), 0, 512)
    base, _ = m(toks)
    out, _ = m(toks.at[:, 0].set((toks[:, 0] + 7) % 512))
    changed = np.abs(np.asarray(out - base)).max(-1)[0] > 1e-6  # [T]
    assert changed.tolist() == [True] * 5 + [False] * 4


def test_flop_counts_cap_attention_at_the_window():
    """MFU and the planner count attention keys per layer: all T of them on global layers, at
    most the window on local ones (Gemma 2's alternation, Mistral's every-layer window)."""
    from rlhf_jax.infra import plan
    from rlhf_jax.stages import setup

    kw = dict(family="llama", d_model=32, n_layers=4, n_heads=2, vocab_size=64)  # H D = 32
    full = model_config.ModelConfig(**kw)
    gemma2 = model_config.ModelConfig(**kw, sliding_window=4, window_pattern="LG")
    mistral = model_config.ModelConfig(**kw, sliding_window=4)
    assert full.attended_keys(16) == 64 and gemma2.attended_keys(16) == 40
    assert mistral.attended_keys(16) == 16 and mistral.attended_keys(3) == 12  # ctx < window
    assert setup.flops_per_token(full, 1000, 16) == 6000 + 12 * 32 * 64
    assert setup.flops_per_token(gemma2, 1000, 16) == 6000 + 12 * 32 * 40
    params = {"blocks": {"w": jax.ShapeDtypeStruct((10, 10), jnp.float32)}}  # 100 weights
    # 2 per weight and token, 4 (H D) per token, key and layer: 5 tokens, 16 keys in view
    assert plan.forward_flops(mistral, params, 5, 16) == 2 * 100 * 5 + 2 * 64 * 32 * 5 + (
        4 * 32 * 5 * 16
    )


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_gradients(remat):
    toks = jax.random.randint(jax.random.key(4), (2, 8), 0, 512)

    def grads(cfg):
        g, p = nnx.split(M.build(cfg, seed=4), nnx.Param)
        return jax.jit(jax.grad(lambda p: nnx.merge(g, p)(toks)[0].astype(jnp.float32).mean()))(p)

    ref = grads(tiny("gpt2"))
    got = grads(tiny("gpt2", remat=remat))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_compute_keeps_fp32_params_and_head():
    cfg = model_config.preset("tiny")
    m = M.build(cfg)
    logits, _ = jitted(m)(jnp.zeros((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32  # the head runs in float32 (test_numeric_fixes.py)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


def test_bad_config_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown model.size: 'huge'"):
        model_config.preset("huge")
    with pytest.raises(ValueError, match="not a multiple of model.n_kv_heads"):
        model_config.preset("tiny", family="llama", n_kv_heads=3)
