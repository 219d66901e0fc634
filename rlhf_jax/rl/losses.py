"""Pure jnp losses. Everything here is checked against a naive numpy loop in tests/test_losses.py.

Later stages add the K-choose-2 reward-model loss, PPO's clipped surrogate, the clipped value
loss, KL estimators, whitening and GAE here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits, targets):
    """log p(target) under `logits`, in float32.

    Args:
      logits: [B, T, V] (any float dtype; upcast to float32 before the softmax).
      targets: [B, T] int32.

    Returns:
      [B, T] float32.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - lse


def masked_xent(logits, targets, mask):
    """Summed next-token cross-entropy over masked positions, and the number of them.

    Returning (sum, count) rather than a mean lets gradient accumulation and data-parallel
    reductions weight every token equally however the tokens are spread over microbatches.

    Args:
      logits: [B, T, V]; targets: [B, T] int32; mask: [B, T] (1 where the target counts).

    Returns:
      (loss_sum [] float32, n_tokens [] float32).
    """
    mask = mask.astype(jnp.float32)
    nll = -token_logprobs(logits, targets) * mask
    return nll.sum(), mask.sum()


def rm_pair_matrix(ranks, kmask):
    """Which ordered response pairs of each prompt are ranked pairs.

    Args:
      ranks: [P, K] int dense ranks, 0 = best; tied responses share a rank.
      kmask: [P, K], 1 for real responses, 0 for absent slots.

    Returns:
      [P, K, K] float32, 1 at (p, i, j) where responses i and j both exist and i is ranked
      strictly better than j; ties and absent slots give 0.
    """
    real = kmask > 0
    better = ranks[:, :, None] < ranks[:, None, :]
    return (better & real[:, :, None] & real[:, None, :]).astype(jnp.float32)


def _rm_pair_terms(scores, ranks, kmask, margin):
    """Shared pieces of the RM losses: (pairs [P,K,K], r_i - r_j [P,K,K], -log sig [P,K,K])."""
    real = kmask > 0
    # where, not multiply: an absent slot's score may be anything (even NaN) and must not leak.
    scores = jnp.where(real, scores.astype(jnp.float32), 0.0)  # [P, K]
    pairs = rm_pair_matrix(ranks, kmask)
    diff = scores[:, :, None] - scores[:, None, :]  # [P, K, K] r_i - r_j
    nll = jnp.where(pairs > 0, -jax.nn.log_sigmoid(diff - margin), 0.0)
    return scores, pairs, diff, nll


def _rm_metrics(scores, kmask, pairs, diff):
    real = (kmask > 0).astype(jnp.float32)
    n_pairs = pairs.sum()
    n_real = jnp.maximum(real.sum(), 1.0)
    mean = (scores * real).sum() / n_real
    var = (jnp.square(scores - mean) * real).sum() / n_real
    return {
        # Strict wins; ties (equal scores, e.g. every pair of a fresh head) are counted apart, so
        # an accuracy of 0 with tie_frac 1 reads as "no opinion yet", not "always wrong".
        "accuracy": ((diff > 0) * pairs).sum() / jnp.maximum(n_pairs, 1.0),
        "tie_frac": ((diff == 0) * pairs).sum() / jnp.maximum(n_pairs, 1.0),
        "margin": (jnp.where(pairs > 0, diff, 0.0)).sum() / jnp.maximum(n_pairs, 1.0),
        "reward_mean": mean,
        "reward_std": jnp.sqrt(var),
        "pairs": n_pairs,
    }


def rm_loss(scores, ranks, kmask, margin=0.0):
    """InstructGPT's reward-model loss: each prompt's ranked pairs form one batch element.

    loss(prompt) = -1/C * sum over pairs (w, l) with w ranked strictly better than l of
    log sigmoid(r_w - r_l - margin), C the prompt's number of such pairs (C(K, 2) without ties);
    the batch loss is the mean over prompts that have at least one pair, so padding rows
    (kmask 0) neither add to the loss nor count in the mean.

    Args:
      scores: [P, K] rewards (any float dtype; computed in float32).
      ranks: [P, K] int dense ranks, 0 = best.
      kmask: [P, K], 1 for real responses.
      margin: the pair's required score gap.

    Returns:
      (loss [] float32, metrics) with scalar metrics accuracy (fraction of ranked pairs with
      r_w > r_l, pooled over pairs), margin (mean r_w - r_l over pairs), reward_mean and
      reward_std (over real responses), pairs and prompts (counts).
    """
    scores, pairs, diff, nll = _rm_pair_terms(scores, ranks, kmask, margin)
    per_prompt_pairs = pairs.sum(axis=(1, 2))  # [P]
    has_pairs = per_prompt_pairs > 0
    per_prompt = nll.sum(axis=(1, 2)) / jnp.maximum(per_prompt_pairs, 1.0)  # [P]
    n_prompts = has_pairs.sum().astype(jnp.float32)
    loss = jnp.where(has_pairs, per_prompt, 0.0).sum() / jnp.maximum(n_prompts, 1.0)
    metrics = _rm_metrics(scores, kmask, pairs, diff)
    metrics["prompts"] = n_prompts
    return loss, metrics


def rm_loss_per_pair(scores, ranks, kmask, margin=0.0):
    """The per-pair ablation: the mean over all ranked pairs of -log sigmoid(r_w - r_l - margin).

    Meant for per-pair batches ([B, 2], ranks [0, 1]), where it equals `rm_loss`; on K-way data it
    pools pairs across prompts, so prompts with many pairs weigh more.

    Args:
      scores: [B, K] rewards; ranks: [B, K] int dense ranks; kmask: [B, K] 1 for real responses.
      margin: the pair's required score gap.

    Returns:
      (loss [] float32, metrics) with the metrics of `rm_loss`.
    """
    scores, pairs, diff, nll = _rm_pair_terms(scores, ranks, kmask, margin)
    loss = nll.sum() / jnp.maximum(pairs.sum(), 1.0)
    metrics = _rm_metrics(scores, kmask, pairs, diff)
    metrics["prompts"] = (pairs.sum(axis=(1, 2)) > 0).sum().astype(jnp.float32)
    return loss, metrics


def per_k_accuracy(scores, ranks, kmask, k_values):
    """Correct and total ranked pairs among prompts with exactly K responses, for each K.

    Sums rather than ratios, so an evaluation can add them over batches and divide at the end
    (e.g. into `eval/accuracy_k4`).

    Args:
      scores: [P, K] rewards; ranks: [P, K] int dense ranks; kmask: [P, K] 1 for real responses.
      k_values: the response counts to report (static, e.g. range(2, 10)).

    Returns:
      {k: (correct pairs [] float32, total pairs [] float32)}.
    """
    _, pairs, diff, _ = _rm_pair_terms(scores, ranks, kmask, 0.0)
    correct = ((diff > 0) * pairs).sum(axis=(1, 2))  # [P]
    total = pairs.sum(axis=(1, 2))  # [P]
    k_of = (kmask > 0).sum(axis=1)  # [P]
    return {
        int(k): (jnp.where(k_of == k, correct, 0.0).sum(), jnp.where(k_of == k, total, 0.0).sum())
        for k in k_values
    }
