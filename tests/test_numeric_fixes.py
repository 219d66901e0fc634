"""Log-prob numerics across sampling, PPO and the LM head, each against a naive numpy reference:
PPO scores and trains under the distribution that sampled the tokens (temperature), top-k /
top-p sampler log-probs are renormalised, the head runs in float32 under bf16 compute, and
PPO's forwards unembed only the response positions."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_ppo
from flax import nnx

from experiments import common, ppo_ptx
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import sharding
from rlhf_jax.models import config as model_config
from rlhf_jax.models import transformer as M
from rlhf_jax.rl import losses
from rlhf_jax.sampling import sampler
from rlhf_jax.stages import ppo_steps

PAD, V = 0, 512
LENGTHS = (6, 4, 3, 5)  # real prompt tokens per row; P = 6
P, T = 6, 5


def pure(cfg, seed):
    g, params = nnx.split(M.build(cfg, seed), nnx.Param)
    return g, nnx.to_pure_dict(params)


def prompts():
    rng = np.random.default_rng(0)
    tokens = np.full((len(LENGTHS), P), PAD, np.int32)
    mask = np.zeros((len(LENGTHS), P), bool)
    for i, n in enumerate(LENGTHS):
        tokens[i, P - n :], mask[i, P - n :] = rng.integers(4, V, n), True
    return tokens, mask


def row_keys():
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(5), i))(jnp.arange(len(LENGTHS)))


def full_logits(graphdef, params, tokens, mask):
    """Logits [B, S, V] of one plain full forward (no cache), as float64 numpy."""
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    model = nnx.merge(graphdef, params)
    return np.asarray(model(tokens, positions=positions, key_mask=mask)[0], np.float64)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def picked(logp, targets):
    return np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def naive_response_logprobs(logits, tokens, temperature):
    """[B, T] log softmax(logits / temperature) of the response tokens, float64."""
    z = logits[:, P - 1 : -1] / temperature
    return picked(np_log_softmax(z), tokens[:, P:])


@functools.cache
def ppo_models():
    pcfg = model_config.preset("tiny", dtype="float32", family="llama")
    pg, policy = pure(pcfg, 0)
    _, ref = pure(pcfg, 1)  # a different reference, so the KL is not 0
    vg, value = pure(dataclasses.replace(pcfg, head="scalar"), 2)
    return {"policy": pg, "value": vg}, {"policy": policy, "value": value}, ref


def ppo_cfg(**kw):
    """test_ppo's tiny PPO config, with two minibatches of two rows and a larger step."""
    base = dict(minibatch_rows=2, updates_per_epoch=2, policy_lr=1e-2, value_lr=1e-2)
    return test_ppo.cfg_with(**{**base, **kw})


@pytest.mark.slow
def test_ppo_scores_and_trains_under_the_sampling_temperature():
    temp = 0.7
    graphdefs, params, ref = ppo_models()
    tokens, mask = prompts()
    sample = sampler.make_sampler(graphdefs["policy"], max_new_tokens=T, eos_id=-1, pad_id=PAD)
    out = jax.device_get(sample(params["policy"], tokens, mask, row_keys(), temperature=temp))
    rollout = {"tokens": out["tokens"], "prompt_mask": mask, "response_mask": out["response_mask"]}
    full_mask = np.concatenate([mask, out["response_mask"]], 1)

    # The sampler reports the log-probs of softmax(logits / T), the distribution it drew from.
    pol = naive_response_logprobs(
        full_logits(graphdefs["policy"], params["policy"], out["tokens"], full_mask),
        out["tokens"],
        temp,
    )
    np.testing.assert_allclose(out["logprobs"], pol, atol=2e-5)

    mesh = mesh_lib.build_mesh(common.mesh_config(), jax.devices()[:1])
    rules = sharding.normalize_rules(sharding.DEFAULT_RULES)
    cfg = ppo_cfg(temperature=temp)
    kw = dict(graphdefs=graphdefs, cfg=cfg, p=P, mesh=mesh, rules=rules)
    frozen = {
        "ref": ref,
        "kl_coef": jnp.float32(0.1),
        "reward_bias": jnp.float32(0.0),
        "ext_scores": jnp.asarray([1.0, -1.0, 0.5, 2.0], jnp.float32),
    }
    batch, m = jax.jit(functools.partial(ppo_steps.score_step, **kw))(params, frozen, rollout)
    batch = jax.device_get(batch)
    # logp_old is the teacher-forced log-prob under the same distribution: it equals the
    # sampler's own, so the rollout is on-policy.
    np.testing.assert_allclose(batch["logp_old"], out["logprobs"], atol=2e-5)
    # The KL penalty compares policy and reference both at the sampling temperature.
    refl = naive_response_logprobs(
        full_logits(graphdefs["policy"], ref, out["tokens"], full_mask), out["tokens"], temp
    )
    np.testing.assert_allclose(float(m["ppo/kl_per_token"]), np.mean(pol - refl), atol=2e-5)

    tx = ppo_steps.make_tx(cfg, 10)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": {k: tx[k].init(params[k]) for k in params},
    }
    update = jax.jit(functools.partial(ppo_steps.update_step, tx=tx, **kw))
    _, um = update(state, batch, None, jax.random.key(0))
    # One to float32 rounding: score and update are compiled apart, and an ulp (1.0000005) was
    # seen on another CPU; an off-policy temperature is off by percents.
    assert float(um["ppo/first_ratio_max"]) == pytest.approx(1.0, abs=1e-5)
    assert float(um["ppo/first_ratio_mean"]) == pytest.approx(1.0, abs=1e-5)


def test_filtered_sampler_logprobs_are_renormalised():
    """top-k / top-p: the reported log-prob is that of the renormalised kept set."""
    graphdefs, params, _ = ppo_models()
    tokens, mask = prompts()
    sample = sampler.make_sampler(graphdefs["policy"], max_new_tokens=T, eos_id=-1, pad_id=PAD)
    temp, top_k, top_p = 0.8, 20, 0.9
    out = jax.device_get(
        sample(
            params["policy"], tokens, mask, row_keys(), temperature=temp, top_k=top_k, top_p=top_p
        )
    )
    full_mask = np.concatenate([mask, out["response_mask"]], 1)
    logits = full_logits(graphdefs["policy"], params["policy"], out["tokens"], full_mask)
    z = logits[:, P - 1 : -1] / temp  # [B, T, V]
    want = np.zeros(z.shape[:2])
    for b in range(z.shape[0]):
        for t in range(z.shape[1]):
            order = np.argsort(-z[b, t], kind="stable")
            kept = order[:top_k]
            prob = np.exp(z[b, t, kept] - z[b, t, kept].max())
            prob /= prob.sum()
            before = np.cumsum(prob) - prob
            kept = kept[before < top_p]
            tok = out["tokens"][b, P + t]
            assert tok in kept
            want[b, t] = z[b, t, tok] - np.log(np.exp(z[b, t, kept]).sum())
    np.testing.assert_allclose(out["logprobs"], want, atol=2e-5)


def test_ppo_refuses_top_k_and_top_p_in_one_sentence():
    for key, value in (("top_k", 5), ("top_p", 0.9)):
        c = ppo_ptx.get_config()
        c.ppo[key] = value
        with pytest.raises(ValueError, match=f"ppo.{key}={value}.*supports temperature only"):
            ppo_steps.ppo_config_from(c, eos_id=3)
    c = ppo_ptx.get_config()
    c.ppo.temperature = 0.7
    assert ppo_steps.ppo_config_from(c, eos_id=3).temperature == 0.7


def bf16_model():
    """A bf16-compute model whose logits are O(10), where bf16 rounding costs ~1e-2 nats."""
    cfg = model_config.preset("tiny", dtype="bfloat16", family="llama")
    g, params = pure(cfg, 3)
    params["lm_head"] = params["lm_head"] * 40.0
    return cfg, g, params


def with_f32_head_reference(g, params, tokens, mask, fn):
    """(fn(params), log softmax of float64 hidden @ W [B, S, V]) from ONE jitted program, so
    the bf16 trunk is compiled once and only the head differs: hidden [B, S, D] comes from
    the model (`return_hidden`), the reference head is numpy."""
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)

    def both(p):
        hidden, _ = nnx.merge(g, p)(tokens, positions=positions, key_mask=mask, return_hidden=True)
        return fn(p), hidden

    got, hidden = jax.jit(both)(params)
    logits = np.asarray(hidden, np.float64) @ np.asarray(params["lm_head"], np.float64)
    return jax.device_get(got), np_log_softmax(logits)


@pytest.mark.slow
def test_bf16_compute_takes_logprobs_from_a_float32_head():
    cfg, g, params = bf16_model()
    rng = np.random.default_rng(1)
    tokens, pmask = prompts()
    tokens = np.concatenate([tokens, rng.integers(4, V, (len(LENGTHS), T)).astype(np.int32)], 1)
    mask = np.concatenate([pmask, np.ones((len(LENGTHS), T), bool)], 1)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    targets = tokens[:, 1:]
    real = np.asarray(mask[:, :-1] & mask[:, 1:])
    check = functools.partial(with_f32_head_reference, g, params, tokens, mask)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)

    # The model's own logits (the LM / SFT / ptx loss path).
    def lm(p):
        logits = nnx.merge(g, p)(tokens, positions=positions, key_mask=mask)[0][:, :-1]
        nll, _ = losses.masked_xent(logits, targets, real)
        return logits.dtype == jnp.float32, losses.token_logprobs(logits, targets), nll

    (is_f32, lp, nll), ref = check(lm)
    ref_next = picked(ref[:, :-1], np.asarray(targets))  # [B, S-1]
    assert np.abs(ref).max() > 5  # the regime where bf16 logits are off by ~1e-2
    assert is_f32
    np.testing.assert_allclose(lp[real], ref_next[real], atol=1e-5)
    np.testing.assert_allclose(nll, -ref_next[real].sum(), rtol=1e-6)

    # Teacher-forced scoring (likelihood, best-of-K's KL) and PPO's response log-probs.
    seq, ref = check(lambda p: sampler.sequence_logprobs(g, p, tokens, mask))
    np.testing.assert_allclose(seq[real], picked(ref[:, :-1], np.asarray(targets))[real], atol=1e-5)
    pol, ref = check(lambda p: ppo_steps.policy_forward(g, p, tokens, mask, P)[0])
    np.testing.assert_allclose(
        pol, picked(ref[:, P - 1 : -1], np.asarray(tokens[:, P:])), atol=1e-5
    )

    # The sampler's prefill and decode logits are float32 too.
    model = nnx.merge(g, params)
    prefill_logits, cache, _ = sampler.prefill(model, tokens[:, :P], pmask, P + T)
    step_logits, _ = sampler.decode_step(model, cache, tokens[:, P], jnp.asarray(LENGTHS))
    assert prefill_logits.dtype == step_logits.dtype == jnp.float32


def shapes_in(jaxpr) -> set:
    """Every intermediate's shape in a closed jaxpr, sub-jaxprs (scan, jit, ...) included."""
    out = set()
    for eqn in jaxpr.eqns:
        out |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    out |= shapes_in(sub)
    return out


def test_ppo_forward_unembeds_only_the_response_positions():
    graphdefs, params, _ = ppo_models()
    g, pp = graphdefs["policy"], params["policy"]
    rng = np.random.default_rng(2)
    tokens, pmask = prompts()
    tokens = jnp.asarray(
        np.concatenate([tokens, rng.integers(4, V, (len(LENGTHS), T)).astype(np.int32)], 1)
    )
    mask = jnp.asarray(np.concatenate([pmask, np.ones((len(LENGTHS), T), bool)], 1))
    b = len(LENGTHS)

    fwd = functools.partial(ppo_steps.policy_forward, g, p=P)
    logp, logits = jax.jit(fwd)(pp, tokens, mask)
    assert logits.shape == (b, T, V)
    # The same log-probs as unembedding every position and dropping the prompt's.
    old = full_logits(g, pp, tokens, mask)[:, P - 1 : -1]
    want = picked(np_log_softmax(old), np.asarray(tokens[:, P:]))
    np.testing.assert_allclose(np.asarray(logp), want, atol=1e-5)
    # No [B, P + T (- 1), V] logits are ever computed, only [B, T, V].
    for fn in (fwd, functools.partial(sampler.sequence_logprobs, g, start=P - 1)):
        shapes = shapes_in(jax.make_jaxpr(fn)(pp, tokens, mask).jaxpr)
        assert (b, T, V) in shapes
        assert not {(b, P + T, V), (b, P + T - 1, V)} & shapes
    np.testing.assert_allclose(
        np.asarray(jax.jit(fn)(pp, tokens, mask)), np.asarray(logp), atol=1e-6
    )
