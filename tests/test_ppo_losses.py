"""PPO math (rlhf_jax/rl/ppo_math.py) against naive numpy loops over (b, t), all under jax.jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rl import ppo_math as pm

B, T = 6, 9
LENGTHS = (1, 9, 4, 7, 2, 5)  # variable response lengths, incl. 1 and the full row

# Jitted once per shape: eager dispatch would compile every primitive separately (slow on CPU).
# gamma, lam, beta, eps are traced arguments, as they are when a stage sweeps or adapts them.
kl_jit = jax.jit(pm.kl_estimate, static_argnames="kind")
shaped_jit = jax.jit(pm.shaped_rewards)
gae_jit = jax.jit(pm.gae)
whiten_jit = jax.jit(pm.whiten, static_argnames="shift_mean")
masked_var_jit = jax.jit(pm.masked_var, static_argnames="unbiased")
policy_jit = jax.jit(pm.policy_loss)
value_jit = jax.jit(pm.value_loss)
entropy_jit = jax.jit(pm.entropy_from_logits)
ev_jit = jax.jit(pm.explained_variance)


def make_mask(lengths=LENGTHS, t=T):
    mask = np.zeros((len(lengths), t), np.float32)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return mask


def with_garbage(x, mask, rng):
    """x on real tokens; huge numbers, inf and NaN on padding (which must never leak)."""
    junk = rng.choice(np.array([1e30, -1e30, np.inf, np.nan, 77.0], np.float32), size=x.shape)
    return np.where(mask > 0, x, junk).astype(np.float32)


def real_tokens(mask):
    return [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t] > 0]


# ----------------------------------------------------------------------------------- KL estimates


def naive_kl(logp, logp_ref, kind):
    out = np.zeros(logp.shape, np.float64)
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            d = float(logp[b, t]) - float(logp_ref[b, t])
            if kind == "k1":
                out[b, t] = d
            elif kind == "k2":
                out[b, t] = 0.5 * d * d
            elif kind == "k3":
                out[b, t] = math.exp(-d) - 1 + d
            else:
                out[b, t] = abs(d)
    return out


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_kl_estimates_match_loops(kind):
    rng = np.random.default_rng(0)
    logp = (-rng.exponential(2.0, size=(B, T))).astype(np.float32)
    logp_ref = (logp + rng.normal(scale=0.7, size=(B, T))).astype(np.float32)
    got = np.asarray(kl_jit(logp, logp_ref, kind=kind))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, naive_kl(logp, logp_ref, kind), rtol=1e-5, atol=1e-6)
    if kind in ("k2", "k3", "abs"):
        assert (got >= 0).all()


def test_k3_is_unbiased_and_k1_is_the_paper_penalty():
    # Sampling from p, E[k3] = E[k1] = KL(p || q); k3 also holds per token for tiny differences.
    rng = np.random.default_rng(1)
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.3, 0.3, 0.4])
    kl_true = float((p * np.log(p / q)).sum())
    y = rng.choice(3, size=200_000, p=p)
    logp, logq = np.log(p[y]).astype(np.float32)[None], np.log(q[y]).astype(np.float32)[None]
    for kind in ("k1", "k3"):
        np.testing.assert_allclose(float(kl_jit(logp, logq, kind=kind).mean()), kl_true, rtol=2e-2)
    tiny = np.asarray(kl_jit(np.full((1, 1), 1e-4, np.float32), np.zeros((1, 1)), kind="k3"))
    np.testing.assert_allclose(tiny, 0.5e-8, rtol=1e-2)  # expm1: no cancellation to 0


def test_unknown_kl_kind_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown kl kind: 'k4'; expected one of \("):
        pm.kl_estimate(jnp.zeros((1, 1)), jnp.zeros((1, 1)), "k4")


# ------------------------------------------------------------------------- shaped rewards and GAE


def naive_shaped(scores, kl, mask, beta):
    out = np.zeros(mask.shape, np.float64)
    for b in range(mask.shape[0]):
        last = -1
        for t in range(mask.shape[1]):
            if mask[b, t] > 0:
                out[b, t] = -beta * float(kl[b, t])
                last = t
        out[b, last] += float(scores[b])
    return out


def naive_gae(rewards, values, mask, gamma, lam):
    adv = np.zeros(mask.shape, np.float64)
    ret = np.zeros(mask.shape, np.float64)
    for b in range(mask.shape[0]):
        n = int(sum(mask[b]))
        next_adv = 0.0
        for t in reversed(range(n)):
            next_v = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            next_adv = delta + gamma * lam * next_adv
            adv[b, t] = next_adv
            ret[b, t] = next_adv + float(values[b, t])
    return adv, ret


def rollout(seed, lengths=LENGTHS, t=T):
    rng = np.random.default_rng(seed)
    mask = make_mask(lengths, t)
    shape = mask.shape
    return dict(
        mask=mask,
        scores=rng.normal(scale=2.0, size=len(lengths)).astype(np.float32),
        kl=with_garbage(rng.normal(scale=0.3, size=shape), mask, rng),
        values=with_garbage(rng.normal(size=shape), mask, rng),
        rng=rng,
    )


@pytest.mark.parametrize("beta", [0.0, 0.02, 0.5])
def test_shaped_rewards_match_loops(beta):
    r = rollout(2)
    got = np.asarray(shaped_jit(r["scores"], r["kl"], r["mask"], beta))
    assert np.isfinite(got).all() and (got[r["mask"] == 0] == 0).all()
    want = naive_shaped(r["scores"], r["kl"], r["mask"], beta)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (1.0, 0.95), (0.9, 0.0)])
def test_gae_matches_loops_and_padding_does_not_leak(gamma, lam):
    r = rollout(3)
    mask, values = r["mask"], r["values"]
    rewards = with_garbage(r["rng"].normal(size=mask.shape), mask, r["rng"])
    adv, ret = map(np.asarray, gae_jit(rewards, values, mask, gamma, lam))
    want_adv, want_ret = naive_gae(rewards, values, mask, gamma, lam)
    assert np.isfinite(adv).all() and np.isfinite(ret).all()
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()
    # Other garbage in the padding, or more padding columns, change nothing on real tokens.
    rng = np.random.default_rng(9)
    wide = make_mask(LENGTHS, T + 3)
    pad = lambda x: with_garbage(np.pad(x, ((0, 0), (0, 3))), wide, rng)
    adv2, ret2 = gae_jit(pad(rewards), pad(values), wide, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv2)[:, :T], adv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ret2)[:, :T], ret, rtol=1e-6, atol=1e-6)


def test_gae_with_lambda_one_returns_the_reward_to_go():
    # gamma = lam = 1: returns are the undiscounted sum of future rewards, whatever V is.
    r = rollout(4)
    rewards = np.asarray(shaped_jit(r["scores"], r["kl"], r["mask"], 0.1))
    _, ret = gae_jit(rewards, r["values"], r["mask"], 1.0, 1.0)
    for b, t in real_tokens(r["mask"]):
        want = sum(float(rewards[b, k]) for k in range(t, T))
        np.testing.assert_allclose(float(ret[b, t]), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ whitening and statistics


def naive_stats(x, mask):
    xs = [float(x[b, t]) for b, t in real_tokens(mask)]
    mean = sum(xs) / len(xs)
    var = sum((v - mean) ** 2 for v in xs) / (len(xs) - 1)
    return mean, var


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_loops_and_keeps_padding_zero(shift_mean):
    r = rollout(5)
    mask = r["mask"]
    x = with_garbage(3.0 + 2.0 * r["rng"].normal(size=mask.shape), mask, r["rng"])
    got = np.asarray(whiten_jit(x, mask, shift_mean=shift_mean))
    mean, var = naive_stats(x, mask)
    assert (got[mask == 0] == 0).all()
    for b, t in real_tokens(mask):
        want = (float(x[b, t]) - mean) / math.sqrt(var + 1e-8) + (0 if shift_mean else mean)
        np.testing.assert_allclose(float(got[b, t]), want, rtol=1e-5, atol=1e-5)
    w_mean, w_var = naive_stats(got, mask)
    np.testing.assert_allclose(w_mean, 0.0 if shift_mean else mean, atol=1e-5)
    np.testing.assert_allclose(w_var, 1.0, rtol=1e-4)


def test_masked_mean_and_var_match_loops():
    r = rollout(6)
    mask, x = r["mask"], r["values"]
    mean, var = naive_stats(x, mask)
    np.testing.assert_allclose(float(jax.jit(pm.masked_mean)(x, mask)), mean, rtol=1e-5)
    np.testing.assert_allclose(float(masked_var_jit(x, mask)), var, rtol=1e-5)
    n = mask.sum()
    biased = float(masked_var_jit(x, mask, unbiased=False))
    np.testing.assert_allclose(biased, var * (n - 1) / n, rtol=1e-5)
    rows = np.asarray(jax.jit(pm.masked_mean, static_argnames="axis")(x, mask, axis=1))
    for b, n_b in enumerate(LENGTHS):
        want = sum(float(x[b, t]) for t in range(n_b)) / n_b
        np.testing.assert_allclose(rows[b], want, rtol=1e-5, atol=1e-6)


def test_explained_variance():
    r = rollout(7)
    mask, ret = r["mask"], r["values"]
    np.testing.assert_allclose(float(ev_jit(ret, ret, mask)), 1.0, atol=1e-6)
    values = with_garbage(r["rng"].normal(size=mask.shape), mask, r["rng"])
    xs = [(float(ret[b, t]), float(values[b, t])) for b, t in real_tokens(mask)]
    mean_r = sum(a for a, _ in xs) / len(xs)
    mean_e = sum(a - v for a, v in xs) / len(xs)
    var_r = sum((a - mean_r) ** 2 for a, _ in xs)
    var_e = sum((a - v - mean_e) ** 2 for a, v in xs)
    np.testing.assert_allclose(float(ev_jit(values, ret, mask)), 1 - var_e / var_r, rtol=1e-5)
    # Constant returns: nothing to explain, and the metric stays finite.
    assert float(ev_jit(values, np.full_like(ret, 2.0), mask)) == 0.0


# ----------------------------------------------------------------------------- PPO loss functions


def naive_policy(logp_new, logp_old, adv, mask, eps):
    terms, clipped, kls, ratios = [], [], [], []
    for b, t in real_tokens(mask):
        ratio = math.exp(float(logp_new[b, t]) - float(logp_old[b, t]))
        a = float(adv[b, t])
        unclipped_term = -a * ratio
        clipped_term = -a * min(max(ratio, 1 - eps), 1 + eps)
        terms.append(max(unclipped_term, clipped_term))
        clipped.append(clipped_term > unclipped_term)
        kls.append(ratio - 1 - math.log(ratio))
        ratios.append(ratio)
    n = len(terms)
    return sum(terms) / n, sum(clipped) / n, sum(kls) / n, sum(ratios) / n, max(ratios)


def policy_inputs(seed, spread):
    r = rollout(seed)
    mask, rng = r["mask"], r["rng"]
    logp_old = with_garbage(-rng.exponential(2.0, size=mask.shape), mask, rng)
    logp_new = with_garbage(logp_old + rng.normal(scale=spread, size=mask.shape), mask, rng)
    adv = with_garbage(rng.normal(size=mask.shape), mask, rng)
    return logp_new, logp_old, adv, mask


@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_policy_loss_matches_loops(eps):
    logp_new, logp_old, adv, mask = policy_inputs(8, spread=0.3)
    loss, m = policy_jit(logp_new, logp_old, adv, mask, eps)
    want = naive_policy(logp_new, logp_old, adv, mask, eps)
    got = (loss, m["clipfrac"], m["approx_kl"], m["ratio_mean"], m["ratio_max"])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(float(g), w, rtol=1e-5, atol=1e-6)
    assert 0 < float(m["clipfrac"]) < 1  # the case exercises both branches


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    _, logp_old, adv, mask = policy_inputs(9, spread=0.0)
    loss, m = policy_jit(logp_old, logp_old, adv, mask, 0.2)
    mean_adv = sum(float(adv[b, t]) for b, t in real_tokens(mask)) / mask.sum()
    np.testing.assert_allclose(float(loss), -mean_adv, rtol=1e-5, atol=1e-7)
    assert float(m["clipfrac"]) == 0.0
    assert float(m["approx_kl"]) == 0.0
    assert float(m["ratio_mean"]) == 1.0 and float(m["ratio_max"]) == 1.0


def test_policy_loss_clips_a_large_ratio():
    mask = make_mask()
    logp_old = np.full(mask.shape, -2.0, np.float32)
    logp_new = logp_old + np.float32(math.log(1.5))  # ratio 1.5 everywhere
    adv = np.where(mask > 0, 0.7, np.nan).astype(np.float32)  # positive A: clip at 1 + eps
    loss, m = policy_jit(logp_new, logp_old, adv, mask, 0.2)
    np.testing.assert_allclose(float(loss), -0.7 * 1.2, rtol=1e-6)
    assert float(m["clipfrac"]) == 1.0
    np.testing.assert_allclose(float(m["ratio_max"]), 1.5, rtol=1e-6)
    # The clipped term has no gradient in logp_new: the update stops pushing this ratio up.
    grad = jax.jit(jax.grad(lambda lp: pm.policy_loss(lp, logp_old, adv, mask, 0.2)[0]))(logp_new)
    assert (np.asarray(grad) == 0).all()


def naive_value(v_new, v_old, ret, mask, eps):
    terms, clipped, vs = [], [], []
    for b, t in real_tokens(mask):
        v, vo, r = float(v_new[b, t]), float(v_old[b, t]), float(ret[b, t])
        vc = vo + min(max(v - vo, -eps), eps)
        terms.append(max((v - r) ** 2, (vc - r) ** 2))
        clipped.append((vc - r) ** 2 > (v - r) ** 2)
        vs.append(v)
    n = len(terms)
    return 0.5 * sum(terms) / n, sum(clipped) / n, sum(vs) / n


@pytest.mark.parametrize("eps", [0.05, 0.2, 100.0])
def test_value_loss_matches_loops(eps):
    r = rollout(10)
    mask, rng = r["mask"], r["rng"]
    v_old = r["values"]
    v_new = with_garbage(v_old + rng.normal(scale=0.3, size=mask.shape), mask, rng)
    ret = with_garbage(rng.normal(size=mask.shape), mask, rng)
    loss, m = value_jit(v_new, v_old, ret, mask, eps)
    want = naive_value(v_new, v_old, ret, mask, eps)
    for g, w in zip((loss, m["value_clipfrac"], m["value_mean"]), want, strict=True):
        np.testing.assert_allclose(float(g), w, rtol=1e-5, atol=1e-6)
    if eps == 100.0:  # a huge clip range never clips: plain 0.5 * MSE
        assert float(m["value_clipfrac"]) == 0.0
    else:
        assert float(m["value_clipfrac"]) > 0


def test_losses_have_finite_gradients_and_none_on_padding():
    logp_new, logp_old, adv, mask = policy_inputs(11, spread=0.3)
    g = jax.jit(jax.grad(lambda lp: pm.policy_loss(lp, logp_old, adv, mask, 0.2)[0]))(logp_new)
    g = np.asarray(g)
    assert np.isfinite(g).all() and (g[mask == 0] == 0).all() and (g[mask > 0] != 0).any()
    v = with_garbage(np.zeros(mask.shape, np.float32), mask, np.random.default_rng(0))
    g = jax.jit(jax.grad(lambda v: pm.value_loss(v, v, adv, mask, 0.2)[0]))(v)
    g = np.asarray(g)
    assert np.isfinite(g).all() and (g[mask == 0] == 0).all() and (g[mask > 0] != 0).any()


def test_entropy_matches_loops():
    rng = np.random.default_rng(12)
    mask = make_mask()
    logits = (3.0 * rng.normal(size=(B, T, 11))).astype(np.float32)
    logits[0, 0, :4] = -np.inf  # masked vocabulary entries contribute 0, not NaN
    logits[1, 2, 5] = 80.0  # a near one-hot distribution
    ents = []
    for b, t in real_tokens(mask):
        row = [float(x) for x in logits[b, t]]
        top = max(row)
        z = sum(math.exp(x - top) for x in row)
        ps = [math.exp(x - top) / z for x in row]
        ents.append(-sum(p * math.log(p) for p in ps if p > 0))
    got = float(entropy_jit(logits, mask))
    np.testing.assert_allclose(got, sum(ents) / len(ents), rtol=1e-5)
    uniform = float(entropy_jit(np.zeros((2, 3, 11), np.float32), np.ones((2, 3))))
    np.testing.assert_allclose(uniform, math.log(11), rtol=1e-6)


# ------------------------------------------------------------------------ scores and KL control


def test_clip_or_whiten_scores():
    scores = np.array([-5.0, -0.5, 0.0, 1.0, 9.0], np.float32)
    fn = jax.jit(pm.clip_or_whiten_scores, static_argnames="whiten")
    np.testing.assert_array_equal(np.asarray(fn(scores)), scores)
    np.testing.assert_array_equal(np.asarray(fn(scores, 2.0)), [-2.0, -0.5, 0.0, 1.0, 2.0])
    white = np.asarray(fn(scores, whiten=True))
    mean = sum(float(s) for s in scores) / 5
    std = math.sqrt(sum((float(s) - mean) ** 2 for s in scores) / 4)
    for got, s in zip(white, scores, strict=True):
        np.testing.assert_allclose(got, (float(s) - mean) / std, rtol=1e-5, atol=1e-6)
    both = np.asarray(fn(scores, 1.0, whiten=True))  # whiten, then clip in std units
    np.testing.assert_allclose(both, np.clip(white, -1.0, 1.0), rtol=1e-6)


def test_adaptive_kl_controller():
    def naive(coef, kl, n, target, horizon):
        err = kl / target - 1
        err = 0.2 if err > 0.2 else (-0.2 if err < -0.2 else err)
        return coef * (1 + err * n / horizon)

    kw = dict(n_steps=512, target=6.0, horizon=10_000)
    up = pm.adaptive_kl_update(0.1, 6.6, **kw)
    down = pm.adaptive_kl_update(0.1, 5.4, **kw)
    assert isinstance(up, float) and down < 0.1 < up
    np.testing.assert_allclose(up, naive(0.1, 6.6, 512, 6.0, 10_000), rtol=1e-12)
    assert pm.adaptive_kl_update(0.1, 6.0, **kw) == 0.1
    # The error is clipped at +-0.2: 10x or 0.01x the target move beta like 1.2x or 0.8x.
    np.testing.assert_allclose(pm.adaptive_kl_update(0.1, 60.0, **kw), 0.1 * (1 + 0.2 * 0.0512))
    np.testing.assert_allclose(pm.adaptive_kl_update(0.1, 0.06, **kw), 0.1 * (1 - 0.2 * 0.0512))
    # Inside jit, with a traced coefficient and KL, as a stage keeps beta on device.
    jitted = jax.jit(lambda c, kl: pm.adaptive_kl_update(c, kl, **kw))
    for kl in (0.06, 5.4, 6.6, 60.0):
        got = jitted(jnp.float32(0.1), jnp.float32(kl))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(float(got), naive(0.1, kl, 512, 6.0, 10_000), rtol=1e-6)
