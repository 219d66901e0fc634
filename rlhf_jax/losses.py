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
