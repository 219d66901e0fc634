"""DPO math on K-way rankings: implicit rewards, the pairwise losses and the Plackett-Luce loss.

Pure jnp, float32, jit-able; no model code. A batch holds P prompts with K response slots each,
laid out as the reward model reads them (data/rm_data.py): `ranks` [P, K] dense ranks (0 = best,
tied responses share a rank, -1 for absent slots) and `kmask` [P, K] (1 for real responses). The
inputs are each response's summed log-probability under the policy and under the frozen
reference, `logp` and `logp_ref` [P, K]. Absent slots may hold anything (even NaN): every
function selects with `jnp.where`, so nothing there reaches a result or a gradient.

With the implicit reward r_k = beta * (logp_k - logp_ref_k) (Rafailov et al. 2023) and, for a
ranked pair (w, l) (w strictly better; ties give no pair), z = r_w - r_l:
  sigmoid   -log sigmoid(z)                                      (DPO)
  smoothed  -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)      (conservative DPO, eps = label
            smoothing: the fraction of labels assumed flipped)
  ipo       (z / beta - 1 / (2 beta))^2                          (IPO, Azar et al. 2023; tau = beta)
SimPO (Meng et al. 2024) drops the reference: its reward is the length-normalised log-probability
r_k = beta * logp_k / |y_k| and its pair loss -log sigmoid(z - gamma) has a target margin gamma
(`simpo_loss`; TRL's `gamma_beta_ratio` is gamma / beta).
Like the RM loss (losses.rm_loss), all ranked pairs of a prompt are ONE batch element: a prompt's
loss is the mean over its C pairs (C(K, 2) without ties), and the batch loss the mean over the
prompts that have at least one pair. For K = 2 this is the usual per-pair DPO loss.

IPO here follows the paper: z is built from log-ratios SUMMED over the response tokens. TRL's
`loss_type="ipo"` averages them over the tokens instead, so z there is about |y| times smaller and
the same tau is a much weaker pull toward the 1 / (2 tau) margin here: a TRL IPO run at tau
matches ours at roughly tau * |y| (mean response length). The sigmoid loss sums in both.

The listwise form (`plackett_luce_nll`, the DPO paper's appendix A.3) is the negative log of the
Plackett-Luce probability of the whole ranking under the implicit rewards, one element per prompt.
Each function is checked against a naive numpy loop in tests/test_dpo_losses.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.rl import losses

LOSSES = ("sigmoid", "ipo", "plackett_luce", "simpo")
# Losses that need no reference model: the stage neither restores nor runs one in its step.
REFERENCE_FREE = ("simpo",)


def implicit_rewards(logp, logp_ref, kmask, beta):
    """r = beta * (log pi(y|x) - log pi_ref(y|x)) per response; 0 at absent slots.

    Args:
      logp: [P, K] summed response log-probs under the policy.
      logp_ref: [P, K] the same under the reference.
      kmask: [P, K], 1 for real responses.
      beta: the KL coefficient (Python float or traced scalar).

    Returns:
      [P, K] float32.
    """
    diff = logp.astype(jnp.float32) - logp_ref.astype(jnp.float32)
    return jnp.where(kmask > 0, jnp.asarray(beta, jnp.float32) * diff, 0.0)


def simpo_rewards(logp, lengths, kmask, beta):
    """SimPO's reward r = beta * log pi(y|x) / |y| per response; 0 at absent slots.

    Args:
      logp: [P, K] summed response log-probs under the policy.
      lengths: [P, K] response lengths in tokens (the summed positions, EOS included).
      kmask: [P, K], 1 for real responses.
      beta: the reward scale.

    Returns:
      [P, K] float32.
    """
    avg = logp.astype(jnp.float32) / jnp.maximum(lengths.astype(jnp.float32), 1.0)
    return jnp.where(kmask > 0, jnp.asarray(beta, jnp.float32) * avg, 0.0)


def pair_losses(z, *, loss: str, beta, label_smoothing=0.0, margin=0.0):
    """The per-pair loss of reward differences z = r_w - r_l (any shape).

    Args:
      z: reward differences, float32 (any shape).
      loss: "sigmoid" (with `label_smoothing`, conservative DPO), "simpo" (sigmoid of z less
        the target `margin`) or "ipo" (static).
      beta: the KL coefficient the rewards were scaled by (IPO's tau).
      label_smoothing: eps in [0, 0.5), sigmoid and simpo.
      margin: SimPO's target reward margin gamma.

    Returns:
      Per-pair losses, z's shape.
    """
    if loss in ("sigmoid", "simpo"):
        eps = jnp.asarray(label_smoothing, jnp.float32)
        if loss == "simpo":
            z = z - jnp.asarray(margin, jnp.float32)
        return -(1.0 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)
    elif loss == "ipo":
        beta = jnp.asarray(beta, jnp.float32)
        return jnp.square(z / beta - 0.5 / beta)
    raise ValueError(f"unknown pairwise dpo loss: {loss!r}; expected 'sigmoid', 'simpo' or 'ipo'")


def plackett_luce_nll(rewards, ranks, kmask):
    """-log of the Plackett-Luce probability of each prompt's ranking, under `rewards`.

    For a strict ranking y_1 > y_2 > ... > y_K this is
        -sum_k [ r_k - log sum_{j >= k} exp(r_j) ]
    (the last term is 0), the probability that each response is chosen first among those not yet
    chosen. Ties follow Breslow's rule: each of a group of tied responses is chosen out of
    everything ranked no better than it, its tied peers included; without ties this is exactly
    the Plackett-Luce likelihood, and a group tied for last adds a term that is smallest when
    its rewards are equal. Absent slots take no part.

    Args:
      rewards: [P, K] implicit rewards (see `implicit_rewards`).
      ranks: [P, K] dense ranks, 0 = best.
      kmask: [P, K], 1 for real responses.

    Returns:
      [P] float32; 0 for a prompt with fewer than two real responses.
    """
    real = kmask > 0
    r = jnp.where(real, rewards.astype(jnp.float32), 0.0)  # [P, K]
    k = rewards.shape[-1]
    # risk[p, i, j]: j competes when i is chosen (j real and ranked no better than i). The
    # diagonal keeps an absent slot's set non-empty, so no all -inf logsumexp (NaN gradient).
    risk = real[:, None, :] & (ranks[:, None, :] >= ranks[:, :, None])  # [P, K, K]
    risk = risk | jnp.eye(k, dtype=bool)[None]
    lse = jax.nn.logsumexp(jnp.where(risk, r[:, None, :], -jnp.inf), axis=-1)  # [P, K]
    terms = jnp.where(real, r - lse, 0.0)
    return -terms.sum(axis=-1)


def dpo_loss(logp, logp_ref, ranks, kmask, *, beta, loss="sigmoid", label_smoothing=0.0):
    """The DPO loss of a K-way comparison batch, each prompt's ranked pairs one element.

    Args:
      logp: [P, K] summed response log-probs under the policy.
      logp_ref: [P, K] the same under the frozen reference.
      ranks: [P, K] int dense ranks, 0 = best.
      kmask: [P, K], 1 for real responses.
      beta: the KL coefficient.
      loss: one of LOSSES (static); see the module docstring.
      label_smoothing: conservative DPO's eps (sigmoid only).

    Returns:
      (loss [] float32, metrics) with scalar metrics accuracy (fraction of ranked pairs with
      r_w > r_l, pooled over pairs), tie_frac (r_w == r_l; every pair at the reference), margin
      (mean r_w - r_l), chosen_reward / rejected_reward and chosen_logp / rejected_logp (means
      over pairs of the winner's and the loser's), pairs and prompts (counts).
    """
    r = implicit_rewards(logp, logp_ref, kmask, beta)  # [P, K]
    return preference_loss(
        r, logp, ranks, kmask, beta=beta, loss=loss, label_smoothing=label_smoothing
    )


def simpo_loss(logp, lengths, ranks, kmask, *, beta, gamma, label_smoothing=0.0):
    """SimPO's loss of a K-way comparison batch (no reference), each prompt's pairs one element.

    Args:
      logp: [P, K] summed response log-probs under the policy.
      lengths: [P, K] response lengths in tokens.
      ranks, kmask: as `dpo_loss`.
      beta: the reward scale (SimPO's beta, 2.0-2.5 in the paper).
      gamma: the target reward margin (paper: gamma / beta about 0.5).
      label_smoothing: as `dpo_loss`.

    Returns:
      (loss [] float32, metrics) as `dpo_loss`'s, the rewards being SimPO's.
    """
    r = simpo_rewards(logp, lengths, kmask, beta)  # [P, K]
    return preference_loss(
        r, logp, ranks, kmask, beta=beta, loss="simpo", label_smoothing=label_smoothing,
        margin=gamma,
    )  # fmt: skip


def preference_loss(r, logp, ranks, kmask, *, beta, loss, label_smoothing=0.0, margin=0.0):
    """The loss and metrics of rewards r [P, K] over each prompt's ranked pairs, as `dpo_loss`
    describes; `logp` [P, K] only feeds the chosen/rejected log-prob metrics."""
    pairs = losses.rm_pair_matrix(ranks, kmask)  # [P, K, K]
    z = r[:, :, None] - r[:, None, :]  # [P, K, K] r_i - r_j
    per_prompt_pairs = pairs.sum(axis=(1, 2))  # [P]
    has_pairs = per_prompt_pairs > 0
    n_prompts = has_pairs.sum().astype(jnp.float32)
    if loss == "plackett_luce":
        per_prompt = plackett_luce_nll(r, ranks, kmask)
    else:
        per_pair = pair_losses(
            z, loss=loss, beta=beta, label_smoothing=label_smoothing, margin=margin
        )
        per_pair = jnp.where(pairs > 0, per_pair, 0.0)
        per_prompt = per_pair.sum(axis=(1, 2)) / jnp.maximum(per_prompt_pairs, 1.0)
    total = jnp.where(has_pairs, per_prompt, 0.0).sum() / jnp.maximum(n_prompts, 1.0)

    n_pairs = jnp.maximum(pairs.sum(), 1.0)
    lp = jnp.where(kmask > 0, logp.astype(jnp.float32), 0.0)
    over_pairs = lambda x: jnp.where(pairs > 0, x, 0.0).sum() / n_pairs
    metrics = {
        "accuracy": over_pairs((z > 0).astype(jnp.float32)),
        "tie_frac": over_pairs((z == 0).astype(jnp.float32)),
        "margin": over_pairs(z),
        "chosen_reward": over_pairs(jnp.broadcast_to(r[:, :, None], z.shape)),
        "rejected_reward": over_pairs(jnp.broadcast_to(r[:, None, :], z.shape)),
        "chosen_logp": over_pairs(jnp.broadcast_to(lp[:, :, None], z.shape)),
        "rejected_logp": over_pairs(jnp.broadcast_to(lp[:, None, :], z.shape)),
        "pairs": pairs.sum(),
        "prompts": n_prompts,
    }
    return total, metrics
