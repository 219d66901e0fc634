"""Attention implementations against a naive numpy loop and against each other.

The splash kernel runs in Pallas interpret mode here (any platform but TPU); lengths of 16 are
padded to its 128-slot block. Key masks cover left padding, right padding, both ends (a PPO
prompt + response) and an all-padding row, so queries with no key to attend occur in most rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from rlhf_jax.infra import sharding
from rlhf_jax.models import attention
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.models.config import ModelConfig

B, T, N, K, H = 4, 16, 4, 2, 16  # GQA: two query heads per key/value head


def _key_mask(b=B, s=T):
    m = np.ones((b, s), bool)
    m[0, :5] = False  # left padding
    m[1, -4:] = False  # right padding
    m[2, :3] = False  # both ends
    m[2, -2:] = False
    m[3] = False  # an all-padding row
    return m


def _qkv(seed=0, b=B, t=T, s=T, n=N, k=K, h=H, std=1.0):
    r = np.random.RandomState(seed)
    q = std * r.randn(b, t, n, h)
    kk = std * r.randn(b, s, k, h)
    v = r.randn(b, s, k, h)
    dy = r.randn(b, t, n, h)  # upstream gradient of the output
    return q, kk, v, dy


def naive(
    q, k, v, dy, *, slots, key_mask=None, segments=None, window=None, softcap=None, scale=None
):
    """Output and (dq, dk, dv) of sum(y * dy), one query row at a time, in float64; `segments`
    [B, T]: a query sees only keys of its own segment, none at segment 0."""
    b_, t_, n_, h_ = q.shape
    s_, k_ = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(h_) if scale is None else scale
    slots = np.broadcast_to(slots, (b_, t_))
    y, dq, dk, dv = (np.zeros_like(x) for x in (q, q, k, v))
    for b in range(b_):
        for n in range(n_):
            g = n // (n_ // k_)
            for t in range(t_):
                j = np.arange(s_)
                ok = j <= slots[b, t]
                if window is not None:
                    ok &= j > slots[b, t] - window
                if key_mask is not None:
                    ok &= key_mask[b]
                if segments is not None:
                    ok &= (segments[b] == segments[b, t]) & (segments[b] > 0)
                j = j[ok]
                if not len(j):
                    continue  # no key to attend: output 0, gradient 0
                z = k[b, j, g] @ q[b, t, n] * scale
                c = softcap * np.tanh(z / softcap) if softcap else z
                p = np.exp(c - c.max())
                p /= p.sum()
                y[b, t, n] = p @ v[b, j, g]
                dp = v[b, j, g] @ dy[b, t, n]
                dz = p * (dp - p @ dp)
                if softcap:
                    dz *= 1 - np.tanh(z / softcap) ** 2
                dv[b, j, g] += p[:, None] * dy[b, t, n]
                dq[b, t, n] += scale * dz @ k[b, j, g]
                dk[b, j, g] += scale * dz[:, None] * q[b, t, n]
    return y, (dq, dk, dv)


def _run(impl, q, k, v, dy, dtype=jnp.float32, **kw):
    """attend's output and its (dq, dk, dv) for sum(y * dy), in one jitted call, as float32."""

    def loss(q, k, v):
        y = attention.attend(q, k, v, impl=impl, **kw)
        return jnp.sum(y.astype(jnp.float32) * dy), y

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, y), grads = f(*(jnp.asarray(x, dtype) for x in (q, k, v)))
    return np.asarray(y, np.float32), [np.asarray(g, np.float32) for g in grads]


CASES = {
    "padding_gqa": dict(),
    "window": dict(window=5),
    "softcap": dict(softcap=2.0),
}


def _check(y, grads, ref_y, ref_grads, tol):
    np.testing.assert_allclose(y, ref_y, atol=tol, rtol=tol)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=tol, rtol=tol, err_msg=f"d{name}")


@pytest.mark.parametrize("case", list(CASES))
def test_xla_matches_naive_forward_and_gradient(case):
    kw = CASES[case]
    q, k, v, dy = _qkv(std=2.0 if "softcap" in kw else 1.0)
    mask = _key_mask()
    ref_y, ref_g = naive(q, k, v, dy, slots=np.arange(T), key_mask=mask, **kw)
    y, g = _run("xla", q, k, v, dy, key_mask=jnp.asarray(mask), **kw)
    _check(y, g, ref_y, ref_g, 2e-5)
    assert np.all(y[3] == 0) and all(np.all(x[3] == 0) for x in g)  # the all-padding row


@pytest.mark.parametrize("case", list(CASES))
def test_splash_matches_naive_and_xla(case):
    kw = CASES[case]
    q, k, v, dy = _qkv(std=2.0 if "softcap" in kw else 1.0)
    mask = _key_mask()
    ref_y, ref_g = naive(q, k, v, dy, slots=np.arange(T), key_mask=mask, **kw)
    y, g = _run("splash", q, k, v, dy, key_mask=jnp.asarray(mask), **kw)
    _check(y, g, ref_y, ref_g, 1e-4)
    xy, xg = _run("xla", q, k, v, dy, key_mask=jnp.asarray(mask), **kw)
    _check(y, g, xy, xg, 1e-4)
    assert np.isfinite(y).all() and all(np.isfinite(x).all() for x in g)


def test_splash_without_mask_and_odd_length():
    """No key mask (pretraining), a length that is not a multiple of anything, MHA."""
    q, k, v, dy = _qkv(1, b=2, t=13, s=13, n=2, k=2)
    ref_y, ref_g = naive(q, k, v, dy, slots=np.arange(13))
    y, g = _run("splash", q, k, v, dy)
    _check(y, g, ref_y, ref_g, 1e-4)


def test_splash_runs_per_shard_under_the_mesh():
    """Under `use_rules` on 8 devices the kernel runs in a shard_map: batch over data x fsdp,
    heads over tensor (K = 2 splits like N = 4)."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), sharding.MESH_AXES)
    q, k, v, dy = _qkv(2, b=4)
    mask = _key_mask()
    ref_y, ref_g = naive(q, k, v, dy, slots=np.arange(T), key_mask=mask)
    with sharding.use_rules(mesh, sharding.DEFAULT_RULES):
        y, g = _run("splash", q, k, v, dy, key_mask=jnp.asarray(mask))
    _check(y, g, ref_y, ref_g, 1e-4)


def test_xla_with_cache_slots_matches_naive():
    """Decode-style queries: T = 3 queries at cache slots 9..11 of S = 16, per-row slots too."""
    q, k, v, dy = _qkv(3, t=3)
    mask = _key_mask()
    for slots in (np.arange(9, 12), np.array([[9, 10, 11], [4, 5, 6], [0, 1, 2], [13, 14, 15]])):
        for window in (None, 4):
            ref_y, ref_g = naive(q, k, v, dy, slots=slots, key_mask=mask, window=window)
            y, g = _run("xla", q, k, v, dy, q_slot=slots, key_mask=jnp.asarray(mask), window=window)
            _check(y, g, ref_y, ref_g, 2e-5)


def test_xla_equals_jax_dot_product_attention_in_bf16():
    """The reference agrees with jax.nn.dot_product_attention wherever a query has a key."""
    q, k, v, _ = _qkv(4)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    mask = jnp.asarray(_key_mask())
    full = jnp.tril(jnp.ones((T, T), bool))[None, None] & mask[:, None, None, :]
    theirs = jax.nn.dot_product_attention(q, k, v, mask=full, implementation="xla")
    ours = attention.attend(q, k, v, key_mask=mask, impl="xla")
    has_key = np.asarray(full.any(-1))[:, 0]  # [B, T]
    np.testing.assert_allclose(
        np.asarray(ours, np.float32)[has_key], np.asarray(theirs, np.float32)[has_key], atol=1e-2
    )
    assert np.all(np.asarray(ours, np.float32)[~has_key] == 0)


def test_choose_falls_back_with_a_reason(monkeypatch):
    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    k = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    impl, why = attention.choose("splash", q, k, q_slot=jnp.arange(4))
    assert impl == "xla" and "cache slots" in why
    impl, why = attention.choose("splash", q[:, :1], k)
    assert impl == "xla" and "T == S" in why
    assert attention.choose("auto", q, k) == ("xla", "")  # this CPU
    impl, why = attention.choose("cudnn", q, k)
    assert impl == "xla" and "GPU" in why
    monkeypatch.setattr(attention, "_platform", lambda: "tpu")
    assert attention.choose("auto", q, k, key_mask=jnp.ones((1, 4), bool)) == ("splash", "")
    assert attention.choose("auto", q[:, :1], k)[0] == "xla"  # a decode step stays on xla
    monkeypatch.setattr(attention, "_platform", lambda: "gpu")
    assert attention.choose("auto", q, k) == ("cudnn", "")
    impl, why = attention.choose("auto", q, k, softcap=30.0)
    assert impl == "xla" and "soft-capping" in why
    with pytest.raises(ValueError, match="unknown attention"):
        attention.choose("flash", q, k)
    with pytest.raises(ValueError, match="model.attention"):
        ModelConfig(attention="flash")


def test_model_forward_splash_equals_xla():
    """The transformer with attention=splash gives the xla logits on a left-padded batch."""
    base = dict(d_model=32, n_layers=2, n_heads=4, vocab_size=64, max_len=32, dtype="float32")
    xla_model = model_lib.build(ModelConfig(**base, attention="xla"), seed=0)
    splash_model = model_lib.build(ModelConfig(**base, attention="splash"), seed=0)
    r = np.random.RandomState(5)
    tokens = jnp.asarray(r.randint(0, 64, (2, 12)), jnp.int32)
    mask = np.ones((2, 12), bool)
    mask[0, :4] = False
    positions = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32)
    run = lambda m: m(tokens, positions=positions, key_mask=jnp.asarray(mask))[0]
    want, got = run(xla_model), run(splash_model)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_cudnn_matches_xla():
    """cuDNN (bf16, GQA, left/right padding as a bias, sliding window) against the reference."""
    q, k, v, dy = _qkv(6, t=64, s=64, h=64)
    mask = _key_mask(s=64)
    for kw in (dict(key_mask=None), dict(key_mask=jnp.asarray(mask)), dict(window=16)):
        x16 = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
        assert attention.choose("cudnn", x16[0], x16[1], key_mask=kw.get("key_mask"))[0] == "cudnn"
        y, g = _run("cudnn", q, k, v, dy, dtype=jnp.bfloat16, **kw)
        xy, xg = _run("xla", q, k, v, dy, dtype=jnp.bfloat16, **kw)
        np.testing.assert_allclose(y, xy, atol=2e-2, rtol=2e-2)
        for a, b in zip(g, xg, strict=True):
            np.testing.assert_allclose(a, b, atol=5e-2, rtol=5e-2)


def _segments(b=B, t=T):
    """Packed rows: examples of 5, 7 and 3 tokens then padding; one of 16; 2 x 8 with the second
    ending early; an all-padding row."""
    seg = np.zeros((b, t), np.int32)
    seg[0, :15] = np.repeat([1, 2, 3], [5, 7, 3])
    seg[1] = 1
    seg[2, :14] = np.repeat([1, 2], [8, 6])
    return seg


@pytest.mark.parametrize("impl", ["xla", "splash"])
@pytest.mark.parametrize("case", ["padding_gqa", "window"])
def test_segment_ids_confine_attention_to_each_packed_example(impl, case):
    """int32 segment ids as the key mask (packed rows): the naive loop's output and gradients,
    a query attending only its own example's keys; padding positions output 0."""
    kw = CASES[case]
    q, k, v, dy = _qkv(2)
    seg = _segments()
    ref_y, ref_g = naive(q, k, v, dy, slots=np.arange(T), segments=seg, **kw)
    y, g = _run(impl, q, k, v, dy, key_mask=jnp.asarray(seg), **kw)
    _check(y, g, ref_y, ref_g, 2e-5 if impl == "xla" else 1e-4)
    assert np.all(y[3] == 0) and np.all(y[0, 15] == 0)
    # The first example of row 0 is unaffected by what follows it; a bool mask would leak.
    leak, _ = _run("xla", q, k, v, dy, key_mask=jnp.asarray(seg > 0), **kw)
    assert np.abs(leak[0, 5:15] - ref_y[0, 5:15]).max() > 1e-2


def test_segment_ids_refuse_a_cache():
    q, k, v, _ = _qkv(3)
    with pytest.raises(ValueError, match="self-attention only"):
        attention.attend(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_slot=jnp.arange(T),
            key_mask=jnp.asarray(_segments()),
        )  # fmt: skip
