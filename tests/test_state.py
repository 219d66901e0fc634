"""Optimizer pieces: the learning-rate schedule and the weight-decay mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.infra import state as S


def naive_lr(step, c):
    if step < c.warmup_steps:
        return c.lr * step / c.warmup_steps
    frac = min((step - c.warmup_steps) / (c.total_steps - c.warmup_steps), 1.0)
    low = c.lr * c.min_lr_ratio
    return low + (c.lr - low) * 0.5 * (1 + math.cos(math.pi * frac))


def test_warmup_cosine_schedule_matches_formula():
    c = S.OptimConfig(lr=1e-3, warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    sched = S.lr_schedule(c)
    for step in (0, 1, 5, 10, 11, 50, 99, 100, 150):
        np.testing.assert_allclose(float(sched(step)), naive_lr(step, c), rtol=1e-5, atol=1e-9)


def test_weight_decay_skips_vectors():
    c = S.OptimConfig(lr=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5, grad_clip=1.0)
    tx = S.make_optimizer(c)
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zero, tx.init(params), params)
    # With zero gradients only decoupled weight decay moves params: matrices shrink, vectors don't.
    np.testing.assert_allclose(upd["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(upd["b"], np.zeros(2))
