"""Sampling: cached decoding vs full forwards, greedy vs a naive loop, padding/batch invariance,
logprobs vs teacher forcing, temperature / top-k / top-p distributions, EOS stop (one id or
several), sharding."""

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
from rlhf_jax.models import transformer as M
from rlhf_jax.sampling import sampler

# Two models cover both families, unrolled and scanned layers: GPT-2 (learned positions, unrolled)
# and a LLaMA-family model in the Gemma 3 style, the one that exercises the most of the decode
# path: GQA, RoPE with a local and a global base, q/k and sandwich norms, GeGLU, a decoupled head
# dim, one local layer (a window of 4, crossed by the prompts of 8 and the 10 new tokens) and one
# global layer in a scan, soft-caps that bend these small logits, a query scale that is not H.
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
NAMES = list(CONFIGS)
PAD, T_NEW, V = 0, 10, 512
LENGTHS = (8, 5, 3, 6)  # real prompt tokens per row; P = 8


@functools.cache
def model(name):
    cfg = model_config.preset("tiny", dtype="float32", **CONFIGS[name])
    graphdef, params = nnx.split(M.build(cfg, seed=0), nnx.Param)
    return cfg, graphdef, nnx.to_pure_dict(params)


@functools.cache
def compiled(name, eos_id=-1, t_new=T_NEW):
    """Memoised so each (model, eos, shape, mode) compiles once per test session."""
    return sampler.make_sampler(model(name)[1], max_new_tokens=t_new, eos_id=eos_id, pad_id=PAD)


def left_pad(rows, width):
    tokens = np.full((len(rows), width), PAD, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r) :], mask[i, width - len(r) :] = r, True
    return tokens, mask


def prompt_rows():
    rng = np.random.default_rng(0)
    return [rng.integers(4, V, n).astype(np.int32) for n in LENGTHS]


def keys_for(example_ids):
    root = jax.random.key(42)
    return jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.asarray(example_ids))


def batch():
    tokens, mask = left_pad(prompt_rows(), max(LENGTHS))
    return tokens, mask, keys_for(np.arange(len(LENGTHS)))


@functools.cache
def teacher_forced_fn(name):
    """Jitted full forward (no cache) of padded rows and `sequence_logprobs`, in one compile:
    (params, tokens [B, S], mask [B, S]) -> (logits [B, S, V], logprobs [B, S-1])."""
    graphdef = model(name)[1]

    @jax.jit
    def f(params, tokens, mask):
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
        logits = nnx.merge(graphdef, params)(tokens, positions=positions, key_mask=mask)[0]
        return logits, sampler.sequence_logprobs(graphdef, params, tokens, mask)

    return f


def full_logits(name, params, tokens, mask):
    return np.asarray(teacher_forced_fn(name)(params, tokens, mask)[0])


@functools.cache
def greedy_reference(name):
    params = model(name)[2]
    return jax.device_get(compiled(name)(params, *batch(), greedy=True))


@pytest.mark.parametrize("name", NAMES)
def test_prefill_and_decode_steps_match_full_forward(name):
    """The loop's own prefill and decode step, teacher-forced, against one full forward."""
    cfg, graphdef, params = model(name)
    prompts, mask, _ = batch()
    b, p = prompts.shape
    cont = np.random.default_rng(1).integers(4, V, (b, T_NEW)).astype(np.int32)
    merge = functools.partial(nnx.merge, graphdef)
    prefill = jax.jit(lambda params, x, m: sampler.prefill(merge(params), x, m, p + T_NEW))
    step = jax.jit(lambda params, c, x, pos: sampler.decode_step(merge(params), c, x, pos))
    logits, cache, lengths = prefill(params, prompts, mask)
    outs = [logits]
    for t in range(T_NEW - 1):  # one compiled step, fed teacher-forced tokens
        logits, cache = step(params, cache, cont[:, t], lengths + t)
        outs.append(logits)
    got = np.stack(outs, axis=1)  # [B, T, V]
    tokens = np.concatenate([prompts, cont], 1)
    full_mask = np.concatenate([mask, np.ones_like(cont, bool)], 1)
    want = full_logits(name, params, tokens, full_mask)[:, p - 1 : -1]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert int(cache["index"]) == p + T_NEW - 1


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_argmax_of_full_forward_loop(name):
    _, _, params = model(name)
    prompts, mask, _ = batch()
    p = prompts.shape[1]
    seq = np.concatenate([prompts, np.full((len(prompts), T_NEW), PAD, np.int32)], 1)
    seq_mask = np.concatenate([mask, np.zeros((len(prompts), T_NEW), bool)], 1)
    for t in range(T_NEW):  # naive: a full forward per token, read the last real position
        logits = full_logits(name, params, seq, seq_mask)
        seq[:, p + t] = logits[:, p + t - 1].argmax(-1)
        seq_mask[:, p + t] = True
    out = greedy_reference(name)
    np.testing.assert_array_equal(out["tokens"], seq)
    assert out["response_mask"].all() and (out["lengths"] == T_NEW).all()
    assert int(out["steps"]) == T_NEW and not out["finished"].any()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.slow
def test_completion_independent_of_padding_and_batch(name):
    """Row 1 (5 tokens, left-padded by 3 among longer prompts) vs the same prompt alone."""
    _, _, params = model(name)
    prompts, mask, keys = batch()
    alone = prompt_rows()[1][None]  # [1, 5], no padding
    alone_mask, alone_keys = np.ones_like(alone, bool), keys_for([1])
    for knobs in (dict(greedy=True), dict(temperature=1.0)):
        among = compiled(name)(params, prompts, mask, keys, **knobs)
        single = compiled(name)(params, alone, alone_mask, alone_keys, **knobs)
        np.testing.assert_array_equal(single["response"][0], among["response"][1])
        np.testing.assert_allclose(single["logprobs"][0], among["logprobs"][1], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_logprobs_equal_teacher_forced(name):
    params = model(name)[2]
    prompts, mask, keys = batch()
    out = compiled(name)(params, prompts, mask, keys, temperature=1.0)
    full_mask = np.concatenate([mask, np.asarray(out["response_mask"])], 1)
    tf = np.asarray(teacher_forced_fn(name)(params, out["tokens"], full_mask)[1])
    p = prompts.shape[1]
    np.testing.assert_allclose(tf[:, p - 1 :], out["logprobs"], atol=1e-5)
    # Padding never leaks in: the teacher-forced logprobs of a prompt do not see its padding.
    assert (np.asarray(tf)[:, : p - 1][~(mask[:, :-1] & mask[:, 1:])] == 0).all()


@functools.partial(jax.jit, static_argnames=("n", "mode"))
def _draws(logits, knobs, n, mode):
    keys = jax.random.split(jax.random.key(7), n)
    draw = lambda k: sampler.sample_tokens(
        logits, jax.random.split(k, logits.shape[0]), knobs, mode
    )
    return jax.vmap(draw)(keys)


def sample_many(logits, n, mode, temperature=1.0, top_k=0, top_p=1.0):
    """n draws per row of `sample_tokens` on fixed logits [R, V] -> [n, R] (knobs traced)."""
    knobs = {
        "temperature": jnp.float32(temperature),
        "top_k": jnp.int32(top_k),
        "top_p": jnp.float32(top_p),
    }
    return np.asarray(_draws(jnp.asarray(logits), knobs, n, mode))


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temp", [0.5, 2.0])
def test_temperature_sampling_matches_softmax_over_temperature(temp):
    # 16 tokens; chi-square with 15 degrees of freedom: 44.26 is its 1 - 1e-4 quantile.
    threshold, n = 44.26, 40_000
    logits = np.linspace(-2, 2, 16, dtype=np.float32)[np.random.default_rng(2).permutation(16)]
    counts = np.bincount(
        sample_many(logits[None], n, "sample", temperature=temp)[:, 0], minlength=16
    )

    def chi2(p):
        return float(((counts - n * p) ** 2 / (n * p)).sum())

    assert chi2(softmax(logits / temp)) < threshold
    # The test has the power to see a wrong temperature: T^2, or no temperature at all.
    assert chi2(softmax(logits / temp**2)) > 5 * threshold
    assert chi2(softmax(logits)) > 5 * threshold


def allowed_naive(z, top_k, top_p):
    """The set top-k then nucleus keeps, by a plain loop over the sorted tokens."""
    order = np.argsort(-z, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    probs = softmax(z[order].astype(np.float64))
    kept, mass = [], 0.0
    for tok, pr in zip(order, probs, strict=True):
        if kept and top_p < 1.0 and mass >= top_p:
            break
        kept.append(int(tok))
        mass += pr
    return set(kept)


KP = [(0, 0.5), (5, 1.0), (5, 0.7), (1, 1.0), (0, 0.95), (40, 0.3), (3, 0.999)]


def test_filter_logits_keeps_exactly_the_naive_set():
    z = np.random.default_rng(3).normal(0, 2, (6, 32)).astype(np.float32)
    f = jax.jit(sampler.filter_logits)
    for k, p in KP:
        out = np.asarray(f(jnp.asarray(z), jnp.int32(k), jnp.float32(p)))
        for row in range(len(z)):
            assert set(np.flatnonzero(np.isfinite(out[row]))) == allowed_naive(z[row], k, p), (k, p)
            kept = np.isfinite(out[row])
            np.testing.assert_array_equal(out[row][kept], z[row][kept])


def test_top_k_top_p_never_emit_excluded_tokens():
    logits = np.random.default_rng(4).normal(0, 1, (4, 24)).astype(np.float32)
    temp = 0.8
    for k, p in [(4, 1.0), (0, 0.6), (6, 0.8)]:
        draws = sample_many(jnp.asarray(logits), 3000, "filter", temperature=temp, top_k=k, top_p=p)
        for row in range(len(logits)):
            allowed = allowed_naive(logits[row] / temp, k, p)
            seen = set(np.unique(draws[:, row]).tolist())
            assert seen <= allowed, (k, p, seen - allowed)
            assert seen == allowed  # and every allowed token does occur
    # End to end through the decode loop: each sampled token is in the set the model's own
    # (teacher-forced) logits allow at that step.
    _, _, params = model("gpt2")
    prompts, mask, keys = batch()
    out = compiled("gpt2")(params, prompts, mask, keys, temperature=0.7, top_k=5, top_p=0.8)
    seq_mask = np.concatenate([mask, out["response_mask"]], 1)
    pos_logits = full_logits("gpt2", params, out["tokens"], seq_mask)
    p = prompts.shape[1]
    for row in range(len(prompts)):
        for t in range(T_NEW):
            allowed = allowed_naive(pos_logits[row, p + t - 1] / 0.7, 5, 0.8)
            assert int(out["response"][row, t]) in allowed


def test_decoding_stops_at_eos():
    name = "gpt2"
    params = model(name)[2]
    prompts, mask, keys = batch()
    ref = greedy_reference(name)
    eos = int(ref["response"][0, 2])  # row 0 emits it by step 2; other rows maybe, maybe not
    out = jax.device_get(compiled(name, eos_id=eos)(params, prompts, mask, keys, greedy=True))
    lengths = []
    for row in range(len(prompts)):
        hits = np.flatnonzero(ref["response"][row] == eos)
        n = int(hits[0]) + 1 if len(hits) else T_NEW
        lengths.append(n)
        np.testing.assert_array_equal(out["response"][row, :n], ref["response"][row, :n])
        assert (out["response"][row, n:] == PAD).all()
        assert out["response_mask"][row].tolist() == [True] * n + [False] * (T_NEW - n)
        np.testing.assert_allclose(out["logprobs"][row, :n], ref["logprobs"][row, :n], atol=1e-5)
        assert (out["logprobs"][row, n:] == 0).all()
        assert bool(out["finished"][row]) == bool(len(hits))
    assert out["lengths"].tolist() == lengths and lengths[0] <= 3
    assert int(out["steps"]) == (max(lengths) if out["finished"].all() else T_NEW)

    # Every row emits EOS first: constant logits (zero norm scale, bias pointing at the EOS
    # embedding) must end the loop after one step, not T.
    const = jax.tree.map(np.array, params)
    const["final_norm"]["scale"][:] = 0.0
    const["final_norm"]["bias"][:] = 10.0 * const["embed"][eos]
    assert int(np.argmax(const["embed"] @ const["final_norm"]["bias"])) == eos
    out = compiled(name, eos_id=eos)(const, prompts, mask, keys, greedy=True)
    assert int(out["steps"]) == 1 and (np.asarray(out["lengths"]) == 1).all()
    assert (np.asarray(out["response"][:, 0]) == eos).all()
    assert (np.asarray(out["response"][:, 1:]) == PAD).all()


def test_decoding_stops_at_any_of_several_eos_ids():
    """A list of stop ids (LLaMA 3 Instruct has several): each row ends at the first of them."""
    name = "gpt2"
    params = model(name)[2]
    prompts, mask, keys = batch()
    ref = greedy_reference(name)["response"]
    # Two ids that rows emit at different steps: row 0's third token and row 1's second.
    stops = (int(ref[0, 2]), int(ref[1, 1]))
    assert stops[0] != stops[1]
    out = jax.device_get(compiled(name, eos_id=stops)(params, prompts, mask, keys, greedy=True))
    for row in range(len(prompts)):
        hits = [t for t in range(T_NEW) if int(ref[row, t]) in stops]  # naive scan
        n = hits[0] + 1 if hits else T_NEW
        np.testing.assert_array_equal(out["response"][row, :n], ref[row, :n])
        assert (out["response"][row, n:] == PAD).all()
        assert int(out["lengths"][row]) == n and bool(out["finished"][row]) == bool(hits)
    assert out["lengths"][0] <= 3 and out["lengths"][1] <= 2
    # One id given as a list is that id.
    one = jax.device_get(
        compiled(name, eos_id=(stops[0],))(params, prompts, mask, keys, greedy=True)
    )
    alone = jax.device_get(
        compiled(name, eos_id=stops[0])(params, prompts, mask, keys, greedy=True)
    )
    np.testing.assert_array_equal(one["response"], alone["response"])
    assert sampler.stop_ids(np.int32(7)) == (7,) and sampler.stop_ids([7, 9]) == (7, 9)


@pytest.mark.parametrize("name", NAMES)
def test_sharded_equals_unsharded(name):
    cfg, graphdef, params = model(name)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), sharding.MESH_AXES)
    rules = sharding.DEFAULT_RULES
    _, _, shardings = state_lib.param_shardings(cfg, mesh, rules)
    sharded_params = jax.device_put(params, shardings)
    prompts, mask, keys = batch()
    dev = sharding.put_batch({"prompts": prompts, "mask": mask}, mesh, rules)
    keys = jax.device_put(keys, sharding.batch_sharding(mesh, rules, 1))
    out = sampler.generate(
        graphdef,
        sharded_params,
        dev["prompts"],
        dev["mask"],
        keys,
        max_new_tokens=T_NEW,
        eos_id=-1,
        pad_id=PAD,
        greedy=True,
        mesh=mesh,
        rules=rules,
    )
    ref = greedy_reference(name)
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    np.testing.assert_allclose(out["logprobs"], ref["logprobs"], atol=1e-5)
    assert out["tokens"].sharding.spec[0] == ("data", "fsdp")


def test_bad_knobs_and_overlong_prompts_are_clear_errors():
    with pytest.raises(ValueError, match="top_p must be in"):
        sampler.sampling_mode(1.0, 0, 0.0, False)
    with pytest.raises(ValueError, match="temperature must be"):
        sampler.sampling_mode(-1.0, 0, 1.0, False)
    assert sampler.sampling_mode(0.0, 5, 0.5, False) == "greedy"
    _, _, params = model("gpt2")
    prompts, mask, keys = batch()
    with pytest.raises(ValueError, match="exceeds the model's learned positions"):
        compiled("gpt2", t_new=250)(params, prompts, mask, keys, greedy=True)
