"""SFT, RM and PPO(-ptx) as 2 processes x 4 CPU devices through the real entry, equal to 1 x 8.

Pod slices are always several processes, and a stage that fetches an array spanning processes
(a samples table, a reward function's inputs, an eval) crashes only there. Each stage here runs
with everything that fetches turned on (SFT eval samples, the RM's final normalisation, PPO's
samples table, held-out eval, a reward function and a checkpoint), once through
`launch.local --processes 2 --devices_per_process 4` and once as one process with 8 devices;
every logged number and sampled text must agree. Tolerance: rtol 2e-4 on losses and scores (a
different reduction order across processes), exact equality on sampled texts.
"""

import json
import os
import subprocess
import sys

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


def one_process(workdir, *flags):
    cmd = [sys.executable, "-m", "launch.run", *flags, "--workdir", str(workdir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with(8), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def two_processes(workdir, *flags):
    cmd = [sys.executable, "-m", "launch.local", "--processes", "2", "--devices_per_process", "4"]
    cmd += ["--", *flags, "--workdir", str(workdir)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with(4), capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


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
    root = tmp_path_factory.mktemp("mp")
    one_process(root / "pretrain", *PRETRAIN)
    return root


def test_sft_rm_ppo_two_processes_match_one(chain):
    r = chain
    sft = ["--config.init_from", str(r / "pretrain")]
    one_process(r / "sft1", *SFT, *sft)
    two_processes(r / "sft2", *SFT, *sft)
    assert_same_run(r / "sft1", r / "sft2")
    texts = [v for (_, k), v in metrics(r / "sft2").items() if k == "eval/samples"]
    assert texts and all("prompt:" in t for t in texts)  # the eval samples were logged

    rm = ["--config.init_from", str(r / "sft1")]
    one_process(r / "rm1", *RM, *rm)
    two_processes(r / "rm2", *RM, *rm)
    assert_same_run(r / "rm1", r / "rm2")
    norm = [json.loads((r / d / "reward_norm.json").read_text()) for d in ("rm1", "rm2")]
    for k in ("reward_bias", "raw_std"):
        np.testing.assert_allclose(norm[1][k], norm[0][k], rtol=2e-4, atol=1e-6, err_msg=k)

    ppo = ["--config.init_from", str(r / "sft1"), "--config.ppo.reward_from", str(r / "rm1")]
    one_process(r / "ppo1", *PPO, *ppo)
    # A reward function instead of the RM's score (the value head still starts from the RM).
    fn = ["--config.ppo.reward_fn=tests.ppo_rewards:count_apples", "--config.train.steps=1"]
    one_process(r / "fn1", *PPO, *ppo, *fn)
    two_processes(r / "fn2", *PPO, *ppo, *fn)
    assert_same_run(r / "fn1", r / "fn2")
    two_processes(r / "ppo2", *PPO, *ppo)
    assert_same_run(r / "ppo1", r / "ppo2")
    m = metrics(r / "ppo2")
    assert (2, "ppo/samples") in m and (2, "eval/score") in m
    assert sorted(os.listdir(r / "ppo2" / "checkpoints")) == ["1", "2"]
