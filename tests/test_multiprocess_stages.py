"""Every stage and tool as 2 processes x 4 CPU devices through the real entry, equal to 1 x 8.

Pod slices are always several processes, and a stage that fetches an array spanning processes
(a samples table, a reward function's inputs, an eval) crashes only there. Each stage here runs
with everything that fetches turned on (SFT eval samples, the RM's final normalisation, PPO's
samples table, held-out eval, a reward function and a checkpoint), once through
`launch.local --processes 2 --devices_per_process 4` and once as one process with 8 devices;
every logged number and sampled text must agree. Best-of-K fine-tuning (rsft) and the generate,
score and best_of_k tools (`launch.local --module rlhf_jax.tools.NAME`) are compared the same way
on their output files. Tolerance: rtol 2e-4 on losses, scores and log-probs (a different
reduction order across processes), exact equality on sampled texts.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_multiprocess import env_with

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow

PRETRAIN = [
    "--config",
    "experiments/pretrain.py",
    "--config.train.steps=20",
    "--config.train.batch_size=8",
    "--config.train.seq_len=32",
    "--config.train.eval_every=0",
]
SFT = [
    "--config",
    "experiments/sft.py",
    "--config.train.epochs=0.0",
    "--config.train.steps=4",
    "--config.train.batch_size=8",
    "--config.train.log_every=2",
    "--config.train.eval_every=4",
    "--config.train.eval_batches=1",
    "--config.sft.eval_samples=3",
    "--config.sft.max_new_tokens=8",
]
RM = [
    "--config",
    "experiments/rm.py",
    "--config.train.steps=4",
    "--config.train.batch_size=8",
    "--config.train.log_every=2",
    "--config.train.eval_every=4",
    "--config.train.eval_batches=1",
]
PPO = [
    "--config", "experiments/ppo_ptx.py", "--config.train.steps=2", "--config.train.log_every=1",
    "--config.train.ckpt_every=1", "--config.ppo.rollout_batch=8", "--config.ppo.minibatch=8",
    "--config.ppo.epochs=1", "--config.ppo.max_new_tokens=8", "--config.ppo.eval_every=2",
    "--config.ppo.eval_prompts=8", "--config.ppo.ptx_batch=8", "--config.ppo.sample_rows=3",
]  # fmt: skip


RSFT = [
    "--config", "experiments/rsft.py", "--config.rsft.rounds=1",
    "--config.rsft.prompts_per_round=8", "--config.rsft.k=2", "--config.rsft.max_new_tokens=8",
    "--config.rsft.finished_only=False",
    "--config.train.batch_size=8", "--config.train.epochs=1.0",
]  # fmt: skip


def one_process(workdir, *flags, module="launch.run"):
    cmd = [sys.executable, "-m", module, *flags]
    cmd += ["--workdir", str(workdir)] if workdir is not None else []
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with(8), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def two_processes(workdir, *flags, module="launch.run"):
    cmd = [sys.executable, "-m", "launch.local", "--processes", "2", "--devices_per_process", "4"]
    cmd += ["--module", module, "--", *flags]
    cmd += ["--workdir", str(workdir)] if workdir is not None else []
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with(4), capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def sigterm_after_first_log(workdir, *flags) -> int:
    """Starts 2 processes, SIGTERMs them after the first logged step; -> the step they saved."""
    cmd = [sys.executable, "-m", "launch.local", "--processes", "2", "--devices_per_process", "4"]
    cmd += ["--", *flags, "--workdir", str(workdir)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env_with(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    log = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(log) and os.path.getsize(log) > 0:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, out[-4000:]
    saved = re.findall(r"preempted at step (\d+)", out)
    assert len(saved) == 2 and saved[0] == saved[1], out[-4000:]
    return int(saved[0])


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def assert_same_records(one: list[dict], two: list[dict]):
    """Texts, flags and counts exactly equal; floats (scores, log-probs) within rtol 2e-4."""
    assert len(one) == len(two) > 0

    def walk(a, b, where):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for k in a:
                walk(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, list):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{where}[{i}]")
        elif isinstance(a, float):
            np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-5, err_msg=where)
        else:
            assert a == b, where

    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        walk(a, b, f"line {i + 1}")


def metrics(workdir) -> dict:
    """{(step, key): value} of every logged number and text, without timings."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            for k, v in row.items():
                timing = k == "time" or k.startswith("time/") or "_time" in k or "per_sec" in k
                if k != "step" and not timing and "mfu" not in k and "mem" not in k:
                    out[(row["step"], k)] = v
    return out


def assert_same_run(one, two):
    a, b = metrics(one), metrics(two)
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], str):
            assert a[key] == b[key], key
        elif isinstance(a[key], (int, float)):
            np.testing.assert_allclose(b[key], a[key], rtol=2e-4, atol=1e-5, err_msg=str(key))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """pretrain -> sft1 -> rm1 as one process: the inputs of every later stage and tool."""
    root = tmp_path_factory.mktemp("mp")
    one_process(root / "pretrain", *PRETRAIN)
    one_process(root / "sft1", *SFT, "--config.init_from", str(root / "pretrain"))
    one_process(root / "rm1", *RM, "--config.init_from", str(root / "sft1"))
    return root


def test_sft_rm_ppo_two_processes_match_one(chain):
    r = chain
    sft = ["--config.init_from", str(r / "pretrain")]
    two_processes(r / "sft2", *SFT, *sft)
    assert_same_run(r / "sft1", r / "sft2")
    texts = [v for (_, k), v in metrics(r / "sft2").items() if k == "eval/samples"]
    assert texts and all("prompt:" in t for t in texts)  # the eval samples were logged

    rm = ["--config.init_from", str(r / "sft1")]
    two_processes(r / "rm2", *RM, *rm)
    assert_same_run(r / "rm1", r / "rm2")
    norm = [json.loads((r / d / "reward_norm.json").read_text()) for d in ("rm1", "rm2")]
    for k in ("reward_bias", "raw_std"):
        np.testing.assert_allclose(norm[1][k], norm[0][k], rtol=2e-4, atol=1e-6, err_msg=k)

    ppo = ["--config.init_from", str(r / "sft1"), "--config.ppo.reward_from", str(r / "rm1")]
    three = ["--config.train.steps=3"]
    one_process(r / "ppo1", *PPO, *ppo, *three)
    # A reward function instead of the RM's score (the value head still starts from the RM).
    fn = ["--config.ppo.reward_fn=tests.ppo_rewards:count_apples", "--config.train.steps=1"]
    one_process(r / "fn1", *PPO, *ppo, *fn)
    two_processes(r / "fn2", *PPO, *ppo, *fn)
    assert_same_run(r / "fn1", r / "fn2")
    # PPO-ptx preempted: SIGTERM once the first iteration is logged (launch.local passes it to
    # both processes, as a cluster does), exit 75 with a checkpoint, the same command resumes.
    stopped = sigterm_after_first_log(r / "ppo2", *PPO, *ppo, *three)
    assert stopped in (1, 2)
    two_processes(r / "ppo2", *PPO, *ppo, *three)
    assert_same_run(r / "ppo1", r / "ppo2")
    m = metrics(r / "ppo2")
    assert (2, "ppo/samples") in m and (2, "eval/score") in m
    assert sorted(os.listdir(r / "ppo2" / "checkpoints")) == ["1", "2", "3"]  # keep_ckpts=3


def test_rsft_and_tools_two_processes_match_one(chain):
    r = chain
    rsft = ["--config.init_from", str(r / "sft1"), "--config.rsft.reward_from", str(r / "rm1")]
    one_process(r / "rsft1", *RSFT, *rsft)
    two_processes(r / "rsft2", *RSFT, *rsft)
    assert_same_run(r / "rsft1", r / "rsft2")
    for name in ("candidates", "selected"):
        assert_same_records(
            read_jsonl(r / "rsft1" / "round_1" / f"{name}.jsonl"),
            read_jsonl(r / "rsft2" / "round_1" / f"{name}.jsonl"),
        )

    prompts = r / "prompts.jsonl"  # 5 prompts x 2 samples: the last batch is padded
    prompts.write_text("".join(json.dumps({"prompt": f"apple {i}"}) + "\n" for i in range(5)))
    tools = {
        "generate": ["--checkpoint", str(r / "sft1"), "--prompts", str(prompts)]
        + ["--max-new-tokens", "8", "--num-samples", "2", "--temperature", "0.8"],
        "score": ["--checkpoint", str(r / "rm1"), "--data", str(r / "generate1.jsonl")],
        "best_of_k": ["--policy", str(r / "sft1"), "--reward", str(r / "rm1")]
        + ["--prompts", str(prompts), "--k", "2", "--max-new-tokens", "8"],
    }
    for name, flags in tools.items():
        module = f"rlhf_jax.tools.{name}"
        one_process(None, *flags, "--out", str(r / f"{name}1.jsonl"), module=module)
        two_processes(None, *flags, "--out", str(r / f"{name}2.jsonl"), module=module)
        one, two = read_jsonl(r / f"{name}1.jsonl"), read_jsonl(r / f"{name}2.jsonl")
        assert_same_records(one, two)
    assert (
        len(read_jsonl(r / "generate2.jsonl")) == 10 and len(read_jsonl(r / "score2.jsonl")) == 10
    )
