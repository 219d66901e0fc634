"""RM stage: ties reported apart from accuracy, and what it refuses before training starts."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import pretrain, rm
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.rl import losses
from rlhf_jax.stages import lm
from rlhf_jax.stages import rm as rm_stage


def naive_accuracy_and_ties(scores, ranks):
    wins = ties = pairs = 0
    for s, r in zip(scores, ranks, strict=True):
        for i in range(len(r)):
            for j in range(len(r)):
                if r[i] >= 0 and r[j] >= 0 and r[i] < r[j]:  # i ranked strictly better
                    pairs += 1
                    wins += s[i] > s[j]
                    ties += s[i] == s[j]
    return wins / pairs, ties / pairs


def test_equal_scores_are_ties_not_errors():
    ranks = jnp.array([[0, 1, 2], [0, 0, 1]])
    kmask = jnp.ones((2, 3))
    _, m = losses.rm_loss(jnp.zeros((2, 3)), ranks, kmask)  # a fresh head: every score equal
    assert float(m["accuracy"]) == 0.0 and float(m["tie_frac"]) == 1.0
    scores = np.array([[1.0, 1.0, -2.0], [0.5, 0.1, 0.3]], np.float32)
    _, m = losses.rm_loss(jnp.asarray(scores), ranks, kmask)
    acc, ties = naive_accuracy_and_ties(scores, np.asarray(ranks))
    np.testing.assert_allclose([m["accuracy"], m["tie_frac"]], [acc, ties], rtol=1e-6)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    wd = tmp_path_factory.mktemp("pre")
    c = pretrain.get_config()
    c.train.update(steps=1, batch_size=4, seq_len=32, warmup_steps=0, log_every=1, ckpt_every=1)
    c.train.eval_every = 0
    c.data.cache = False
    lm.run(c, mesh_lib.build_mesh(c.mesh, jax.devices()[:1]), str(wd))
    return str(wd)


def test_missing_norm_data_stops_before_training(pretrained, tmp_path):
    c = rm.get_config()
    c.init_from = pretrained  # a pretraining workdir: no demonstrations to normalise against
    c.train.steps = 2
    mesh = mesh_lib.build_mesh(c.mesh, jax.devices())
    with pytest.raises(ValueError, match="set config.rm.norm_data"):
        rm_stage.run(c, mesh, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")  # nothing was trained


def _rm_batch(rng, b, k, n, vocab):
    mask = np.zeros((b, k, n), bool)
    for i in range(b):
        for j in range(k):
            mask[i, j, : rng.integers(3, n + 1)] = True
    ranks = np.stack([rng.permutation(k) for _ in range(b)]).astype(np.int32)
    # With 8 devices and 2 rows each, accumulate.microbatches gives microbatch 0 the even rows
    # and microbatch 1 the odd ones. Rows 0, 2, 4 make their weights differ: 6 vs 8 prompts
    # with a pair, 17 vs 22 pairs.
    ranks[0] = [0, 0, 1]  # a tie: 2 pairs, not 3
    ranks[2] = [0, 0, 0]  # all tied: no pair, so not a prompt the loss averages over
    kmask = np.ones((b, k), np.float32)
    kmask[4], ranks[4] = 0.0, -1  # a padding row
    kmask[1, 2], ranks[1, 2] = 0.0, -1  # an absent slot: 1 pair
    return {
        "tokens": np.where(mask, rng.integers(4, vocab, (b, k, n)), 0).astype(np.int32),
        "mask": mask,
        "ranks": ranks,
        "kmask": kmask,
    }


@pytest.mark.parametrize("batching", ["per_prompt", "per_pair"])
@pytest.mark.slow
def test_grad_accum_equals_the_full_batch_gradient(batching):
    import functools

    import optax

    from rlhf_jax.infra import sharding
    from rlhf_jax.infra import state as state_lib
    from rlhf_jax.models import config as model_config

    cfg = model_config.preset("tiny", family="gpt2", dtype="float32", head="scalar")
    mesh = mesh_lib.build_mesh(rm.get_config().mesh, jax.devices())
    rules = sharding.DEFAULT_RULES
    tx = optax.sgd(1.0)  # new params = params - grad: the step exposes the gradient exactly
    graphdef, state, _ = state_lib.create_train_state(cfg, tx, mesh, rules, seed=0)
    head = state["params"]["score_head"]
    state["params"]["score_head"] = jax.device_put(
        jax.random.normal(jax.random.key(1), head.shape), head.sharding
    )
    host = _rm_batch(np.random.default_rng(0), 16, 3, 12, cfg.vocab_size)
    batch = sharding.put_batch(host, mesh, rules)
    params0 = jax.tree.map(np.asarray, state["params"])

    def step(accum):
        fn = functools.partial(
            rm_stage.train_step, graphdef=graphdef, tx=tx, batching=batching, margin=0.0,
            mesh=mesh, rules=rules, grad_accum=accum,
        )  # fmt: skip
        new, m = jax.jit(fn)(jax.tree.map(jnp.copy, state), batch)
        grads = jax.tree.map(lambda a, b: a - np.asarray(b), params0, new["params"])
        return grads, jax.tree.map(float, m)

    full_g, full_m = step(1)
    # Naive reference: each microbatch's gradient by itself, weighted by the examples its loss
    # averages over (prompts with a pair, or pairs), as one pass over the whole batch weighs them.
    loss_fn = functools.partial(rm_stage.rm_loss, graphdef=graphdef, batching=batching, margin=0.0)
    ref, weights = None, []
    for rows in (slice(0, None, 2), slice(1, None, 2)):  # the microbatches of accum=2
        (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(
            params0, {k: jnp.asarray(v[rows]) for k, v in host.items()}
        )
        w = float(m["prompts"] if batching == "per_prompt" else m["pairs"])
        g = jax.tree.map(lambda x, w=w: np.asarray(x) * w, g)
        ref = g if ref is None else jax.tree.map(np.add, ref, g)
        weights.append(w)
    assert weights == ([6.0, 8.0] if batching == "per_prompt" else [17.0, 22.0])
    ref = jax.tree.map(lambda x: x / sum(weights), ref)
    for accum in (2,):
        g, m = step(accum)
        for got, want, naive in zip(
            jax.tree.leaves(g), jax.tree.leaves(full_g), jax.tree.leaves(ref), strict=True
        ):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)  # f32 sum order
            np.testing.assert_allclose(got, naive, atol=1e-5, rtol=1e-4)
        keys = {"rm/loss", "rm/accuracy", "rm/tie_frac", "rm/margin", "rm/reward_mean",
                "rm/reward_std", "rm/pairs", "rm/prompts", "rm/grad_norm"}  # fmt: skip
        assert set(m) == set(full_m) == keys  # the names the stage has always logged
        for key in sorted(keys):
            np.testing.assert_allclose(m[key], full_m[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert full_m["rm/grad_norm"] > 1e-3
