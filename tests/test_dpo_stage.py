"""DPO stage through `dpo.run`: log 2 at the reference, the loss goes down on a learnable
preference, the held-out KL starts at 0, kill-and-resume is bitwise, and gradient accumulation
equals the one-pass step."""

import json
import math
import random

import jax
import numpy as np
import pytest

from experiments import dpo, pretrain
from rlhf_jax.data import lm_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.infra import checkpoint, metrics
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.stages import dpo as dpo_stage


def pairwise_comparisons(path, n, seed):
    """Chosen responses start with 'apples'; rejected ones never contain it."""
    r = random.Random(seed)
    words = ["bob", "went", "to", "the", "park", "with", "coins", "stones", "cards", "pens"]
    body = lambda: " ".join(r.choice(words) for _ in range(r.randint(2, 5)))
    with open(path, "w") as f:
        for _ in range(n):
            row = {"prompt": f"say {r.randrange(40)}", "chosen": "apples " + body()}
            row["rejected"] = body()
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    docs = lm_data.read_documents(pretrain.get_config().data.train)
    tok = tok_lib.train_tokenizer(docs, str(root / "tok.model"), 512)
    pairwise_comparisons(root / "cmp.jsonl", 200, seed=0)
    return root, tok


def dpo_config(root, tok):
    c = dpo.get_config()
    c.tokenizer.path = tok
    c.data.train = str(root / "cmp.jsonl")
    c.data.eval_fraction = 0.2
    c.train.update(
        steps=8,
        batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=0,
        log_every=1,
        eval_every=8,
        ckpt_every=4,
    )
    c.dpo.update(kl_prompts=8, kl_prompt_len=16, kl_max_new_tokens=8)
    return c


def run(config, workdir):
    return dpo_stage.run(config, mesh_lib.build_mesh(config.mesh, jax.devices()), str(workdir))


@pytest.fixture(scope="module")
def straight(setup_dir):
    root, tok = setup_dir
    state = run(dpo_config(root, tok), root / "a")
    return state, metrics.read_metrics(str(root / "a" / "metrics.jsonl"))


@pytest.mark.slow
def test_log2_at_reference_then_loss_falls(straight):
    _, rows = straight
    train = [r for r in rows if "dpo/loss" in r]
    first = next(r for r in rows if r.get("step") == 0 and "eval/loss" in r)
    # Policy == reference at step 0: every pair's implicit reward margin is 0.
    np.testing.assert_allclose(train[0]["dpo/loss"], math.log(2), atol=1e-5)
    np.testing.assert_allclose(first["eval/loss"], math.log(2), atol=1e-5)
    assert first["eval/kl"] == 0.0 and first["eval/tie_frac"] == 1.0
    last = [r for r in rows if r.get("step") == 8 and "eval/loss" in r][-1]
    assert last["eval/loss"] < math.log(2) - 0.05, last
    assert last["eval/accuracy"] > 0.8 and last["eval/kl"] > 0.0, last
    assert np.mean([r["dpo/loss"] for r in train[-3:]]) < train[0]["dpo/loss"] - 0.05
    assert last["eval/chosen_reward"] > last["eval/rejected_reward"]


class Crash(Exception):
    pass


@pytest.mark.slow
def test_kill_and_resume_is_bitwise(straight, setup_dir, monkeypatch):
    root, tok = setup_dir
    config = dpo_config(root, tok)
    real_write = metrics.MetricsWriter.write

    def crash_at_6(self, step, m):
        real_write(self, step, m)
        if step == 6:
            raise Crash("simulated preemption after step 6 (last checkpoint: 4)")

    monkeypatch.setattr(metrics.MetricsWriter, "write", crash_at_6)
    with pytest.raises(Crash):
        run(config, root / "b")
    monkeypatch.undo()
    assert checkpoint.Checkpointer(str(root / "b" / "checkpoints")).latest_step() == 4
    resumed = run(config, root / "b")
    for key in ("params", "opt_state"):
        a = jax.tree.leaves(jax.device_get(straight[0][key]))
        b = jax.tree.leaves(jax.device_get(resumed[key]))
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    steps = [
        r["step"]
        for r in metrics.read_metrics(str(root / "b" / "metrics.jsonl"))
        if "dpo/loss" in r
    ]
    assert steps == list(range(1, 9))


def test_bad_dpo_config_is_one_sentence(setup_dir):
    root, tok = setup_dir
    config = dpo_config(root, tok)
    config.dpo.loss = "hinge"
    with pytest.raises(ValueError, match="unknown dpo.loss"):
        run(config, root / "c")
    config.dpo.loss, config.dpo.label_smoothing = "ipo", 0.1
    with pytest.raises(ValueError, match="sigmoid"):
        run(config, root / "c")


def test_grad_accum_equals_the_full_batch_gradient():
    """Two microbatches give the one-pass gradient and metrics (sgd(1): new = params - grad),
    on K = 3 rows with an absent slot and ragged prompt and response lengths."""
    import functools

    import jax.numpy as jnp
    import optax

    from rlhf_jax.infra import sharding
    from rlhf_jax.infra import state as state_lib
    from rlhf_jax.models import config as model_config

    cfg = model_config.preset("tiny", family="gpt2", dtype="float32")
    mesh = mesh_lib.build_mesh(dpo.get_config().mesh, jax.devices())
    rules = sharding.DEFAULT_RULES
    tx = optax.sgd(1.0)
    graphdef, state, _ = state_lib.create_train_state(cfg, tx, mesh, rules, seed=0)
    _, ref, _ = state_lib.create_train_state(cfg, tx, mesh, rules, seed=1)
    rng = np.random.default_rng(0)
    b, k, n = 16, 3, 12
    lengths = rng.integers(6, n + 1, (b, k))
    mask = np.arange(n)[None, None, :] < lengths[:, :, None]
    ranks = np.tile(np.array([0, 1, 2], np.int32), (b, 1))
    ranks[::2, 2] = -1  # every other row: K = 2
    # Rows 0 and 4 (microbatch 0 of their devices) have no response at all: no pair, so the two
    # microbatches weigh unequally (6 vs 8 prompts with a pair, 6 vs 24 pairs).
    ranks[[0, 4]] = -1
    host = {
        "tokens": np.where(mask, rng.integers(3, cfg.vocab_size, (b, k, n)), 0).astype(np.int32),
        "mask": mask,
        "ranks": ranks,
        "kmask": (ranks >= 0).astype(np.float32),
        "prompt_len": rng.integers(2, 5, b).astype(np.int32),
    }
    batch = sharding.put_batch(host, mesh, rules)
    params0 = jax.tree.map(np.asarray, state["params"])

    def step(accum):
        fn = functools.partial(
            dpo_stage.train_step, graphdef=graphdef, tx=tx, c=dpo.get_config().dpo,
            mesh=mesh, rules=rules, grad_accum=accum,
        )  # fmt: skip
        new, m = jax.jit(fn)(jax.tree.map(jnp.copy, state), ref["params"], batch)
        grads = jax.tree.map(lambda a, x: a - np.asarray(x), params0, new["params"])
        return grads, jax.tree.map(float, m)

    g1, m1 = step(1)
    g2, m2 = step(2)
    assert m1["dpo/loss"] != pytest.approx(math.log(2))  # policy != reference
    assert m1["dpo/prompts"] == 14 and m1["dpo/pairs"] == 6 * 1 + 8 * 3
    # Rewards are beta-scaled differences of summed log-probs (|sum| ~ 30): the two programs sum
    # in another order, so a few float32 ulps of those sums (~1e-6 here) is the tolerance.
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for a, x in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(x, a, rtol=1e-4, atol=1e-6)
    # The eval step in the same microbatches sums to the one-pass eval.
    ev = lambda n: jax.tree.map(float, jax.jit(functools.partial(
        dpo_stage.eval_step, graphdef=graphdef, c=dpo.get_config().dpo, mesh=mesh, rules=rules,
        microbatches=n))(state["params"], ref["params"], batch))  # fmt: skip
    e1, e2 = ev(1), ev(2)
    assert e1["prompts"] == 14
    for key in e1:
        np.testing.assert_allclose(e2[key], e1[key], rtol=1e-5, atol=1e-5, err_msg=key)
