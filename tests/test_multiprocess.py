"""Several cooperating processes through the real entry point: 2 processes x 4 CPU devices.

jax.distributed on localhost with CPU collectives (gloo) runs the same programs a TPU pod slice or
a GPU cluster runs, so these tests check the multi-process paths for real: per-process data
shards, collective checkpoints, the start-up config check and preemption at a common step.
Preemption of one process of two (both save the step they agree on, the rerun resumes there and
equals one process) is tested on PPO-ptx, the stage with the most state, in
test_multiprocess_stages.py.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from cpu_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = [
    "--config",
    "experiments/pretrain.py",
    "--config.train.batch_size=8",
    "--config.train.seq_len=32",
    "--config.train.log_every=1",
    "--config.train.ckpt_every=1000",
    "--config.train.eval_every=0",
]


def env_with(devices: int) -> dict:
    return cpu_env(devices)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_processes(workdir, extra_per_process, port, run=RUN):
    """One `launch.run` process per entry of `extra_per_process` (its own extra flags), joined
    through jax.distributed on localhost:`port`, 4 CPU devices each."""
    procs = []
    for i, extra in enumerate(extra_per_process):
        cmd = [sys.executable, "-m", "launch.run", *run, "--workdir", str(workdir), *extra]
        cmd += [f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env_with(4),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def train_losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def logged_steps(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    try:
        return max(train_losses(workdir), default=0)
    except json.JSONDecodeError:  # a line being written
        return 0


@pytest.mark.slow
def test_processes_with_different_configs_fail_at_start(tmp_path):
    procs = start_processes(
        tmp_path,
        [["--config.train.steps=4"], ["--config.train.steps=4", "--config.train.lr=0.5"]],
        free_port(),
    )
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    for out in outs:
        errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, out[-2000:]
        assert "process 1 loaded a different config than process 0" in errors[0]
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_single_process_sigterm_saves_and_resumes(tmp_path):
    cmd = [sys.executable, "-m", "launch.run", *RUN, "--workdir", str(tmp_path)]
    proc = subprocess.Popen(
        cmd + ["--config.train.steps=100000"],
        cwd=ROOT,
        env=env_with(2),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while logged_steps(tmp_path) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, out[-3000:]
    step = int(re.search(r"preempted at step (\d+)", out).group(1))
    assert os.listdir(tmp_path / "checkpoints") == [str(step)]
    again = subprocess.run(
        cmd + [f"--config.train.steps={step + 2}"],
        cwd=ROOT,
        env=env_with(2),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"starting at step {step}" in again.stdout + again.stderr
    assert max(train_losses(tmp_path)) == step + 2


def test_local_runner_dry_run_prints_one_command_per_process():
    out = subprocess.run(
        [sys.executable, "-m", "launch.local", "--processes=3", "--devices_per_process=2"]
        + ["--port=1234", "--dry-run", "--", "--config", "c.py", "--workdir", "w"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert line.startswith(
            f"JAX_PLATFORMS=cpu PYTHONPATH={ROOT} "
            "XLA_FLAGS=--xla_force_host_platform_device_count=2 "
        )
        assert line.endswith(
            "-m launch.run --config c.py --workdir w --coordinator_address=localhost:1234 "
            f"--num_processes=3 --process_id={i}"
        )
    tool = subprocess.run(
        [sys.executable, "-m", "launch.local", "--processes=2", "--port=1234", "--dry-run"]
        + ["--module", "rlhf_jax.tools.generate", "--", "--checkpoint", "w"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tool.returncode == 0, tool.stderr
    assert (
        tool.stdout.strip()
        .splitlines()[1]
        .endswith(
            "-m rlhf_jax.tools.generate --checkpoint w --coordinator_address=localhost:1234 "
            "--num_processes=2 --process_id=1"
        )
    )
