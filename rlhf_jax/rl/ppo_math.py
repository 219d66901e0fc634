"""The PPO-ptx math: KL estimates, KL-shaped rewards, GAE, whitening, clipped losses, KL control.

Pure jnp, float32, jit-able; no model code. A rollout batch holds B responses of T tokens (response
positions only). `mask` [B, T] is 1 on real response tokens (up to and including EOS) and 0 after:
real tokens are a prefix of each row and every row has at least one. Values in padding may be
garbage (even NaN); every function selects with `jnp.where` rather than multiplying by the mask,
so nothing there reaches a result or a gradient. Each function is checked against a naive numpy
loop in tests/test_ppo_losses.py.

Normalisation: every "mean" here is over all real tokens of the batch pooled (token-level), not a
mean of per-sequence means, so long responses weigh in proportion to their length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KL_KINDS = ("k1", "k2", "k3", "abs")


def _real(mask):
    return mask > 0


def kl_estimate(logp, logp_ref, kind="k1"):
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs.

    With log r = logp - logp_ref and tokens sampled from pi (Schulman's "Approximating KL
    divergence" estimators):
      k1: log r. Unbiased, but negative on single tokens; InstructGPT's per-token penalty.
      k2: 0.5 * (log r)^2. Non-negative, biased (low bias when pi is close to pi_ref).
      k3: exp(-log r) - 1 + log r. Non-negative and unbiased.
      abs: |log r|.

    The values estimate KL(pi || pi_ref); their gradients, as loss terms differentiated through
    logp with the sampled tokens held fixed (no score-function term; how GRPO's loss uses k3),
    estimate other things. With y ~ pi and grad log pi(y) the policy's score:
      k1: E_pi[grad log pi] = 0. No expected gradient at all: k1 has to enter the *reward*
          (shaped_rewards) to pull pi toward pi_ref through the policy gradient.
      k2: E_pi[log r * grad log pi] = grad KL(pi || pi_ref) (the score-function form of k1).
      k3: E_pi[(1 - pi_ref / pi) grad log pi] = -sum_y pi_ref(y) grad log pi(y)
          = grad KL(pi_ref || pi): the gradient of the REVERSE KL (mass-covering: it pushes pi
          up wherever pi_ref has mass, not down where pi exceeds pi_ref), although its value
          estimates KL(pi || pi_ref). The two agree to second order near pi = pi_ref and
          differ away from it. Per token, each holds conditionally on the prefix: the
          prefix's own dependence on pi is not differentiated (a sequence-level KL's gradient
          would also weight each token by the rest of its sequence's log-ratio).

    Args:
      logp: [B, T] log pi(y_t) under the policy.
      logp_ref: [B, T] log pi_ref(y_t) under the reference.
      kind: one of KL_KINDS (static).

    Returns:
      [B, T] float32 (not masked: padding holds whatever its inputs give).
    """
    log_r = logp.astype(jnp.float32) - logp_ref.astype(jnp.float32)  # [B, T]
    if kind == "k1":
        return log_r
    elif kind == "k2":
        return 0.5 * jnp.square(log_r)
    elif kind == "k3":
        # expm1 keeps precision when log r is tiny, where k3 ~ (log r)^2 / 2.
        return jnp.expm1(-log_r) + log_r
    elif kind == "abs":
        return jnp.abs(log_r)
    raise ValueError(f"unknown kl kind: {kind!r}; expected one of {KL_KINDS}")


def shaped_rewards(scores, kl, mask, beta):
    """InstructGPT's per-token reward: r_t = -beta * kl_t, plus the RM score at the last real token.

    Args:
      scores: [B] sequence scores from the reward model.
      kl: [B, T] per-token KL estimate (see `kl_estimate`).
      mask: [B, T] response mask (real tokens a prefix of each row).
      beta: KL coefficient; a Python float or a traced scalar (adaptive control).

    Returns:
      [B, T] float32 rewards, 0 on padding.
    """
    real = _real(mask)
    n_real = real.sum(axis=1)  # [B]
    # Prefix masks: the last real token sits at index length - 1.
    is_last = jax.nn.one_hot(n_real - 1, mask.shape[1], dtype=jnp.bool_)  # [B, T]
    rewards = -jnp.asarray(beta, jnp.float32) * kl.astype(jnp.float32)
    rewards = rewards + jnp.where(is_last, scores.astype(jnp.float32)[:, None], 0.0)
    return jnp.where(real, rewards, 0.0)


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation over the response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where the
    episode ends at the last real token (V and A after it are 0). A reverse `lax.scan` over T.

    Args:
      rewards: [B, T] per-token rewards (see `shaped_rewards`).
      values: [B, T] value estimates V(s_t) from the rollout.
      mask: [B, T] response mask.
      gamma: discount; lam: GAE lambda (Python floats or traced scalars).

    Returns:
      (advantages [B, T], returns [B, T]) float32, returns = advantages + values; both 0 on padding.
    """
    real = _real(mask)
    rewards = jnp.where(real, rewards.astype(jnp.float32), 0.0)
    values = jnp.where(real, values.astype(jnp.float32), 0.0)
    gamma = jnp.asarray(gamma, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)

    def step(carry, xs):
        next_v, next_a = carry  # [B] each, 0 past the episode's end
        r, v, m = xs
        delta = r + gamma * next_v - v
        a = jnp.where(m, delta + gamma * lam * next_a, 0.0)
        # A padding position hands (0, 0) back, which is what the last real token must see.
        return (v, a), a

    init = (jnp.zeros(rewards.shape[0], jnp.float32), jnp.zeros(rewards.shape[0], jnp.float32))
    xs = (rewards.T, values.T, real.T)  # [T, B] each: scan runs over time
    _, adv = jax.lax.scan(step, init, xs, reverse=True)
    adv = adv.T  # [B, T]
    returns = jnp.where(real, adv + values, 0.0)
    return adv, returns


def masked_mean(x, mask, axis=None):
    """Mean of x over real positions (all of them, or along `axis`).

    Args:
      x: [B, T] (any float dtype); mask: [B, T].
      axis: None for a scalar over the whole batch, or the axis to reduce.

    Returns:
      float32 scalar (axis=None) or x reduced along `axis`; 0 where nothing is real.
    """
    real = _real(mask)
    total = jnp.where(real, x.astype(jnp.float32), 0.0).sum(axis=axis)
    count = real.sum(axis=axis).astype(jnp.float32)
    return total / jnp.maximum(count, 1.0)


def masked_var(x, mask, unbiased=True):
    """Variance of x over all real positions of the batch.

    Args:
      x: [B, T]; mask: [B, T].
      unbiased: divide by n - 1 (Bessel) rather than n; a single real token gives 0.

    Returns:
      [] float32.
    """
    real = _real(mask)
    mean = masked_mean(x, mask)
    sq = jnp.where(real, jnp.square(x.astype(jnp.float32) - mean), 0.0)
    n = real.sum().astype(jnp.float32)
    denom = jnp.maximum(n - 1.0, 1.0) if unbiased else jnp.maximum(n, 1.0)
    return sq.sum() / denom


def whiten(x, mask, shift_mean=True, eps=1e-8):
    """Standardise x with the masked mean and (unbiased) variance over all real tokens.

    Args:
      x: [B, T]; mask: [B, T].
      shift_mean: subtract the mean; if False only rescale (the mean is kept, as for rewards
        whose sign carries meaning).
      eps: added to the variance.

    Returns:
      [B, T] float32, 0 on padding.
    """
    x = x.astype(jnp.float32)
    mean = masked_mean(x, mask)
    out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(_real(mask), out, 0.0)


def policy_loss(logp_new, logp_old, advantages, mask, clip_eps):
    """PPO's clipped surrogate, as a loss to minimise.

    loss = masked mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)),
    ratio = exp(logp_new - logp_old).

    Args:
      logp_new: [B, T] log-probs of the rollout tokens under the current policy.
      logp_old: [B, T] the same under the rollout policy (treated as a constant).
      advantages: [B, T] (usually whitened).
      mask: [B, T] response mask.
      clip_eps: the clip range epsilon.

    Returns:
      (loss [] float32, metrics) with scalar metrics:
        clipfrac: fraction of real tokens where the clipped term is strictly the larger (taken).
        approx_kl: masked mean of the k3 estimate ratio - 1 - log ratio of KL(pi_old || pi_new),
          non-negative and unbiased under the rollout's samples.
        ratio_mean, ratio_max: over real tokens.
    """
    real = _real(mask)
    # Select before exp: garbage log-probs in padding could overflow to inf, and inf * 0 = NaN.
    log_ratio = jnp.where(
        real, logp_new.astype(jnp.float32) - logp_old.astype(jnp.float32), 0.0
    )  # [B, T]
    adv = jnp.where(real, advantages.astype(jnp.float32), 0.0)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "approx_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
        "ratio_max": jnp.max(jnp.where(real, ratio, -jnp.inf)),
    }
    return loss, metrics


def value_loss(values_new, values_old, returns, mask, clip_eps):
    """PPO's clipped value loss: 0.5 * masked mean of max((v - R)^2, (v_clipped - R)^2).

    v_clipped = v_old + clip(v - v_old, -eps, eps) keeps the value function from moving further
    than eps from its rollout prediction in one iteration.

    Args:
      values_new: [B, T] current value predictions.
      values_old: [B, T] predictions at rollout time.
      returns: [B, T] GAE returns (see `gae`).
      mask: [B, T] response mask.
      clip_eps: the value clip range (in reward units).

    Returns:
      (loss [] float32, metrics) with scalar metrics value_clipfrac (fraction of real tokens where
      the clipped error is strictly the larger) and value_mean (mean of values_new).
    """
    real = _real(mask)
    v = jnp.where(real, values_new.astype(jnp.float32), 0.0)
    v_old = jnp.where(real, values_old.astype(jnp.float32), 0.0)
    ret = jnp.where(real, returns.astype(jnp.float32), 0.0)
    # Same as v_old + clip(v - v_old, -eps, eps), but exactly v inside the range: the float32
    # round trip v_old + (v - v_old) can differ from v by an ulp and count as "clipped".
    v_clipped = jnp.clip(v, v_old - clip_eps, v_old + clip_eps)
    err = jnp.square(v - ret)  # [B, T]
    err_clipped = jnp.square(v_clipped - ret)  # [B, T]
    loss = 0.5 * masked_mean(jnp.maximum(err, err_clipped), mask)
    metrics = {
        "value_clipfrac": masked_mean((err_clipped > err).astype(jnp.float32), mask),
        "value_mean": masked_mean(v, mask),
    }
    return loss, metrics


def entropy_from_logits(logits, mask):
    """Masked mean over tokens of the entropy of softmax(logits).

    Args:
      logits: [B, T, V] (any float dtype; computed in float32). -inf entries (masked vocabulary)
        are allowed and contribute 0.
      mask: [B, T].

    Returns:
      [] float32.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
    p = jnp.exp(logp)
    # p * logp is 0 * -inf = NaN for -inf logits; their limit is 0.
    ent = -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)  # [B, T]
    return masked_mean(ent, mask)


def explained_variance(values, returns, mask):
    """1 - Var[R - V] / Var[R] over real tokens: 1 is perfect, 0 no better than a constant.

    Args:
      values: [B, T]; returns: [B, T]; mask: [B, T].

    Returns:
      [] float32; 0 when Var[R] is 0 (nothing to explain), so the metric is never NaN.
    """
    values = values.astype(jnp.float32)
    returns = returns.astype(jnp.float32)
    var_r = masked_var(returns, mask, unbiased=False)
    var_err = masked_var(returns - values, mask, unbiased=False)
    return jnp.where(var_r > 0, 1.0 - var_err / jnp.where(var_r > 0, var_r, 1.0), 0.0)


def clip_or_whiten_scores(scores, clip=0.0, whiten=False):
    """Optional batch whitening, then optional clipping, of the RM scores before reward shaping.

    Whitening comes first so that `clip` is in units of the batch's standard deviation when both
    are on (as in reward normalisation with clipping); alone, `clip` is in raw score units.

    Args:
      scores: [B] sequence scores.
      clip: > 0 clips to [-clip, clip]; 0 (or less) leaves scores unclipped. May be traced.
      whiten: standardise over the batch (static Python bool).

    Returns:
      [B] float32.
    """
    scores = scores.astype(jnp.float32)
    if whiten:
        ones = jnp.ones_like(scores)  # [B]: every score is real
        scores = (scores - masked_mean(scores, ones)) * jax.lax.rsqrt(
            masked_var(scores, ones) + 1e-8
        )
    clip = jnp.asarray(clip, jnp.float32)
    return jnp.where(clip > 0, jnp.clip(scores, -clip, clip), scores)


def adaptive_kl_update(coef, observed_kl, n_steps, target, horizon):
    """Ziegler et al. (2019)'s proportional controller for the KL coefficient beta.

    e = clip(observed_kl / target - 1, -0.2, 0.2); coef <- coef * (1 + e * n_steps / horizon).
    A KL above target raises beta, below lowers it; the clip bounds one update's change.

    Args:
      coef: current beta.
      observed_kl: the KL measured on the last rollout, in the same units as `target` (the paper
        uses per-sequence KL: summed over a response's tokens, averaged over the batch).
      n_steps: samples (responses) processed since the last update, e.g. the rollout batch size;
        together with `horizon` it sets how fast beta adapts per sample seen, independently of
        the batch size.
      target: the KL the controller steers towards.
      horizon: samples over which a full-size error moves beta by a factor of about (1 + e)
        (10000 in the paper).

    Returns:
      The new coefficient: a Python float when every argument is a Python number (host-side
      control costs no device dispatch), else a float32 jnp scalar (inside jit).
    """
    args = (coef, observed_kl, n_steps, target, horizon)
    if not any(isinstance(a, jax.Array | np.ndarray | np.generic) for a in args):
        err = min(max(observed_kl / target - 1.0, -0.2), 0.2)
        return float(coef * (1.0 + err * n_steps / horizon))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    err = jnp.clip(f32(observed_kl) / f32(target) - 1.0, -0.2, 0.2)
    return f32(coef) * (1.0 + err * f32(n_steps) / f32(horizon))
