"""DPO math (rlhf_jax/rl/dpo.py) against naive numpy loops over prompts and pairs, under jax.jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rl import dpo

loss_jit = jax.jit(dpo.dpo_loss, static_argnames=("loss",))
pl_jit = jax.jit(dpo.plackett_luce_nll)

# Five prompts, K = 4 slots: a strict 4-way ranking, a pair, a 3-way with a tie for second, an
# all-absent padding row and a 4-way with a tie for best.
RANKS = np.array(
    [[2, 0, 3, 1], [1, 0, -1, -1], [0, 1, 1, -1], [-1, -1, -1, -1], [0, 1, 0, 2]], np.int32
)
KMASK = (RANKS >= 0).astype(np.float32)


def batch(seed, beta_scale=1.0):
    rng = np.random.default_rng(seed)
    logp = rng.normal(-20.0, 4.0, RANKS.shape).astype(np.float32)
    logp_ref = (logp + beta_scale * rng.normal(0.0, 2.0, RANKS.shape)).astype(np.float32)
    # Absent slots hold garbage that must never reach a result.
    junk = np.array([np.nan, np.inf, -1e30], np.float32)
    logp = np.where(KMASK > 0, logp, rng.choice(junk, RANKS.shape)).astype(np.float32)
    logp_ref = np.where(KMASK > 0, logp_ref, rng.choice(junk, RANKS.shape)).astype(np.float32)
    return logp, logp_ref


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def naive_pair_loss(z, kind, beta, eps):
    if kind == "sigmoid":
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    return (z / beta - 1 / (2 * beta)) ** 2


def naive_rewards(logp, logp_ref, beta):
    return [
        [beta * (float(logp[p, k]) - float(logp_ref[p, k])) for k in range(RANKS.shape[1])]
        for p in range(RANKS.shape[0])
    ]


def naive_pairs(p):
    k = RANKS.shape[1]
    return [
        (i, j)
        for i in range(k)
        for j in range(k)
        if KMASK[p, i] and KMASK[p, j] and RANKS[p, i] < RANKS[p, j]
    ]


def naive_loss(logp, logp_ref, beta, kind, eps=0.0):
    r = naive_rewards(logp, logp_ref, beta)
    per_prompt = []
    for p in range(RANKS.shape[0]):
        pairs = naive_pairs(p)
        if pairs:
            per_prompt.append(
                sum(naive_pair_loss(r[p][i] - r[p][j], kind, beta, eps) for i, j in pairs)
                / len(pairs)
            )
    return sum(per_prompt) / len(per_prompt)


def naive_pl(r, ranks, kmask):
    """Breslow: each real response i against every real j ranked no better (itself included)."""
    total = 0.0
    for i in range(len(r)):
        if not kmask[i]:
            continue
        risk = [r[j] for j in range(len(r)) if kmask[j] and ranks[j] >= ranks[i]]
        m = max(risk)
        total -= r[i] - (m + math.log(sum(math.exp(x - m) for x in risk)))
    return total


@pytest.mark.parametrize(
    "kind,eps,beta", [("sigmoid", 0.0, 0.1), ("sigmoid", 0.2, 0.5), ("ipo", 0.0, 0.1)]
)
def test_grouped_pair_losses_match_numpy(kind, eps, beta):
    logp, logp_ref = batch(0)
    loss, m = loss_jit(logp, logp_ref, RANKS, KMASK, beta=beta, loss=kind, label_smoothing=eps)
    np.testing.assert_allclose(float(loss), naive_loss(logp, logp_ref, beta, kind, eps), rtol=1e-5)
    assert m["prompts"] == 4 and m["pairs"] == 6 + 1 + 2 + 5


def test_metrics_match_numpy():
    logp, logp_ref = batch(1)
    beta = 0.3
    _, m = loss_jit(logp, logp_ref, RANKS, KMASK, beta=beta, loss="sigmoid")
    r = naive_rewards(logp, logp_ref, beta)
    all_pairs = [(p, i, j) for p in range(RANKS.shape[0]) for i, j in naive_pairs(p)]
    z = [r[p][i] - r[p][j] for p, i, j in all_pairs]
    np.testing.assert_allclose(m["accuracy"], np.mean([x > 0 for x in z]), rtol=1e-6)
    np.testing.assert_allclose(m["margin"], np.mean(z), rtol=1e-5)
    np.testing.assert_allclose(m["chosen_logp"], np.mean([logp[p, i] for p, i, _ in all_pairs]))
    np.testing.assert_allclose(m["rejected_logp"], np.mean([logp[p, j] for p, _, j in all_pairs]))
    np.testing.assert_allclose(
        m["chosen_reward"] - m["rejected_reward"], np.mean(z), rtol=1e-5, atol=1e-6
    )


def test_loss_at_reference_is_log2_for_pairs_and_log_k_factorial_for_pl():
    logp, _ = batch(2)
    two = RANKS[1:2], KMASK[1:2]
    for eps in (0.0, 0.3):
        loss, m = loss_jit(
            logp[1:2], logp[1:2], *two, beta=0.1, loss="sigmoid", label_smoothing=eps
        )
        np.testing.assert_allclose(float(loss), math.log(2), rtol=1e-6)
        assert m["accuracy"] == 0 and m["tie_frac"] == 1
    # Every K-way prompt at the reference: the per-pair mean is still log 2.
    loss, _ = loss_jit(logp, logp, RANKS, KMASK, beta=0.1, loss="sigmoid")
    np.testing.assert_allclose(float(loss), math.log(2), rtol=1e-6)
    # Plackett-Luce of a strict K-way ranking at the reference: -log(1 / K!).
    nll = pl_jit(jnp.zeros((1, 4)), RANKS[:1], KMASK[:1])
    np.testing.assert_allclose(float(nll[0]), math.log(24), rtol=1e-6)


def test_plackett_luce_k3_is_the_product_of_choice_probabilities():
    rng = np.random.default_rng(3)
    for _ in range(5):
        r = rng.normal(0, 2, 3)
        order = rng.permutation(3)  # order[0] best
        ranks = np.empty(3, np.int32)
        ranks[order] = np.arange(3)
        e = np.exp(r[order])
        prob = e[0] / (e[0] + e[1] + e[2]) * e[1] / (e[1] + e[2])
        nll = pl_jit(jnp.asarray(r[None], jnp.float32), ranks[None], np.ones((1, 3), np.float32))
        np.testing.assert_allclose(float(nll[0]), -math.log(prob), rtol=1e-5)


def test_plackett_luce_with_ties_and_padding_matches_numpy():
    logp, logp_ref = batch(4)
    beta = 0.2
    loss, _ = loss_jit(logp, logp_ref, RANKS, KMASK, beta=beta, loss="plackett_luce")
    r = naive_rewards(logp, logp_ref, beta)
    per = [naive_pl(r[p], RANKS[p], KMASK[p]) for p in range(5) if naive_pairs(p)]
    np.testing.assert_allclose(float(loss), np.mean(per), rtol=1e-5)


def test_plackett_luce_for_pairs_equals_sigmoid_dpo():
    logp, logp_ref = batch(5)
    two = RANKS[1:2], KMASK[1:2]
    pl, _ = loss_jit(logp[1:2], logp_ref[1:2], *two, beta=0.4, loss="plackett_luce")
    sg, _ = loss_jit(logp[1:2], logp_ref[1:2], *two, beta=0.4, loss="sigmoid")
    np.testing.assert_allclose(float(pl), float(sg), rtol=1e-6)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "plackett_luce"])
def test_padding_slots_and_rows_never_leak(kind):
    logp, logp_ref = batch(6)
    grad = jax.jit(jax.grad(lambda a, b: dpo.dpo_loss(a, b, RANKS, KMASK, beta=0.1, loss=kind)[0]))(
        jnp.asarray(logp), jnp.asarray(logp_ref)
    )
    g = np.asarray(grad)
    assert np.all(np.isfinite(g)) and np.all(g[KMASK == 0] == 0)
    assert np.any(g[KMASK > 0] != 0)
    # Extra all-absent rows change nothing.
    pad = lambda x, v: np.concatenate([x, np.full((3, 4), v, x.dtype)])
    base, _ = loss_jit(logp, logp_ref, RANKS, KMASK, beta=0.1, loss=kind)
    more, _ = loss_jit(
        pad(logp, np.nan), pad(logp_ref, 0.0), pad(RANKS, -1), pad(KMASK, 0), beta=0.1, loss=kind
    )
    np.testing.assert_allclose(float(more), float(base), rtol=1e-6)


def test_training_direction_raises_the_winner():
    """A gradient step on the sigmoid loss raises log pi of winners relative to losers."""
    logp, logp_ref = batch(7)
    f = lambda a: dpo.dpo_loss(a, logp_ref, RANKS, KMASK, beta=0.1, loss="sigmoid")[0]
    g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(logp)))
    # Prompt 0: slot 1 is ranked best (a winner in every pair), slot 2 worst.
    assert g[0, 1] < 0 < g[0, 2]


def test_unknown_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown pairwise dpo loss"):
        dpo.pair_losses(jnp.zeros(2), loss="hinge", beta=0.1)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 1.0, 0.0), (2.5, 0.5, 0.1)])
def test_simpo_matches_numpy(beta, gamma, eps):
    """SimPO: reward beta * logp / |y| (no reference), pair loss -log sigmoid(z - gamma)."""
    logp, _ = batch(3)
    lengths = np.random.default_rng(3).integers(1, 30, RANKS.shape).astype(np.int32)
    loss, m = jax.jit(dpo.simpo_loss)(
        logp, lengths, RANKS, KMASK, beta=beta, gamma=gamma, label_smoothing=eps
    )
    r = [[beta * float(logp[p, k]) / lengths[p, k] for k in range(4)] for p in range(5)]
    per_prompt = []
    for p in range(RANKS.shape[0]):
        pairs = naive_pairs(p)
        if pairs:
            z = [r[p][i] - r[p][j] - gamma for i, j in pairs]
            per_prompt.append(np.mean([naive_pair_loss(x, "sigmoid", beta, eps) for x in z]))
    np.testing.assert_allclose(float(loss), np.mean(per_prompt), rtol=1e-5)
    z_all = [r[p][i] - r[p][j] for p in range(5) for i, j in naive_pairs(p)]
    np.testing.assert_allclose(m["accuracy"], np.mean([x > 0 for x in z_all]), rtol=1e-6)
    np.testing.assert_allclose(m["margin"], np.mean(z_all), rtol=1e-5)
    # Length normalisation is the point: doubling every length halves the rewards.
    _, m2 = jax.jit(dpo.simpo_loss)(logp, 2 * lengths, RANKS, KMASK, beta=beta, gamma=gamma)
    np.testing.assert_allclose(m2["margin"], np.mean(z_all) / 2, rtol=1e-5)
