"""GRPO / RLOO math (rlhf_jax/rl/grpo.py) against naive numpy loops, ragged lengths and all-equal
groups included, under jax.jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rl import grpo

G, N, T = 4, 3, 7
LENGTHS = (1, 7, 3, 5, 2, 6, 7, 4, 1, 3, 5, 2)  # B = N * G ragged response lengths

adv_jit = jax.jit(
    grpo.group_advantages, static_argnames=("group_size", "kind", "scale_std", "std_scope")
)
loss_jit = jax.jit(grpo.policy_loss, static_argnames=("norm",))
pen_jit = jax.jit(grpo.kl_penalized_scores)


def make_mask():
    mask = np.zeros((N * G, T), np.float32)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    return mask


def garbage(x, mask, rng):
    junk = rng.choice(np.array([np.nan, np.inf, -1e30], np.float32), size=x.shape)
    return np.where(mask > 0, x, junk).astype(np.float32)


def scores_with_flat_group(rng):
    s = rng.normal(0, 1, N * G).astype(np.float32)
    s[G : 2 * G] = 0.1  # an all-equal group (0.1 * 3 / 3 != 0.1 in floating point)
    return s


def naive_adv(scores, kind, scale_std, eps=1e-6, std_scope="group"):
    out = np.zeros(len(scores))
    every = [float(x) for x in scores]
    batch_mean = sum(every) / len(every)
    batch_std = math.sqrt(sum((x - batch_mean) ** 2 for x in every) / (len(every) - 1))
    for n in range(len(scores) // G):
        grp = [float(x) for x in scores[n * G : (n + 1) * G]]
        if max(grp) == min(grp):
            continue
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
        if std_scope == "batch":
            std = batch_std  # one scale for every group (TRL's scale_rewards="batch")
        for g in range(G):
            if kind == "rloo":
                others = [grp[j] for j in range(G) if j != g]
                a = grp[g] - sum(others) / (G - 1)
            else:
                a = grp[g] - mean
                if scale_std:
                    a /= std + eps
            out[n * G + g] = a
    return out


@pytest.mark.parametrize("kind,scale_std", [("grpo", True), ("grpo", False), ("rloo", True)])
def test_group_advantages_match_numpy(kind, scale_std):
    s = scores_with_flat_group(np.random.default_rng(0))
    adv = np.asarray(adv_jit(s, group_size=G, kind=kind, scale_std=scale_std))
    np.testing.assert_allclose(adv, naive_adv(s, kind, scale_std), rtol=1e-5, atol=1e-6)
    assert np.all(adv[G : 2 * G] == 0.0)  # exactly, not rounding noise and not NaN


def test_batch_std_scope_matches_numpy():
    """TRL's scale_rewards="batch": each group's mean is subtracted, then every advantage is
    divided by ONE std, that of all N * G scores; a low-spread group keeps its small scale."""
    s = scores_with_flat_group(np.random.default_rng(4))
    s[2 * G : 3 * G] = 0.01 * s[2 * G : 3 * G]  # a group whose scores barely differ
    adv = np.asarray(adv_jit(s, group_size=G, std_scope="batch"))
    want = naive_adv(s, "grpo", True, std_scope="batch")
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-7)
    assert np.all(adv[G : 2 * G] == 0.0)
    group = np.asarray(adv_jit(s, group_size=G))  # the group std scales it back up to ~1
    assert np.abs(adv[2 * G :]).max() < 0.1 < np.abs(group[2 * G :]).max()
    assert np.all(np.asarray(adv_jit(np.full(N * G, 2.0, np.float32), G, std_scope="batch")) == 0)


def test_batch_std_scope_is_grpo_with_std_only():
    s = jnp.arange(N * G, dtype=jnp.float32)
    for kw in (dict(kind="rloo"), dict(scale_std=False)):
        with pytest.raises(ValueError, match="batch std"):
            grpo.group_advantages(s, G, std_scope="batch", **kw)
    with pytest.raises(ValueError, match="unknown grpo std scope: 'global'"):
        grpo.group_advantages(s, G, std_scope="global")


def test_all_equal_everything_gives_zero_not_nan():
    for kind in grpo.ADVANTAGES:
        adv = np.asarray(adv_jit(np.full(N * G, 3.7, np.float32), group_size=G, kind=kind))
        assert np.all(adv == 0.0)


def test_group_of_one_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        grpo.group_advantages(jnp.zeros(4), 1)


def naive_loss(logp, logp_old, logp_ref, adv, mask, clip, beta, norm, clip_high=None):
    clip_high = clip if clip_high is None else clip_high
    per_seq, tok_sum, n_tok, clipped, ratios, kls = [], 0.0, 0, 0, 0.0, 0.0
    for b in range(mask.shape[0]):
        seq = 0.0
        length = int(mask[b].sum())
        for t in range(length):
            rho = math.exp(float(logp[b, t]) - float(logp_old[b, t]))
            a = float(adv[b])
            surr = -min(rho * a, min(max(rho, 1 - clip), 1 + clip_high) * a)
            d = float(logp_ref[b, t]) - float(logp[b, t])
            k3 = math.exp(d) - d - 1
            seq += surr + beta * k3
            clipped += (rho < 1 - clip and a < 0) or (rho > 1 + clip_high and a > 0)  # binds
            ratios += rho
            kls += k3
        per_seq.append(seq / length)
        tok_sum += seq
        n_tok += length
    loss = {
        "sequence": sum(per_seq) / len(per_seq),
        "token": tok_sum / n_tok,
        "constant": tok_sum / (mask.shape[0] * mask.shape[1]),
    }[norm]
    return loss, clipped / n_tok, ratios / n_tok, kls / n_tok


@pytest.mark.parametrize("norm", grpo.NORMS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_matches_numpy(norm, beta):
    rng = np.random.default_rng(1)
    mask = make_mask()
    logp_old = rng.normal(-2, 1, mask.shape).astype(np.float32)
    logp = logp_old + rng.normal(0, 0.3, mask.shape).astype(np.float32)  # some ratios clip
    logp_ref = logp_old + rng.normal(0, 0.5, mask.shape).astype(np.float32)
    adv = rng.normal(0, 1, N * G).astype(np.float32)
    args = [garbage(x, mask, rng) for x in (logp, logp_old, logp_ref)]
    loss, m = loss_jit(*args, adv, mask, clip=0.2, kl_coef=beta, norm=norm)
    want, clipfrac, ratio, kl = naive_loss(logp, logp_old, logp_ref, adv, mask, 0.2, beta, norm)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["clipfrac"]), clipfrac, rtol=1e-6)
    np.testing.assert_allclose(float(m["ratio"]), ratio, rtol=1e-5)
    np.testing.assert_allclose(float(m["kl"]), kl, rtol=1e-5)
    assert 0 < clipfrac < 1

    # The gradient never sees padding.
    g = jax.grad(
        lambda lp: grpo.policy_loss(lp, *args[1:], adv, mask, clip=0.2, kl_coef=beta, norm=norm)[0]
    )(jnp.asarray(args[0]))
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.all(g[mask == 0] == 0)


def test_constant_norm_weighs_tokens_alike_whatever_the_length():
    """Dr. GRPO: a token's gradient weight is 1 / (B T) in a short and a long response alike;
    GRPO's per-sequence mean gives a 1-token response's token T times the weight."""
    mask = make_mask()
    z = np.zeros(mask.shape, np.float32)
    adv = np.ones(N * G, np.float32)
    for norm, expect in (("constant", lambda b: 1 / (N * G * T)), ("sequence", None)):
        f = lambda lp, norm=norm: grpo.policy_loss(
            lp, z, z, adv, mask, clip=0.2, kl_coef=0.0, norm=norm
        )[0]
        g = np.asarray(jax.grad(f)(jnp.asarray(z)))
        for b, n in enumerate(LENGTHS):
            want = expect(b) if expect else 1 / (N * G * n)
            np.testing.assert_allclose(-g[b, :n], want, rtol=1e-6)


def test_first_minibatch_ratio_is_exactly_one():
    mask = make_mask()
    logp = np.random.default_rng(2).normal(-2, 1, mask.shape).astype(np.float32)
    _, m = loss_jit(logp, logp, logp, np.ones(N * G, np.float32), mask, clip=0.2, kl_coef=0.1)
    assert float(m["ratio"]) == 1.0 and float(m["clipfrac"]) == 0.0 and float(m["kl"]) == 0.0


def test_kl_in_reward_matches_numpy():
    rng = np.random.default_rng(3)
    mask = make_mask()
    logp, logp_ref = (rng.normal(-2, 1, mask.shape).astype(np.float32) for _ in range(2))
    s = rng.normal(0, 1, N * G).astype(np.float32)
    pen, kl = pen_jit(s, garbage(logp, mask, rng), garbage(logp_ref, mask, rng), mask, 0.05)
    for b, n in enumerate(LENGTHS):
        want = sum(float(logp[b, t]) - float(logp_ref[b, t]) for t in range(n))
        np.testing.assert_allclose(float(kl[b]), want, rtol=1e-5)
        np.testing.assert_allclose(float(pen[b]), float(s[b]) - 0.05 * want, rtol=1e-5)


def test_clipfrac_counts_only_where_the_clip_binds():
    """A ratio outside [1 - eps, 1 + eps] is clipped only where min() picks the clipped term:
    above with A > 0, below with A < 0 (elsewhere the gradient still flows)."""
    ratio = np.array([[1.5], [1.5], [0.5], [0.5], [1.0]], np.float32)
    adv = np.array([1.0, -1.0, 1.0, -1.0, 1.0], np.float32)
    z = np.zeros_like(ratio)
    _, m = loss_jit(np.log(ratio), z, z, adv, np.ones_like(ratio), clip=0.2, kl_coef=0.0)
    assert float(m["clipfrac"]) == pytest.approx(2 / 5)  # rows 0 and 3 only


@pytest.mark.parametrize("norm", grpo.NORMS)
def test_asymmetric_clip_matches_numpy(norm):
    """DAPO's clip-higher: the ratio is clipped to [1 - 0.2, 1 + 0.28]; ratios in (1.2, 1.28]
    with A > 0 still carry gradient, so the loss and the clip fraction differ from the
    symmetric clip's."""
    rng = np.random.default_rng(5)
    mask = make_mask()
    logp_old = rng.normal(-2, 1, mask.shape).astype(np.float32)
    logp = logp_old + rng.normal(0, 0.3, mask.shape).astype(np.float32)
    adv = rng.normal(0, 1, N * G).astype(np.float32)
    adv[1] = abs(adv[1])
    logp[1, 1] = logp_old[1, 1] + np.log(1.24)  # in the band, A > 0: clipped only if symmetric
    args = [garbage(x, mask, rng) for x in (logp, logp, logp_old)]
    args = [args[0], args[2], args[1]]  # logp, logp_old, logp_ref = logp (no KL)
    loss, m = loss_jit(*args, adv, mask, clip=0.2, kl_coef=0.0, norm=norm, clip_high=0.28)
    want, clipfrac, _, _ = naive_loss(logp, logp_old, logp, adv, mask, 0.2, 0.0, norm, 0.28)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["clipfrac"]), clipfrac, rtol=1e-6)
    sym, sym_frac, _, _ = naive_loss(logp, logp_old, logp, adv, mask, 0.2, 0.0, norm)
    assert abs(want - sym) > 1e-4 and clipfrac < sym_frac  # the inputs exercise the band
    # clip_high=None is the symmetric clip (today's behaviour).
    loss_none, _ = loss_jit(*args, adv, mask, clip=0.2, kl_coef=0.0, norm=norm)
    np.testing.assert_allclose(float(loss_none), sym, rtol=1e-5)


def test_clipfrac_counts_the_high_side_at_clip_high():
    ratio = np.array([[1.25], [1.25], [1.3], [0.75], [0.85]], np.float32)
    adv = np.array([1.0, -1.0, 1.0, -1.0, -1.0], np.float32)
    z = np.zeros_like(ratio)
    kw = dict(clip=0.2, kl_coef=0.0, clip_high=0.28)
    _, m = loss_jit(np.log(ratio), z, z, adv, np.ones_like(ratio), **kw)
    assert float(m["clipfrac"]) == pytest.approx(2 / 5)  # 1.3 with A > 0, 0.75 with A < 0
