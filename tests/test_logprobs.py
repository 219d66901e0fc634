"""likelihood.teacher_forced_logprobs, the one log-prob function, against a naive numpy
log-softmax over a tiny model's logits: at temperature 1 and 0.7, whatever the padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models import config as model_config
from rlhf_jax.models import transformer as M
from rlhf_jax.sampling import likelihood

V, S = 64, 12  # vocab, padded row width
SEQ = [1, 17, 5, 42, 9, 33, 2]  # one row's real tokens (bos ... eos)
LAYOUTS = [(5, 0), (0, 5), (2, 3)]  # (left pads, right pads) around SEQ


def naive_logprobs(logits, tokens, temperature):
    """log softmax(logits / T)[next token] by a plain loop: logits [n, V] of one unpadded row."""
    out = []
    for t in range(len(tokens) - 1):
        z = np.asarray(logits[t], np.float64) / temperature
        z = z - z.max()
        out.append(z[tokens[t + 1]] - np.log(np.exp(z).sum()))
    return np.array(out)


def padded(left, right, pad=0):
    tokens = np.array([pad] * left + SEQ + [pad] * right, np.int32)
    mask = np.array([False] * left + [True] * len(SEQ) + [False] * right)
    return tokens, mask


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logprobs_match_a_naive_log_softmax_whatever_the_padding(family):
    cfg = model_config.preset("tiny", family=family, dtype="float32", vocab_size=V)
    graphdef, params = nnx.split(M.build(cfg, seed=0), nnx.Param)
    params = nnx.to_pure_dict(params)
    # The reference: the model's logits of the unpadded row (default positions, no mask).
    logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray([SEQ], jnp.int32))[0][0])
    assert logits.dtype == np.float32 and np.abs(logits).max() > 0.1  # not a flat distribution

    rows = [padded(left, right) for left, right in LAYOUTS]
    tokens = jnp.asarray(np.stack([r[0] for r in rows]))  # [3, S]
    mask = jnp.asarray(np.stack([r[1] for r in rows]))

    @jax.jit
    def fn(params, tokens, mask, temperature):
        full = likelihood.teacher_forced_logprobs(
            graphdef, params, tokens, mask, temperature=temperature
        )  # [B, S-1]
        # PPO's call: the head at columns 6 .. S-2 only; the left-padded row's last 5 targets.
        part, scaled = likelihood.teacher_forced_logprobs(
            graphdef, params, tokens, mask, start=6, temperature=temperature, return_logits=True
        )
        return full, part, scaled

    @jax.jit
    def right_only(params, tokens, mask, temperature):  # DPO's call on right-padded rows
        return likelihood.teacher_forced_logprobs(
            graphdef, params, tokens, mask, temperature=temperature, right_padded=True
        )

    n = len(SEQ)
    for temperature in (1.0, 0.7):
        want = naive_logprobs(logits, SEQ, temperature)  # [n-1]
        t = jnp.float32(temperature)
        full, part, scaled = jax.device_get(fn(params, tokens, mask, t))
        assert full.shape == (3, S - 1) and full.dtype == np.float32
        for row, (left, _) in enumerate(LAYOUTS):
            # Entry t scores token t+1: the row's targets sit at columns left .. left+n-2.
            np.testing.assert_allclose(full[row, left : left + n - 1], want, rtol=1e-5, atol=1e-5)
            rest = np.delete(full[row], np.arange(left, left + n - 1))
            assert (rest == 0).all()  # padding scores nothing
        np.testing.assert_allclose(part, full[:, 6:], rtol=1e-5, atol=1e-6)
        assert scaled.shape == (3, S - 7, V)
        np.testing.assert_allclose(scaled[0], logits[1:-1] / temperature, rtol=1e-5, atol=1e-5)

        right = jax.device_get(right_only(params, tokens[1:2], mask[1:2], t))[0]
        np.testing.assert_allclose(right[: n - 1], want, rtol=1e-5, atol=1e-5)
        assert (right[n - 1 :] == 0).all()
        unpadded = jax.device_get(
            likelihood.teacher_forced_logprobs(
                graphdef, params, jnp.asarray([SEQ]), jnp.ones((1, n), bool), temperature=t
            )
        )[0]
        np.testing.assert_allclose(unpadded, want, rtol=1e-5, atol=1e-5)
