"""DPO and GRPO-ptx (with a reward function) as 2 processes x 4 CPU devices through the real
entry, equal to 1 process x 8: every logged number, evals (held-out KL, sampled rollouts) and
pretraining batches included."""

import pytest
from run_compare import assert_same_run, metrics, one_process, two_processes
from test_grpo_stage import write_init_dir

pytestmark = pytest.mark.slow

DPO = [
    "--config", "experiments/dpo.py", "--config.train.steps=3", "--config.train.batch_size=8",
    "--config.train.seq_len=48", "--config.train.log_every=1", "--config.train.ckpt_every=3",
    "--config.train.eval_every=3", "--config.train.eval_batches=2", "--config.dpo.kl_prompts=8",
    "--config.dpo.kl_prompt_len=24", "--config.dpo.kl_max_new_tokens=8",
]  # fmt: skip
GRPO = [
    "--config", "experiments/grpo.py", "--config.train.steps=2", "--config.train.log_every=1",
    "--config.train.ckpt_every=2", "--config.train.eval_every=2", "--config.grpo.prompts=4",
    "--config.grpo.group_size=4", "--config.grpo.minibatch=8", "--config.grpo.epochs=2",
    "--config.grpo.max_new_tokens=8", "--config.grpo.eval_prompts=4",
    "--config.grpo.reward_fn=tests.test_grpo_stage:count_a", "--config.grpo.ptx_coef=1.0",
    "--config.grpo.ptx_batch=8", "--config.grpo.ptx_seq_len=32",
    "--config.data.ptx=experiments/data/tiny_corpus.jsonl",
]  # fmt: skip


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    return write_init_dir(tmp_path_factory.mktemp("procs"))


def test_dpo_two_processes_match_one(init_dir, tmp_path):
    flags = [*DPO, "--config.init_from", str(init_dir / "sft")]
    one_process(tmp_path / "one", *flags)
    two_processes(tmp_path / "two", *flags)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    m = metrics(tmp_path / "two")
    assert (3, "eval/kl") in m and (3, "dpo/accuracy") in m


def test_grpo_two_processes_match_one(init_dir, tmp_path):
    flags = [*GRPO, "--config.init_from", str(init_dir / "sft")]
    one_process(tmp_path / "one", *flags)
    two_processes(tmp_path / "two", *flags)
    assert_same_run(tmp_path / "one", tmp_path / "two")
    m = metrics(tmp_path / "two")
    assert (2, "eval/score") in m and (2, "grpo/ptx_loss") in m
