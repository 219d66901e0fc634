"""GRPO / RLOO math: group advantages, KL in the reward or in the loss, the clipped token loss.

Pure jnp, float32, jit-able; no model code. A rollout holds B = N * G responses, the G samples of
each of N prompts in consecutive rows (row n * G + g), of T response tokens; `mask` [B, T] is 1 on
real response tokens (a prefix of each row, up to and including EOS). Padding may hold anything
(even NaN): every function selects with `jnp.where`, so nothing there reaches a result or a
gradient. There is no value model: a response's advantage comes from the other samples of its
prompt, and every token of the response gets it.

Advantages (`group_advantages`), s the scores of one group:
  grpo   (s_i - mean(s)) / (std(s) + eps)   (Shao et al. 2024; std with Bessel's correction)
  grpo with std_scope="batch": (s_i - mean(s)) / (std(S) + eps), S every score of the batch
         (TRL's scale_rewards="batch": one scale for all groups, so a group whose scores barely
         differ is not blown up to unit scale)
  grpo with scale_std=False: s_i - mean(s)  (Dr. GRPO, Liu et al. 2025)
  rloo   s_i - mean_{j != i} s_j = G / (G - 1) * (s_i - mean(s))   (Ahmadian et al. 2024)
A group whose scores are all equal carries no signal and gets advantage exactly 0 (not NaN, and
not the rounding error of s_i - mean(s)). TRL 1.16 adds eps = 1e-4 to the std; ours is 1e-6.

The KL to the reference policy enters one of two ways (the stage picks one):
  in the reward (as PPO): s_i - beta * sum_t log(pi / pi_ref)  before the advantages
                          (`kl_penalized_scores`);
  in the loss (as GRPO):  + beta * k3_t per token, k3 = pi_ref/pi - 1 - log(pi_ref/pi)
                          (ppo_math.kl_estimate "k3").
The token loss (`policy_loss`) is PPO's clipped surrogate with per-token ratios, the ratio
clipped to [1 - clip, 1 + clip_high] (clip_high = clip unless set: DAPO's "clip-higher", Yu et
al. 2025, uses clip 0.2 and clip_high 0.28 so that unlikely tokens with a positive advantage can
grow further before the clip cuts their gradient), and one of three normalisations (NORMS):
  sequence  mean over responses of each response's token mean (GRPO)
  token     mean over every real token of the batch pooled (DAPO)
  constant  sum over every real token / (B * T), T the generation budget (Dr. GRPO: no length
            bias, since a token's weight does not depend on its response's length)
Each function is checked against a naive numpy loop in tests/test_grpo_math.py.
"""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax.rl import ppo_math

ADVANTAGES = ("grpo", "rloo")
NORMS = ("sequence", "token", "constant")
STD_SCOPES = ("group", "batch")


def group_advantages(
    scores, group_size: int, *, kind="grpo", scale_std=True, std_scope="group", eps=1e-6
):
    """Per-response advantages from the G samples of each prompt.

    Args:
      scores: [N * G] float scores, the G samples of prompt n in rows n * G .. n * G + G - 1.
      group_size: G (static), at least 2.
      kind: "grpo" (mean, and std if `scale_std`) or "rloo" (leave-one-out mean) (static).
      scale_std: divide by a std (GRPO); False is Dr. GRPO (grpo only) (static).
      std_scope: one of STD_SCOPES (static): "group" divides by each group's std (GRPO),
        "batch" by the std of all N * G scores (TRL's scale_rewards="batch"); grpo with
        scale_std only. Both stds have Bessel's correction, as TRL's.
      eps: added to the std.

    Returns:
      [N * G] float32; 0 for every response of a group whose scores are all equal.
    """
    if group_size < 2:
        raise ValueError(f"group advantages need at least 2 samples per prompt, got {group_size}")
    if std_scope not in STD_SCOPES:
        raise ValueError(f"unknown grpo std scope: {std_scope!r}; expected one of {STD_SCOPES}")
    if std_scope == "batch" and (kind != "grpo" or not scale_std):
        raise ValueError("a batch std scales GRPO's advantages only: kind='grpo', scale_std=True")
    s = scores.astype(jnp.float32).reshape(-1, group_size)  # [N, G]
    mean = s.mean(axis=1, keepdims=True)
    flat = s.max(axis=1, keepdims=True) == s.min(axis=1, keepdims=True)  # [N, 1]
    if kind == "grpo":
        adv = s - mean
        if scale_std and std_scope == "group":
            std = jnp.sqrt(jnp.square(adv).sum(axis=1, keepdims=True) / (group_size - 1))
            adv = adv / (std + eps)
        elif scale_std:
            # Around the batch mean, not the group means: the spread of every score, as TRL's.
            dev = s - s.mean()
            std = jnp.sqrt(jnp.square(dev).sum() / (s.size - 1))  # []
            adv = adv / (std + eps)
    elif kind == "rloo":
        adv = (s - mean) * (group_size / (group_size - 1))
    else:
        raise ValueError(f"unknown group advantage: {kind!r}; expected one of {ADVANTAGES}")
    return jnp.where(flat, 0.0, adv).reshape(-1)


def kl_penalized_scores(scores, logp, logp_ref, mask, beta):
    """KL in the reward (as PPO): s - beta * sum over response tokens of log(pi / pi_ref).

    Args:
      scores: [B] reward-model or reward-function scores.
      logp, logp_ref: [B, T] sampled tokens' log-probs under the policy and the reference.
      mask: [B, T] response mask.
      beta: KL coefficient.

    Returns:
      ([B] penalized scores, [B] per-response KL estimate sum_t log r_t), float32.
    """
    kl = ppo_math.kl_estimate(logp, logp_ref, "k1")
    seq_kl = jnp.where(mask > 0, kl, 0.0).sum(axis=1)  # [B]
    return scores.astype(jnp.float32) - jnp.asarray(beta, jnp.float32) * seq_kl, seq_kl


def _normalise(x, mask, norm: str):
    """Reduces per-token values x [B, T] to a scalar as NORMS says."""
    real = mask > 0
    x = jnp.where(real, x, 0.0)
    n_tok = real.sum(axis=1).astype(jnp.float32)  # [B]
    if norm == "sequence":
        return (x.sum(axis=1) / jnp.maximum(n_tok, 1.0)).mean()
    elif norm == "token":
        return x.sum() / jnp.maximum(n_tok.sum(), 1.0)
    elif norm == "constant":
        return x.sum() / (mask.shape[0] * mask.shape[1])
    raise ValueError(f"unknown grpo loss normalisation: {norm!r}; expected one of {NORMS}")


def policy_loss(
    logp, logp_old, logp_ref, advantages, mask, *, clip, kl_coef, norm="sequence", clip_high=None
):
    """The clipped token-level GRPO loss, minimised, with the KL-in-loss term.

    Per real token: -min(rho A, clip(rho, 1 - clip, 1 + clip_high) A) + kl_coef * k3, with
    rho = exp(logp - logp_old) and A the response's advantage; then reduced by `norm`.
    kl_coef = 0 drops the KL term (KL in the reward instead, or none).

    Args:
      logp: [B, T] log-probs under the policy being updated.
      logp_old: [B, T] under the policy that sampled (the ratio is 1 at the first minibatch).
      logp_ref: [B, T] under the frozen reference.
      advantages: [B] per-response advantages (see `group_advantages`).
      mask: [B, T] response mask.
      clip: PPO's epsilon (the low side, and the high side unless `clip_high`); kl_coef: beta
        of the KL-in-loss term (traced scalars allowed).
      norm: one of NORMS (static).
      clip_high: the high side's epsilon (DAPO's epsilon_high); None -> `clip`.

    Returns:
      (loss [] float32, metrics) with clipfrac (fraction of real tokens where the clip binds:
      ratio > 1 + clip_high with A > 0, or ratio < 1 - clip with A < 0), ratio (mean over real
      tokens), kl (mean k3 over real tokens), all float32.
    """
    real = mask > 0
    logp = logp.astype(jnp.float32)
    log_ratio = jnp.where(real, logp - logp_old.astype(jnp.float32), 0.0)
    ratio = jnp.exp(log_ratio)  # [B, T]
    adv = advantages.astype(jnp.float32)[:, None]  # [B, 1]
    clip_high = clip if clip_high is None else clip_high
    lo, hi = 1.0 - jnp.asarray(clip, jnp.float32), 1.0 + jnp.asarray(clip_high, jnp.float32)
    surrogate = -jnp.minimum(ratio * adv, jnp.clip(ratio, lo, hi) * adv)  # [B, T]
    k3 = ppo_math.kl_estimate(jnp.where(real, logp, 0.0), jnp.where(real, logp_ref, 0.0), "k3")
    per_token = surrogate + jnp.asarray(kl_coef, jnp.float32) * k3
    loss = _normalise(per_token, mask, norm)
    n = jnp.maximum(real.sum().astype(jnp.float32), 1.0)
    # Clipped where the clip binds (the token's gradient is cut): above 1 + clip_high with a
    # positive advantage, below 1 - clip with a negative one, as TRL counts it.
    binds = ((ratio > hi) & (adv > 0)) | ((ratio < lo) & (adv < 0))  # [B, T]
    metrics = {
        "clipfrac": jnp.where(real, binds, False).sum() / n,
        "ratio": jnp.where(real, ratio, 0.0).sum() / n,
        "kl": jnp.where(real, k3, 0.0).sum() / n,
    }
    return loss, metrics
