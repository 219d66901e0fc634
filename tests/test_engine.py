"""The rollout engine against the static sampler (its reference), paged attention against a naive
numpy loop and the TPU kernel (Pallas interpret mode), multi-turn rows against the static sampler
on the concatenated prompt and teacher-forced log-probs, and the engine on the 8-device mesh.

Shapes are few and small (the suite's time budget): 12 rows of prompts of 1 to 8 tokens, 10 new
tokens, 4 slots of pages of 4 tokens. A set of stop ids makes response lengths mixed in both the
greedy and the sampled runs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import paged
from rlhf_jax.models import transformer as M
from rlhf_jax.sampling import engine, likelihood, sampler

# GPT-2 (learned positions, unrolled layers) and a LLaMA-family model in the Gemma 3 style
# (GQA, RoPE with a local and a global base, a window of 4 on one layer that the 8 + 10 tokens
# cross, soft-caps, a query scale that is not H, scanned layers): the decode path's variety.
CONFIGS = {
    "gpt2": dict(family="gpt2"),
    "gemma_window_scan": dict(
        family="llama",
        **model_config.VARIANTS["gemma3"],
        n_kv_heads=2,
        head_dim=32,
        sliding_window=4,
        window_pattern="LG",
        rope_local_theta=10000.0,
        rope_theta=1000000.0,
        attn_softcap=0.05,
        final_softcap=0.5,
        query_pre_attn_scalar=24,
        scan_layers=True,
    ),
}
PAD, T_NEW, V, SLOTS, PAGE = 0, 10, 512, 4, 4
LENGTHS = (8, 5, 3, 6, 1, 7, 2, 8, 4, 6, 3, 5)  # real prompt tokens per row; P = 8
# Stop ids that these models emit at mixed steps, greedy and sampled (read off eos-free runs).
EOS = (13, 17, 21, 56, 60, 63, 90, 114, 122, 146, 149, 176, 188, 202, 241, 258, 283, 307, 323,
       339, 365, 368, 371, 381, 385, 437)  # fmt: skip
SAMPLED = dict(temperature=0.7, top_k=20, top_p=0.9)


@functools.cache
def model(name):
    cfg = model_config.preset("tiny", dtype="float32", **CONFIGS[name])
    graphdef, params = nnx.split(M.build(cfg, seed=0), nnx.Param)
    return cfg, graphdef, nnx.to_pure_dict(params)


def left_pad(rows, width):
    tokens = np.full((len(rows), width), PAD, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) :], mask[i, width - len(r) :] = r, True
    return tokens, mask


def batch():
    rng = np.random.default_rng(0)
    tokens, mask = left_pad([rng.integers(1, V, n) for n in LENGTHS], max(LENGTHS))
    root = jax.random.key(42)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(len(LENGTHS)))
    return tokens, mask, keys


@functools.cache
def static(name, eos=EOS, t_new=T_NEW):
    return sampler.make_sampler(model(name)[1], max_new_tokens=t_new, eos_id=eos, pad_id=PAD)


@functools.cache
def reference(name, sampled: bool):
    knobs = SAMPLED if sampled else dict(greedy=True)
    return jax.device_get(static(name)(model(name)[2], *batch(), **knobs))


@functools.cache
def make(name, **opts):
    return engine.make_engine(
        model(name)[1], max_new_tokens=T_NEW, eos_id=EOS, pad_id=PAD, num_slots=SLOTS,
        page_size=PAGE, **opts,
    )  # fmt: skip


def assert_same_rows(out, ref):
    """Tokens, masks, lengths and finished flags equal; log-probs within 1e-5."""
    for key in ("tokens", "response", "response_mask", "lengths", "finished"):
        np.testing.assert_array_equal(out[key], ref[key], err_msg=key)
    np.testing.assert_allclose(out["logprobs"], ref["logprobs"], atol=1e-5)
    np.testing.assert_array_equal(out["generated"], ref["response_mask"])


# The tight pool (9 pages: two rows of 18 tokens need 10) makes rows wait for pages and forces
# preemptions; a chunk of 3 splits the prompts of 4 to 8 tokens over several prefill calls.
ENGINES = {
    "chunked_tight_pool": dict(num_pages=9, prefill_chunk=3),
    "token_by_token": dict(prefill_chunk=0),
}
CASES = [  # every case compiles a static sampler and an engine: few, for the suite's time
    ("gpt2", "chunked_tight_pool", False),
    ("gemma_window_scan", "token_by_token", True),  # chunked and sampled: the mesh test's
]


@pytest.mark.parametrize("name,kind,sampled", CASES)
def test_engine_equals_static_sampler(name, kind, sampled):
    """12 rows through 4 slots give the static sampler's tokens and log-probs, greedy and
    sampled (temperature, top-k, top-p), whichever slot and neighbours each row had."""
    ref = reference(name, sampled)
    lengths = ref["lengths"]
    assert ref["finished"].any() and len(set(lengths)) >= 3, lengths
    out = jax.device_get(
        make(name, **ENGINES[kind])(
            model(name)[2], *batch(), **(SAMPLED if sampled else {"greedy": True})
        )
    )
    assert_same_rows(out, ref)
    assert int(out["useful_slot_steps"]) == lengths.sum()
    assert int(out["slot_steps"]) == SLOTS * int(out["steps"])
    if kind == "chunked_tight_pool":  # pages were the limit: rows waited, one was preempted
        assert int(out["peak_pages"]) == 9 and int(out["preemptions"]) > 0
        assert int(out["prefill_calls"]) >= 3  # the 8-token prompts take 3 chunks
    else:  # a prompt token per step: steps >= the longest row's prompt + response
        assert int(out["prefill_calls"]) == 0
        assert int(out["steps"]) >= max(n + t for n, t in zip(LENGTHS, lengths, strict=True))


def naive_paged(q, k_seq, v_seq, positions, kv_len, real, *, window=None, softcap=None,
                scale=None):  # fmt: skip
    """Attention of each real query over its row's keys k_seq [B, S, K, H] (positions < kv_len),
    one query at a time, in float64."""
    b_, t_, n_, h_ = q.shape
    k_ = k_seq.shape[2]
    scale = 1 / np.sqrt(h_) if scale is None else scale
    y = np.zeros(q.shape)
    for b in range(b_):
        for t in range(t_):
            if not real[b, t]:
                continue
            j = np.arange(kv_len[b])
            j = j[j <= positions[b, t]]
            if window is not None:
                j = j[j > positions[b, t] - window]
            for n in range(n_):
                g = n // (n_ // k_)
                z = k_seq[b, j, g] @ q[b, t, n] * scale
                z = softcap * np.tanh(z / softcap) if softcap else z
                p = np.exp(z - z.max())
                y[b, t, n] = (p / p.sum()) @ v_seq[b, j, g]
    return y


def paged_case(seed=0, t=3, dtype=np.float32):
    """A pool with 3 rows' earlier keys in shuffled pages and a chunk of new tokens per row."""
    rng = np.random.default_rng(seed)
    k_, l_, np_, n_, h_, r_ = 2, 2, 10, 4, 8, 3  # kv heads, layers, pages, q heads, head dim
    before, new = np.array([5, 0, 7]), np.array([3, 2, 1])[:, None] * np.ones(t, int)
    new = np.array([min(3, t), min(2, t), 1])
    pages = rng.permutation(np_)[: 3 * r_].reshape(3, r_).astype(np.int32)
    k_seq = rng.normal(size=(3, r_ * PAGE, k_, h_))  # each row's keys by position
    v_seq = rng.normal(size=(3, r_ * PAGE, k_, h_))
    pool_k = rng.normal(size=(k_, l_, np_, PAGE, h_))  # garbage everywhere else
    pool_v = rng.normal(size=(k_, l_, np_, PAGE, h_))
    layer = 1
    for b in range(3):
        for p in range(before[b]):
            pool_k[:, layer, pages[b, p // PAGE], p % PAGE] = k_seq[b, p]
            pool_v[:, layer, pages[b, p // PAGE], p % PAGE] = v_seq[b, p]
    real = np.arange(t)[None] >= (t - new)[:, None]  # left-padded chunks
    positions = np.maximum(before[:, None] + np.cumsum(real, 1) - 1, 0)
    k_new = np.zeros((3, t, k_, h_))
    v_new = np.zeros((3, t, k_, h_))
    for b in range(3):
        k_new[b, real[b]] = k_seq[b, positions[b, real[b]]]
        v_new[b, real[b]] = v_seq[b, positions[b, real[b]]]
    q = rng.normal(size=(3, t, n_, h_))
    cast = lambda x: np.asarray(x, dtype)
    return dict(q=cast(q), k_new=cast(k_new), v_new=cast(v_new), pool_k=cast(pool_k),
                pool_v=cast(pool_v), pages=pages, before=before, real=real, positions=positions,
                layer=layer, k_seq=k_seq, v_seq=v_seq)  # fmt: skip


def run_paged(c, impl="xla", **kw):
    @jax.jit
    def f(q, k_new, v_new, pool_k, pool_v, pages, before, real, positions):
        cache = {"k": pool_k, "v": pool_v, "pages": pages, "lengths": before}
        idx = paged.index(cache, positions, real)
        pool_k = paged.write(pool_k, c["layer"], k_new, idx)
        pool_v = paged.write(pool_v, c["layer"], v_new, idx)
        y = paged.attend(q, pool_k, pool_v, c["layer"], idx, impl=impl, **kw)
        return y, pool_k

    keys = ("q", "k_new", "v_new", "pool_k", "pool_v", "pages", "before", "real", "positions")
    return jax.device_get(f(*(jnp.asarray(c[k]) for k in keys)))


@pytest.mark.parametrize("kw", [dict(), dict(window=3, softcap=2.0, scale=0.3)])
def test_paged_write_and_attention_match_naive(kw):
    """Writes land at each real token's page and nowhere else; attention over the gathered pages
    (GQA, causal within the chunk, window, soft-cap) equals a naive loop over positions."""
    c = paged_case()
    y, pool_k = run_paged(c, **kw)
    kv_len = c["before"] + c["real"].sum(1)
    want = naive_paged(c["q"], c["k_seq"], c["v_seq"], c["positions"], kv_len, c["real"], **kw)
    np.testing.assert_allclose(y[c["real"]], want[c["real"]], atol=1e-5, rtol=1e-5)
    written = np.zeros(pool_k.shape[2:4], bool)  # [NP, PS] slots written by this call
    for b in range(3):
        for p in c["positions"][b, c["real"][b]]:
            written[c["pages"][b, p // PAGE], p % PAGE] = True
            np.testing.assert_allclose(pool_k[:, 1, c["pages"][b, p // PAGE], p % PAGE],
                                       c["k_seq"][b, p], atol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(pool_k[:, :, ~written], c["pool_k"][:, :, ~written])


def test_paged_kernel_matches_xla_in_interpret_mode():
    """The TPU paged-attention kernel (impl=splash; Pallas interpret mode off TPU) equals the
    XLA gather path on a decode step with GQA and soft-capping, a row with no key included.
    Inputs are bfloat16-exact: the kernel computes on bfloat16 keys and values."""
    c = paged_case(seed=1, t=1)
    c["before"] = np.array([5, 0, 11])  # row 1: no earlier key, its one new token is masked
    c["real"] = np.array([[True], [False], [True]])
    c["positions"] = np.array([[5], [0], [11]])
    for key in ("q", "k_new", "v_new", "pool_k", "pool_v"):
        c[key] = np.asarray(jnp.asarray(c[key], jnp.bfloat16).astype(jnp.float32))
    kw = dict(softcap=3.0, scale=0.5)
    assert paged.choose("splash", 1, None) == (True, "")
    assert not paged.choose("splash", 3, None)[0] and not paged.choose("splash", 1, 4)[0]
    want, _ = run_paged(c, impl="xla", **kw)
    got, _ = run_paged(c, impl="splash", **kw)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert np.all(got[1] == 0)


@functools.cache
def mesh_8():
    return Mesh(np.array(jax.devices()).reshape(2, 2, 2), sharding.MESH_AXES)


def test_sharded_engine_equals_unsharded():
    """On the 8-device mesh (4 data-parallel shards of 2 slots and their pages, heads over
    tensor=2; chunked prefill, sampled) the engine gives the unsharded static sampler's tokens,
    log-probs within 1e-5."""
    name = "gpt2"
    cfg, graphdef, params = model(name)
    mesh, rules = mesh_8(), sharding.DEFAULT_RULES
    _, _, shardings = state_lib.param_shardings(cfg, mesh, rules)
    prompts, mask, keys = batch()
    dev = sharding.put_batch({"prompts": prompts, "mask": mask}, mesh, rules)
    keys = jax.device_put(keys, sharding.batch_sharding(mesh, rules, 1))
    out = engine.generate(
        graphdef, jax.device_put(params, shardings), dev["prompts"], dev["mask"], keys,
        max_new_tokens=T_NEW, eos_id=EOS, pad_id=PAD, **SAMPLED, mesh=mesh, rules=rules,
        num_slots=8, page_size=PAGE, num_pages=24, prefill_chunk=3, prefill_rows=4,
    )  # fmt: skip
    assert out["tokens"].sharding.spec[0] == ("data", "fsdp")
    assert_same_rows(jax.device_get(out), reference(name, True))


# Ids at which rows park for the host: greedy rows 4, 7 and 8 emit one first, sampled rows often.
YIELDS = (64, 216, 343) + tuple(i for i in range(7, V, 13) if i not in EOS)


def test_multi_turn_rows_continue_from_inserted_tokens():
    """Rows park at a yield id; the host inserts tokens; each continuation equals the static
    sampler's on the concatenated prompt (greedy); inserted tokens get no log-prob; at T=0.7
    the engine's log-probs equal teacher-forced ones of the final sequences at generated
    positions; every page is back in the pool at the end."""
    name = "gpt2"
    _, graphdef, params = model(name)
    prompts, mask, keys = batch()
    sample = engine.make_engine(
        graphdef, max_new_tokens=T_NEW, eos_id=EOS, pad_id=PAD, num_slots=SLOTS,
        page_size=PAGE, prefill_chunk=3, prefill_rows=1, yield_ids=YIELDS,
    )  # fmt: skip
    inserted = np.array([7, 300, 41], np.int32)

    def converse(knobs):
        """A parked row gets `inserted` once (when it has room); parking again ends it."""
        r = sample.start(params, prompts, mask, keys, **knobs)
        turns = {}  # row -> response tokens before its insertion
        while not r.run().done:
            lengths = r.view()["lengths"]
            new = [i for i in r.parked if i not in turns]
            room = [i for i in new if lengths[i] + len(inserted) <= T_NEW]
            turns.update({i: int(lengths[i]) for i in room})
            r.append(room, [inserted] * len(room))
            r.end([i for i in r.parked if i not in room])
        assert np.all(jax.device_get(r.state["pool"]["free"]))  # every page given back
        return jax.device_get(r.result()), turns

    out, turns = converse(dict(greedy=True))
    assert sorted(turns) == [4, 7, 8]
    for i, at in turns.items():
        np.testing.assert_array_equal(out["response"][i, at : at + 3], inserted)
        assert out["generated"][i, at : at + 3].tolist() == [False] * 3
        assert (out["logprobs"][i, at : at + 3] == 0).all()
        assert out["generated"][i, :at].all() and out["response_mask"][i, : at + 3].all()
    rows = sorted(turns)
    cont = [np.concatenate([prompts[i][mask[i]], out["response"][i, : turns[i]], inserted])
            for i in rows]  # fmt: skip
    left = T_NEW - min(turns.values()) - len(inserted)
    ref = static(name, EOS + YIELDS, left)(
        params, *left_pad(cont, max(map(len, cont))), keys[np.array(rows)], greedy=True
    )
    for j, i in enumerate(rows):
        begin = turns[i] + len(inserted)
        n = int(out["lengths"][i]) - begin
        np.testing.assert_array_equal(out["response"][i, begin : begin + n], ref["response"][j, :n])
        if out["lengths"][i] < T_NEW:  # it stopped (eos, or parked again and ended) as static
            assert int(ref["lengths"][j]) == n

    out, turns = converse(dict(temperature=0.7))
    assert turns and not out["generated"][out["response_mask"]].all()
    full_mask = np.concatenate([mask, out["response_mask"]], 1)
    tf = jax.jit(
        lambda p, t, m: likelihood.teacher_forced_logprobs(
            graphdef, p, t, m, start=prompts.shape[1] - 1, temperature=0.7
        )
    )(params, out["tokens"], full_mask)
    gen = out["generated"]
    np.testing.assert_allclose(np.asarray(tf)[gen], out["logprobs"][gen], atol=1e-5)


def test_clear_errors():
    graphdef = model("gpt2")[1]
    make = lambda **kw: engine.make_engine(graphdef, max_new_tokens=T_NEW, eos_id=EOS,
                                           pad_id=PAD, page_size=PAGE, **kw)  # fmt: skip
    with pytest.raises(ValueError, match="cannot hold one row of max length 8 \\+ 10"):
        make(num_pages=4).sizes(12, 8)
    with pytest.raises(ValueError, match="does not divide over 4"):
        engine.make_engine(graphdef, max_new_tokens=T_NEW, eos_id=EOS, pad_id=PAD, num_slots=6,
                           mesh=mesh_8()).sizes(12, 8)  # fmt: skip
    with pytest.raises(ValueError, match="use sample.start"):
        make(num_slots=SLOTS, yield_ids=5)(model("gpt2")[2], *batch(), greedy=True)
    r = make(num_slots=SLOTS, yield_ids=5).start(model("gpt2")[2], *batch(), greedy=True)
    with pytest.raises(ValueError, match="row 0 is not parked"):
        r.append([0], [[1, 2]])


def test_prefill_sizes_compiled_are_those_a_run_can_use():
    """Each prefill size compiles a model: in one wave (a slot per row, a full pool, whole
    prompts, no yields) the only call has every slot, so only that size is compiled; a queue, a
    tight pool, chunks or yields need the smaller ones (1, 2, 4, ... rows per shard)."""
    sizes = engine.loop.sizes
    assert sizes(12, 8, 10).prefill_buckets == (12,)
    assert sizes(12, 8, 10, num_slots=16).prefill_buckets == (16,)
    assert sizes(12, 8, 10, shards=4).prefill_buckets == (3,)
    assert sizes(12, 8, 10, num_slots=4).prefill_buckets == (1, 2, 4)  # a queue
    assert sizes(12, 8, 10, num_pages=20).prefill_buckets == (1, 2, 4, 8, 12)  # a tight pool
    assert sizes(12, 8, 10, prefill_chunk=3).prefill_buckets == (1, 2, 4, 8, 12)
    assert sizes(12, 8, 10, prefill_rows=4).prefill_buckets == (1, 2, 4)
    assert sizes(12, 8, 10, yields=True).prefill_buckets == (1, 2, 4, 8, 12)
    # The one-wave program still gives the static sampler's rows (12 rows, 12 slots).
    one_wave = engine.make_engine(model("gpt2")[1], max_new_tokens=T_NEW, eos_id=EOS,
                                  pad_id=PAD, page_size=PAGE)  # fmt: skip
    out = jax.device_get(one_wave(model("gpt2")[2], *batch(), greedy=True))
    assert_same_rows(out, reference("gpt2", False))
    assert int(out["prefill_calls"]) == 1 and int(out["preemptions"]) == 0
