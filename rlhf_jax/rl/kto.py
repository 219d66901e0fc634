"""KTO (Ethayarajh et al. 2024): a policy trained on unpaired desirable / undesirable examples.

Pure jnp, float32, jit-able; no model code. Each example is one (prompt x, completion y, label)
row; with the implied reward r = log pi(y|x) - log pi_ref(y|x) (summed over y's tokens) and the
reference point z0, KTO's value of an example is
  desirable    v = lambda_D * sigmoid(beta * (r - z0))
  undesirable  v = lambda_U * sigmoid(beta * (z0 - r))
and its loss lambda_y - v (the paper's L_KTO = E[lambda_y - v(x, y)]; TRL's KTO loss is the
same, lambda_y * (1 - sigmoid(...))), averaged over the real examples of the batch.

z0 estimates KL(pi || pi_ref) from the batch as the paper does: each example also carries its
prompt with a MISMATCHED completion y' (another prompt's), and
  z0 = max(0, mean over examples of [log pi(y'|x) - log pi_ref(y'|x)]),
held constant in the gradient (the paper does not back-propagate through it). `reference_point`
takes sums so a batch split into microbatches gives the full batch's z0.
Checked against a naive numpy loop in tests/test_kto.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reference_point(kl_logratio, weight):
    """z0 = max(0, weighted mean of the mismatched log-ratios), no gradient.

    Args:
      kl_logratio: [N] log pi(y'|x) - log pi_ref(y'|x) for each row's mismatched completion.
      weight: [N] 1 for real rows, 0 for padding.

    Returns:
      [] float32.
    """
    w = weight.astype(jnp.float32)
    total = jnp.sum(jnp.where(w > 0, kl_logratio.astype(jnp.float32), 0.0) * w)
    return jax.lax.stop_gradient(jnp.maximum(total / jnp.maximum(w.sum(), 1.0), 0.0))


def kto_loss(logp, logp_ref, label, weight, z0, *, beta, desirable_weight=1.0,
             undesirable_weight=1.0):  # fmt: skip
    """The KTO loss of a batch of unpaired rows, and its metrics.

    Args:
      logp: [N] summed completion log-probs under the policy.
      logp_ref: [N] the same under the frozen reference.
      label: [N] 1 for a desirable completion, 0 for an undesirable one.
      weight: [N] 1 for real rows, 0 for padding rows (they weigh nothing anywhere).
      z0: [] the reference point (`reference_point`).
      beta: the KL coefficient.
      desirable_weight, undesirable_weight: lambda_D and lambda_U (the paper keeps
        lambda_D n_D / (lambda_U n_U) in [1, 4/3]).

    Returns:
      (loss [] float32: the mean over real rows, metrics): rows, desirable, undesirable
      (counts), accuracy (fraction of real rows on the label's side of z0: r > z0 for
      desirable, r < z0 for undesirable), chosen_reward / rejected_reward (mean r of the
      desirable / undesirable rows), z0.
    """
    real = weight > 0
    w = jnp.where(real, weight.astype(jnp.float32), 0.0)
    good = real & (label > 0)
    bad = real & ~(label > 0)
    r = jnp.where(real, logp.astype(jnp.float32) - logp_ref.astype(jnp.float32), 0.0)  # [N]
    b = jnp.asarray(beta, jnp.float32)
    lam_d = jnp.asarray(desirable_weight, jnp.float32)
    lam_u = jnp.asarray(undesirable_weight, jnp.float32)
    value = jnp.where(
        good, lam_d * jax.nn.sigmoid(b * (r - z0)), lam_u * jax.nn.sigmoid(b * (z0 - r))
    )
    per_row = jnp.where(good, lam_d, lam_u) - value  # [N]
    n = w.sum()
    loss = jnp.sum(per_row * w) / jnp.maximum(n, 1.0)
    n_good, n_bad = good.sum().astype(jnp.float32), bad.sum().astype(jnp.float32)
    right = jnp.where(good, r > z0, r < z0) & real
    metrics = {
        "rows": n,
        "desirable": n_good,
        "undesirable": n_bad,
        "accuracy": right.sum() / jnp.maximum(n, 1.0),
        "chosen_reward": jnp.where(good, r, 0.0).sum() / jnp.maximum(n_good, 1.0),
        "rejected_reward": jnp.where(bad, r, 0.0).sum() / jnp.maximum(n_bad, 1.0),
        "z0": z0,
    }
    return loss, metrics
