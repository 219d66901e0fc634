"""Losses against naive numpy loops."""

import jax.numpy as jnp
import numpy as np

from rlhf_jax.rl import losses


def naive_xent(logits, targets, mask):
    total, count = 0.0, 0.0
    b, t, _ = logits.shape
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                row = logits[i, j].astype(np.float64)
                lse = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                total += lse - row[targets[i, j]]
                count += 1
    return total, count


def test_masked_xent_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 5))
    mask = rng.random((3, 5)) > 0.3
    got_sum, got_n = losses.masked_xent(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)
    )
    ref_sum, ref_n = naive_xent(logits, targets, mask)
    np.testing.assert_allclose(float(got_sum), ref_sum, rtol=1e-5)
    assert float(got_n) == ref_n


def test_token_logprobs_upcasts_bf16_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 4, 50)).astype(np.float32) * 5
    targets = rng.integers(0, 50, size=(2, 4))
    lp = losses.token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets))
    assert lp.dtype == jnp.float32
    ref = -np.array(
        [
            [
                naive_xent(
                    logits[i : i + 1, j : j + 1].astype(np.float32),
                    targets[i : i + 1, j : j + 1],
                    np.ones((1, 1)),
                )[0]
                for j in range(4)
            ]
            for i in range(2)
        ]
    )
    np.testing.assert_allclose(np.asarray(lp), ref, atol=0.1)  # bf16 inputs: ~2 decimal digits
