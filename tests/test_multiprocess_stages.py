"""PPO-ptx with a reward function, preempted and resumed, and the generate tool through the
paged rollout engine, as 2 processes x 4 CPU devices through the real entry, equal to 1 process x 8.

Pod slices are always several processes, and a stage that fetches an array spanning processes
(a samples table, a reward function's inputs, an eval) crashes only there. The other stages (SFT
with eval samples, the RM with its normalisation, PPO-ptx with the RM, best-of-K fine-tuning,
DPO, KTO, GRPO, collection and evaluation) and the tools' library paths are compared the same way
in test_pipeline.py's 2-process twin. Here: PPO-ptx scored by a reward function, SIGTERM to one of
the two processes after the first iteration (both agree on a step, checkpoint it and exit 75),
the same command resuming, every logged number and sampled text equal to one uninterrupted
process; and the generate tool through `launch.local --module`, its paged engine sharded over
both processes, writing what the 1-process static sampler writes.
"""

import json
import os

import pytest
from run_compare import (
    assert_same_records,
    assert_same_run,
    metrics,
    one_process,
    read_jsonl,
    sigterm_one_after_first_log,
    two_processes,
)

pytestmark = pytest.mark.slow

PRETRAIN = [
    "--config", "experiments/pretrain.py", "--config.train.steps=20",
    "--config.train.batch_size=8", "--config.train.seq_len=32", "--config.train.eval_every=0",
]  # fmt: skip
SFT = [
    "--config", "experiments/sft.py", "--config.train.epochs=0.0", "--config.train.steps=4",
    "--config.train.batch_size=8", "--config.train.eval_every=0",
]  # fmt: skip
RM = [
    "--config", "experiments/rm.py", "--config.train.steps=4", "--config.train.batch_size=8",
    "--config.train.eval_every=0",
]  # fmt: skip
PPO = [
    "--config", "experiments/ppo_ptx.py", "--config.train.steps=3", "--config.train.log_every=1",
    "--config.train.ckpt_every=1", "--config.ppo.rollout_batch=8", "--config.ppo.minibatch=8",
    "--config.ppo.epochs=1", "--config.ppo.max_new_tokens=8", "--config.train.eval_every=2",
    "--config.ppo.eval_prompts=8", "--config.ppo.ptx_batch=8", "--config.ppo.sample_rows=3",
]  # fmt: skip


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """pretrain -> SFT -> RM, one process: the inputs of the PPO and tool runs."""
    root = tmp_path_factory.mktemp("mp")
    one_process(root / "pretrain", *PRETRAIN)
    one_process(root / "sft", *SFT, "--config.init_from", str(root / "pretrain"))
    one_process(root / "rm", *RM, "--config.init_from", str(root / "sft"))
    return root


def test_ppo_reward_fn_preempted_two_processes_match_one(chain, tmp_path):
    r = tmp_path
    ppo = ["--config.init_from", str(chain / "sft"), "--config.ppo.reward_from", str(chain / "rm")]
    # A reward function instead of the RM's score (the value head still starts from the RM).
    ppo += ["--config.ppo.reward_fn=tests.ppo_rewards:count_apples"]
    one_process(r / "ppo1", *PPO, *ppo)
    # SIGTERM to process 1 only, once the first iteration is logged: both processes agree on a
    # step, checkpoint it and exit 75; the same command (here through launch.local) resumes.
    stopped = sigterm_one_after_first_log(r / "ppo2", *PPO, *ppo)
    assert stopped in (1, 2)
    assert sorted(os.listdir(r / "ppo2" / "checkpoints")) == [str(s) for s in range(1, stopped + 1)]
    out = two_processes(r / "ppo2", *PPO, *ppo)
    assert f"starting at {stopped}" in out
    assert_same_run(r / "ppo1", r / "ppo2")
    m = metrics(r / "ppo2")
    assert (2, "ppo/samples") in m and (2, "eval/score") in m
    assert sorted(os.listdir(r / "ppo2" / "checkpoints")) == ["1", "2", "3"]  # keep_ckpts=3
    info = [json.loads(ln) for ln in (r / "ppo2" / "run_info.jsonl").read_text().splitlines()]
    assert [i["processes"] for i in info] == [2, 2] and info[0]["devices"] == 8
    assert info[0]["config_hash"] == info[1]["config_hash"]


def test_generate_tool_paged_two_processes_matches_static_one(chain, tmp_path):
    """The generate tool through `launch.local --module`, the paged engine's slots and pages
    sharded over 2 processes x 4 devices, writes the 1-process static sampler's records (tokens
    exactly; log-probs within tolerance); 5 prompts x 2 samples pad the last batch.

    The library paths of the generate, score and best_of_k tools (`completions.write_completions`,
    `reward.score_texts`, `best_of_k.best_of_k`) run as 2 processes in test_pipeline.py's twin
    (collection, the evaluation's RM scores, best-of-K and rsft), compared with 1 process there."""
    r, sft = tmp_path, str(chain / "sft")
    prompts = r / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"apple {i}"}) + "\n" for i in range(5)))
    flags = ["--checkpoint", sft, "--prompts", str(prompts), "--max-new-tokens", "8"]
    flags += ["--num-samples", "2", "--temperature", "0.8"]
    module = "rlhf_jax.tools.generate"
    one_process(None, *flags, "--out", str(r / "static1.jsonl"), module=module)
    two_processes(
        None, *flags, "--engine", "paged", "--out", str(r / "paged2.jsonl"), module=module
    )
    static, paged = read_jsonl(r / "static1.jsonl"), read_jsonl(r / "paged2.jsonl")
    assert len(paged) == 10
    assert_same_records(static, paged)
