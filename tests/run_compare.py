"""Running a stage or tool as 1 process x 8 devices and as 2 processes x 4 (launch.local), and
comparing what the two wrote: every logged number and text, and output JSONL records.

Tolerance: rtol 2e-4 on losses, scores and log-probs (a different reduction order across
processes), exact equality on sampled texts and counts.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
from test_multiprocess import env_with, free_port, start_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_process(workdir, *flags, module="launch.run"):
    cmd = [sys.executable, "-m", module, *flags]
    cmd += ["--workdir", str(workdir)] if workdir is not None else []
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with(8), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def two_processes(workdir, *flags, module="launch.run") -> str:
    """Runs 2 processes x 4 devices through launch.local; -> their output."""
    cmd = [sys.executable, "-m", "launch.local", "--processes", "2", "--devices_per_process", "4"]
    cmd += ["--module", module, "--", *flags]
    cmd += ["--workdir", str(workdir)] if workdir is not None else []
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with(4), capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def sigterm_one_after_first_log(workdir, *flags) -> int:
    """Starts 2 processes (jax.distributed on localhost) and, once the first step is logged,
    SIGTERMs process 1 only, as a cluster that preempts one host does: both must agree on a
    step, save it and exit 75. -> the step they saved."""
    procs = start_processes(workdir, [[], []], free_port(), run=list(flags))
    log = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while procs[0].poll() is None and time.time() < deadline:
        if os.path.exists(log) and os.path.getsize(log) > 0:
            break
        time.sleep(0.2)
    assert procs[0].poll() is None, procs[0].communicate()[0][-3000:]
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], (outs[0][-2000:], outs[1][-2000:])
    saved = [re.findall(r"preempted at step (\d+)", out) for out in outs]
    assert len(saved[0]) == len(saved[1]) == 1 and saved[0] == saved[1], outs
    return int(saved[0][0])


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


def numbers(obj, where=""):
    """{path: value} of every number in a JSON object, timings left out."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if "time" not in k and "seconds" not in k and "per_sec" not in k:
                out.update(numbers(v, f"{where}.{k}"))
        return out
    if isinstance(obj, list):
        return {k: v for i, x in enumerate(obj) for k, v in numbers(x, f"{where}[{i}]").items()}
    return {where: obj} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else {}
