"""The real entry point, as a user calls it: a short run, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest
from cpu_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(workdir, *flags, env_devices=1):
    env = cpu_env(env_devices)
    cmd = [
        sys.executable,
        "-m",
        "launch.run",
        "--config",
        "experiments/pretrain.py",
        "--workdir",
        str(workdir),
        *flags,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


SHORT = [
    "--config.train.steps=6",
    "--config.train.batch_size=4",
    "--config.train.seq_len=32",
    "--config.train.log_every=2",
    "--config.train.ckpt_every=3",
    "--config.train.eval_every=6",
    "--config.train.eval_batches=1",
]


@pytest.mark.slow
def test_short_run_through_entry_point(tmp_path):
    proc = launch(tmp_path, *SHORT, env_devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
    assert any("eval/loss" in r for r in rows)
    assert os.path.isdir(tmp_path / "tb") and os.path.exists(tmp_path / "tokenizer.model")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    # Same command again: finds step 6 done and exits cleanly without training further.
    again = launch(tmp_path, *SHORT, env_devices=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting at step 6" in again.stdout + again.stderr


def error_line(proc):
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[-1]


def test_config_typo_is_one_line(tmp_path):
    line = error_line(launch(tmp_path, "--config.train.stepz=5"))
    assert "stepz" in line


def test_config_wrong_type_is_one_line(tmp_path):
    line = error_line(launch(tmp_path, "--config.train.steps=many"))
    assert "steps" in line and "many" in line


def test_missing_data_file_is_one_line(tmp_path):
    line = error_line(launch(tmp_path, f"--config.data.train={tmp_path}/nope.jsonl"))
    assert "nope.jsonl" in line and line.startswith("error:")


def test_malformed_jsonl_line_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"txt": "oops"}\n')
    line = error_line(launch(tmp_path / "w", f"--config.data.train={bad}"))
    assert "bad.jsonl:3" in line and "'text'" in line
