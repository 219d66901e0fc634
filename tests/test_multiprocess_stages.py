"""Every stage and tool as 2 processes x 4 CPU devices through the real entry, equal to 1 x 8.

Pod slices are always several processes, and a stage that fetches an array spanning processes
(a samples table, a reward function's inputs, an eval) crashes only there. The smallest whole
pipeline (pretraining, SFT with eval samples, the RM with its final normalisation, collection,
PPO and PPO-ptx with samples tables and held-out eval, best-of-K fine-tuning, best-of-K and the
evaluation) runs through `launch.local --processes 2 --devices_per_process 4` and is compared with
the session's 1-process 8-device run (conftest `pipeline_run`): every logged number and sampled
text of every stage, the collected comparisons, the RM's normalisation and the evaluation. On
that run's SFT and reward models: PPO with a reward function, PPO-ptx preempted by SIGTERM and
resumed, and the generate, score and best_of_k tools (`launch.local --module rlhf_jax.tools.NAME`)
compared the same way. Tolerance: rtol 2e-4 on losses, scores and log-probs (a different
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
from tiny_pipeline import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pipeline")]  # the session pipeline run

PPO = [
    "--config", "experiments/ppo_ptx.py", "--config.train.steps=2", "--config.train.log_every=1",
    "--config.train.ckpt_every=1", "--config.ppo.rollout_batch=8", "--config.ppo.minibatch=8",
    "--config.ppo.epochs=1", "--config.ppo.max_new_tokens=8", "--config.ppo.eval_every=2",
    "--config.ppo.eval_prompts=8", "--config.ppo.ptx_batch=8", "--config.ppo.sample_rows=3",
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


def _numbers(obj, where=""):
    """{path: value} of every number in a JSON object, timings left out."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if "time" not in k and "seconds" not in k and "per_sec" not in k:
                out.update(_numbers(v, f"{where}.{k}"))
        return out
    if isinstance(obj, list):
        return {k: v for i, x in enumerate(obj) for k, v in _numbers(x, f"{where}[{i}]").items()}
    return {where: obj} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}


def test_pipeline_two_processes_match_one(pipeline_run, tmp_path):
    """Every stage, collection, best-of-K and evaluation of the pipeline as 2 processes x 4."""
    one_run = pipeline_run
    proc = launch(tmp_path, "--config.rounds=1", processes=2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for sub in ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "rsft", "rsft/round_1/policy"):
        assert_same_run(one_run / sub, tmp_path / sub)
    assert [v for (_, k), v in metrics(tmp_path / "sft").items() if k == "eval/samples"]
    assert (2, "ppo/samples") in metrics(tmp_path / "ppo_ptx")
    norm = [json.loads((d / "rm" / "reward_norm.json").read_text()) for d in (one_run, tmp_path)]
    for k in ("reward_bias", "raw_std"):
        np.testing.assert_allclose(norm[1][k], norm[0][k], rtol=2e-4, atol=1e-6, err_msg=k)
    for name in ("candidates", "selected"):
        assert_same_records(
            read_jsonl(one_run / "rsft" / "round_1" / f"{name}.jsonl"),
            read_jsonl(tmp_path / "rsft" / "round_1" / f"{name}.jsonl"),
        )
    # The sampled comparisons (texts and labels) are exactly those of the 1-process run.
    assert (tmp_path / "comparisons.jsonl").read_text() == (
        one_run / "comparisons.jsonl"
    ).read_text()
    one = json.loads((one_run / "eval.json").read_text())["models"]
    two = json.loads((tmp_path / "eval.json").read_text())["models"]
    assert list(two) == ["pretrained", "sft", "best_of_k", "ppo", "ppo_ptx", "rsft"]
    for name in two:
        a, b = _numbers(one[name]), _numbers(two[name])
        assert a.keys() == b.keys(), name
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=2e-4, atol=1e-5, err_msg=f"{name}{k}")
    assert (tmp_path / "report.md").exists()


def test_ppo_reward_fn_and_preemption_two_processes_match_one(pipeline_run, tmp_path):
    r, src = tmp_path, pipeline_run
    ppo = ["--config.init_from", str(src / "sft"), "--config.ppo.reward_from", str(src / "rm")]
    # A reward function instead of the RM's score (the value head still starts from the RM).
    fn = ["--config.ppo.reward_fn=tests.ppo_rewards:count_apples", "--config.train.steps=1"]
    one_process(r / "fn1", *PPO, *ppo, *fn)
    two_processes(r / "fn2", *PPO, *ppo, *fn)
    assert_same_run(r / "fn1", r / "fn2")

    # PPO-ptx preempted: SIGTERM once the first iteration is logged (launch.local passes it to
    # both processes, as a cluster does), exit 75 with a checkpoint, the same command resumes.
    three = ["--config.train.steps=3"]
    one_process(r / "ppo1", *PPO, *ppo, *three)
    stopped = sigterm_after_first_log(r / "ppo2", *PPO, *ppo, *three)
    assert stopped in (1, 2)
    two_processes(r / "ppo2", *PPO, *ppo, *three)
    assert_same_run(r / "ppo1", r / "ppo2")
    m = metrics(r / "ppo2")
    assert (2, "ppo/samples") in m and (2, "eval/score") in m
    assert sorted(os.listdir(r / "ppo2" / "checkpoints")) == ["1", "2", "3"]  # keep_ckpts=3


def test_tools_two_processes_match_one(pipeline_run, tmp_path):
    r, sft, rm = tmp_path, str(pipeline_run / "sft"), str(pipeline_run / "rm")
    prompts = r / "prompts.jsonl"  # 5 prompts x 2 samples: the last batch is padded
    prompts.write_text("".join(json.dumps({"prompt": f"apple {i}"}) + "\n" for i in range(5)))
    tools = {
        "generate": ["--checkpoint", sft, "--prompts", str(prompts)]
        + ["--max-new-tokens", "8", "--num-samples", "2", "--temperature", "0.8"],
        "score": ["--checkpoint", rm, "--data", str(r / "generate1.jsonl")],
        "best_of_k": ["--policy", sft, "--reward", rm, "--prompts", str(prompts)]
        + ["--k", "2", "--max-new-tokens", "8"],
    }
    for name, flags in tools.items():
        module = f"rlhf_jax.tools.{name}"
        one_process(None, *flags, "--out", str(r / f"{name}1.jsonl"), module=module)
        two_processes(None, *flags, "--out", str(r / f"{name}2.jsonl"), module=module)
        assert_same_records(read_jsonl(r / f"{name}1.jsonl"), read_jsonl(r / f"{name}2.jsonl"))
    assert (
        len(read_jsonl(r / "generate2.jsonl")) == 10 and len(read_jsonl(r / "score2.jsonl")) == 10
    )
