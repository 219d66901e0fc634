"""Gradient accumulation, one helper for every supervised stage (LM, RM, DPO and its variants,
KTO): a step's batch run as `grad_accum` microbatches whose gradients combine EXACTLY into the
one-pass gradient, whatever the loss's denominator.

A loss here is a mean over some count that the loss function reports with it (tokens for the
LM loss, prompts with a ranked pair for the RM and DPO losses, real rows for KTO). Each
microbatch's loss is weighted by its own count, so summed weighted gradients over the summed
counts are the full-batch gradient, padding rows included (they count 0). Metrics are pooled the
same way: each mean metric names the count it is a mean over.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib


def microbatches(batch, n: int):
    """[B, ...] -> [n, B/n, ...] keeping each device's rows local (row-major split, then swap:
    microbatch i takes every n-th row of each device's block, so no row crosses devices)."""

    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulate(fn, params, batch, grad_accum: int, *, weight: str, means: dict[str, str], sums=()):
    """(loss, metrics, grads) of `batch`, equal to one pass of `fn` over it.

    Args:
      fn: (params, microbatch) -> (loss [], metrics {name: []}); the loss is a mean over
        metrics[weight] units.
      params: the model's params; only their trainable part is differentiated (all of them
        without LoRA; `state.value_and_grad_trainable`).
      batch: arrays with the batch axis first (the global batch, sharded over data axes).
      grad_accum: the number of microbatches (it divides the per-device rows).
      weight: the metric that counts the loss's units.
      means: {metric: the count it is a mean over}; the counts (and `weight`) are summed.
        Any other metric is averaged over microbatches: use it only for what every
        microbatch shares (e.g. a constant computed over the whole batch).
      sums: further metrics summed over microbatches, like the counts (a count no mean names).

    Returns:
      (loss [], metrics, grads like params' trainable part).
    """
    grad_fn = state_lib.value_and_grad_trainable(fn)
    if grad_accum == 1:
        (loss, m), grads = grad_fn(params, batch)
        return loss, m, grads
    counts = {weight, *means.values(), *sums}

    def one(mb):
        (loss, m), g = grad_fn(params, _rows_stay(mb))
        w = m[weight]
        out = {k: (m[k] * m[means[k]] if k in means else m[k]) for k in m if k not in counts}
        out.update({k: m[k] for k in counts})
        return {"loss_w": loss * w, "grads": jax.tree.map(lambda x: x * w, g), "m": out}

    micro = microbatches(batch, grad_accum)
    first = jax.tree.map(lambda x: x[0], micro)
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(one, first))
    tot, _ = jax.lax.scan(lambda c, mb: (jax.tree.map(jnp.add, c, one(mb)), None), zero, micro)
    w = jnp.maximum(tot["m"][weight], 1.0)
    metrics = {}
    for k, v in tot["m"].items():
        if k in means:
            metrics[k] = v / jnp.maximum(tot["m"][means[k]], 1.0)
        elif k in counts:
            metrics[k] = v
        else:
            metrics[k] = v / grad_accum
    return tot["loss_w"] / w, metrics, jax.tree.map(lambda g: g / w, tot["grads"])


def sum_over(fn, batch, n: int):
    """fn(batch) of additive sums (a pytree of scalars), computed in `n` sequential
    microbatches so an eval never holds more activations than a training microbatch."""
    if n == 1:
        return fn(batch)
    micro = microbatches(batch, n)
    first = jax.tree.map(lambda x: x[0], micro)
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(fn, first))
    add = lambda c, mb: (jax.tree.map(jnp.add, c, fn(_rows_stay(mb))), None)  # noqa: E731
    return jax.lax.scan(add, zero, micro)[0]


def _rows_stay(mb):
    """A microbatch's rows sharded over the batch axes, as its rows already lie (no movement)."""
    return jax.tree.map(
        lambda x: sharding.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1)), mb
    )
