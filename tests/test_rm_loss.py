"""Reward-model losses against naive numpy loops over ranked pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rl import losses

K_SLOTS = 9
# Jitted once per shape: eager dispatch would compile every primitive separately (slow on CPU).
rm_loss = jax.jit(losses.rm_loss)
rm_loss_per_pair = jax.jit(losses.rm_loss_per_pair)


def log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def ranked_pairs(ranks, kmask):
    k = len(ranks)
    return [
        (i, j)
        for i in range(k)
        for j in range(k)
        if kmask[i] and kmask[j] and ranks[i] < ranks[j]  # strictly better; ties give no pair
    ]


def naive_per_prompt(scores, ranks, kmask, margin):
    per_prompt = []
    for p in range(len(scores)):
        terms = [
            -log_sigmoid(float(scores[p, i]) - float(scores[p, j]) - margin)
            for i, j in ranked_pairs(ranks[p], kmask[p])
        ]
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    return sum(per_prompt) / len(per_prompt)


def naive_pair_stats(scores, ranks, kmask, margin=0.0):
    """Pooled over pairs: (mean nll, accuracy, mean margin, count)."""
    nll, correct, gaps = [], [], []
    for p in range(len(scores)):
        for i, j in ranked_pairs(ranks[p], kmask[p]):
            gap = float(scores[p, i]) - float(scores[p, j])
            nll.append(-log_sigmoid(gap - margin))
            correct.append(gap > 0)
            gaps.append(gap)
    return np.mean(nll), np.mean(correct), np.mean(gaps), len(gaps)


def random_batch(seed):
    """Prompts with K = 2..9 (padded to 9 slots with NaN scores and rank -1), ties, and two rows
    with no pair: one all-tied and one all-padding."""
    rng = np.random.default_rng(seed)
    ks = [2, 3, 4, 5, 6, 7, 8, 9, 4, 9]
    n = len(ks) + 2
    scores = np.full((n, K_SLOTS), np.nan, np.float32)
    ranks = np.full((n, K_SLOTS), -1, np.int32)
    kmask = np.zeros((n, K_SLOTS), np.float32)
    for p, k in enumerate(ks):
        scores[p, :k] = rng.normal(size=k) * 2
        raw = rng.integers(0, max(2, k - 1), size=k)  # fewer levels than responses: ties
        raw[:2] = [0, 1]  # at least one ranked pair
        ranks[p, :k] = np.unique(raw, return_inverse=True)[1].reshape(-1)  # dense ranks
        kmask[p, :k] = 1
    scores[len(ks), :3] = rng.normal(size=3)
    ranks[len(ks), :3] = 0  # all tied: no pair
    kmask[len(ks), :3] = 1
    assert (ranks[:-2][kmask[:-2] > 0] == 0).any()
    return scores, ranks, kmask


@pytest.mark.parametrize("margin", [0.0, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_rm_loss_matches_brute_force(margin, seed):
    scores, ranks, kmask = random_batch(seed)
    loss, metrics = rm_loss(jnp.asarray(scores), jnp.asarray(ranks), jnp.asarray(kmask), margin)
    np.testing.assert_allclose(float(loss), naive_per_prompt(scores, ranks, kmask, margin), 1e-5)
    _, acc, gap, count = naive_pair_stats(scores, ranks, kmask, margin)
    np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["margin"]), gap, rtol=1e-5)
    assert float(metrics["pairs"]) == count
    assert float(metrics["prompts"]) == len(scores) - 2  # the two pair-less rows do not count
    real = scores[kmask > 0].astype(np.float64)
    np.testing.assert_allclose(float(metrics["reward_mean"]), real.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reward_std"]), real.std(), rtol=1e-5)
    # Per prompt is not the pooled mean: prompts with many pairs would weigh more there.
    pooled, _, _, _ = naive_pair_stats(scores, ranks, kmask, margin)
    assert abs(float(loss) - pooled) > 1e-3


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_rm_loss_per_pair_is_the_pooled_mean(margin):
    scores, ranks, kmask = random_batch(2)
    loss, metrics = rm_loss_per_pair(
        jnp.asarray(scores), jnp.asarray(ranks), jnp.asarray(kmask), margin
    )
    nll, acc, gap, count = naive_pair_stats(scores, ranks, kmask, margin)
    np.testing.assert_allclose(float(loss), nll, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["margin"]), gap, rtol=1e-5)
    assert float(metrics["pairs"]) == count


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_both_modes_agree_on_pairs(margin):
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(16, 2)).astype(np.float32)
    ranks = np.tile(np.array([0, 1], np.int32), (16, 1))
    kmask = np.ones((16, 2), np.float32)
    args = (jnp.asarray(scores), jnp.asarray(ranks), jnp.asarray(kmask), margin)
    per_prompt, m1 = rm_loss(*args)
    per_pair, m2 = rm_loss_per_pair(*args)
    np.testing.assert_allclose(float(per_prompt), float(per_pair), rtol=1e-6)
    np.testing.assert_allclose(float(per_pair), naive_pair_stats(scores, ranks, kmask, margin)[0])
    for key in m1:
        np.testing.assert_allclose(float(m1[key]), float(m2[key]), rtol=1e-6)


def test_gradient_pushes_winner_up_and_loser_down():
    kmask, scores = jnp.ones((1, 2)), jnp.array([[0.3, 1.0]])
    for fn in (losses.rm_loss, losses.rm_loss_per_pair):
        grad_fn = jax.jit(jax.grad(lambda s, r, fn=fn: fn(s, r, kmask)[0]))
        grad = grad_fn(scores, jnp.array([[0, 1]]))
        assert grad[0, 0] < 0 < grad[0, 1]
        # d/dr_w of -log sigmoid(r_w - r_l) is -sigmoid(r_l - r_w).
        np.testing.assert_allclose(float(grad[0, 0]), -1 / (1 + np.exp(-0.7)), rtol=1e-6)
        # Ranking the other response first flips the signs.
        grad = grad_fn(scores, jnp.array([[1, 0]]))
        assert grad[0, 0] > 0 > grad[0, 1]


def test_equal_scores_count_as_wrong():
    ranks, kmask = jnp.array([[0, 1, 2]]), jnp.ones((1, 3))
    _, metrics = rm_loss(jnp.array([[1.0, 1.0, 0.0]]), ranks, kmask, 0.0)
    # Pairs (0, 1) tie in score and are wrong; (0, 2) and (1, 2) are right.
    np.testing.assert_allclose(float(metrics["accuracy"]), 2 / 3, rtol=1e-6)


def test_padding_rows_and_slots_change_nothing():
    scores, ranks, kmask = random_batch(4)
    base_loss, base_metrics = rm_loss(scores, ranks, kmask, 0.5)
    rng = np.random.default_rng(5)
    # Extra all-zero rows (as eval padding makes them) and garbage in absent slots.
    pad = np.zeros((5, K_SLOTS), np.float32)
    scores2 = np.concatenate([np.where(kmask > 0, scores, rng.normal(size=scores.shape)), pad])
    ranks2 = np.concatenate([ranks, pad.astype(np.int32)])
    kmask2 = np.concatenate([kmask, pad])
    loss, metrics = rm_loss(scores2, ranks2, kmask2, 0.5)
    np.testing.assert_allclose(float(loss), float(base_loss), rtol=1e-6)
    for key in base_metrics:
        np.testing.assert_allclose(float(metrics[key]), float(base_metrics[key]), rtol=1e-6)
    # NaN scores in absent slots (random_batch puts them there) do not leak into the gradient.
    grad = jax.jit(jax.grad(lambda s: losses.rm_loss(s, ranks, kmask)[0]))(scores)
    assert np.isfinite(np.asarray(grad)).all()
    assert (np.asarray(grad)[kmask == 0] == 0).all()


def test_rm_pair_matrix_matches_loops():
    scores, ranks, kmask = random_batch(6)
    got = np.asarray(losses.rm_pair_matrix(jnp.asarray(ranks), jnp.asarray(kmask)))
    assert got.dtype == np.float32
    want = np.zeros_like(got)
    for p in range(len(ranks)):
        for i, j in ranked_pairs(ranks[p], kmask[p]):
            want[p, i, j] = 1
    np.testing.assert_array_equal(got, want)


def test_per_k_accuracy_matches_loops_and_jits():
    scores, ranks, kmask = random_batch(7)
    k_values = tuple(range(2, 10))
    got = jax.jit(lambda s, r, m: losses.per_k_accuracy(s, r, m, k_values))(scores, ranks, kmask)
    for k in k_values:
        correct = total = 0
        for p in range(len(scores)):
            if int(kmask[p].sum()) != k:
                continue
            for i, j in ranked_pairs(ranks[p], kmask[p]):
                correct += scores[p, i] > scores[p, j]
                total += 1
        assert (float(got[k][0]), float(got[k][1])) == (correct, total)
    assert float(got[4][1]) > 0 and float(got[9][1]) > 0
