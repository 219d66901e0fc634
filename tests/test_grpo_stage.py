"""GRPO stage through `grpo.run`: the first minibatch is exactly on-policy, the rollout scores
come from the reward function, and kill-and-resume is bitwise."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest

from experiments import grpo, pretrain
from rlhf_jax.data import lm_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.infra import checkpoint, metrics
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import state as state_lib
from rlhf_jax.stages import grpo as grpo_stage
from rlhf_jax.stages import setup

pytestmark = pytest.mark.slow  # in-process stage runs


def count_a(prompts, responses):
    """A reward a random policy's samples already vary in, so groups are rarely flat."""
    return [min(r.count("a"), 5) / 5 for r in responses]


def write_init_dir(root):
    """A seeded tiny LM written as a stage workdir `root/sft` (no training needed to test a
    loop), and its tokenizer at `root/tok.model`."""
    docs = lm_data.read_documents(pretrain.get_config().data.train)
    tok_path = tok_lib.train_tokenizer(docs, str(root / "tok.model"), 512)
    tok = tok_lib.Tokenizer.load(tok_path)
    cfg = setup.model_config_from(grpo.get_config(), tok.vocab_size)
    mesh = mesh_lib.build_mesh(grpo.get_config().mesh, jax.devices())
    _, _, shard = state_lib.param_shardings(cfg, mesh, grpo.get_config().sharding.rules)
    params = state_lib.init_params(cfg, 0, shard)
    ckpt = checkpoint.Checkpointer(str(root / "sft" / "checkpoints"))
    ckpt.save(1, {"params": params}, meta={"model": dataclasses.asdict(cfg), "stage": "sft"})
    ckpt.close()
    shutil.copyfile(tok_path, root / "sft" / setup.TOKENIZER_FILE)
    return root


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    return write_init_dir(tmp_path_factory.mktemp("grpo"))


def grpo_config(root):
    c = grpo.get_config()
    c.init_from = str(root / "sft")
    c.grpo.reward_fn = "test_grpo_stage:count_a"
    c.grpo.update(prompts=4, group_size=4, minibatch=8, epochs=2, prompt_len=32)
    c.grpo.update(max_new_tokens=8, eval_prompts=4, ptx_coef=1.0, ptx_batch=8, ptx_seq_len=32)
    c.data.ptx = pretrain.get_config().data.train
    c.train.update(steps=4, log_every=1, ckpt_every=2, eval_every=4, lr=1e-3)
    return c


def run(config, workdir):
    return grpo_stage.run(config, mesh_lib.build_mesh(config.mesh, jax.devices()), str(workdir))


class Crash(Exception):
    pass


def test_on_policy_first_minibatch_and_bitwise_resume(init_dir, monkeypatch):
    config = grpo_config(init_dir)
    straight = run(config, init_dir / "a")
    rows = [r for r in metrics.read_metrics(str(init_dir / "a" / "metrics.jsonl"))]
    train = [r for r in rows if "grpo/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        # One in exact arithmetic; score and update are compiled apart (a few float32 ulps).
        assert r["grpo/first_ratio_max"] == pytest.approx(1.0, abs=2e-6)
        assert r["grpo/first_ratio_min"] == pytest.approx(1.0, abs=2e-6)
        assert 0.0 < r["grpo/score"] <= 1.0 and r["grpo/flat_groups"] < 1.0
    assert any(r["grpo/ratio_max"] > 1.0 + 1e-4 for r in train)  # later minibatches moved
    assert any("eval/score" in r for r in rows) and all(r["grpo/ptx_loss"] > 0 for r in train)

    real_write = metrics.MetricsWriter.write

    def crash_at_3(self, step, m):
        real_write(self, step, m)
        if step == 3:
            raise Crash("simulated preemption after iteration 3 (last checkpoint: 2)")

    monkeypatch.setattr(metrics.MetricsWriter, "write", crash_at_3)
    with pytest.raises(Crash):
        run(config, init_dir / "b")
    monkeypatch.undo()
    assert checkpoint.Checkpointer(str(init_dir / "b" / "checkpoints")).latest_step() == 2
    resumed = run(config, init_dir / "b")
    for key in ("params", "opt_state"):
        a = jax.tree.leaves(jax.device_get(straight[key]))
        b = jax.tree.leaves(jax.device_get(resumed[key]))
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_bad_grpo_config_is_one_sentence(init_dir):
    config = grpo_config(init_dir)
    config.grpo.kl_in = "both"
    with pytest.raises(ValueError, match="unknown grpo.kl_in"):
        run(config, init_dir / "c")
    config.grpo.kl_in, config.grpo.group_size = "loss", 1
    with pytest.raises(ValueError, match="at least 2"):
        run(config, init_dir / "c")
