"""The generate command on a checkpoint written by the real LM stage: output lines, determinism
independent of batch size and device count, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from cpu_env import cpu_env

from experiments import pretrain
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.stages import lm
from rlhf_jax.tools import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Once upon a time", "The cat sat on the", "Zoë asked: ¿qué?"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 2-step pretraining run of the tiny model: a real checkpoint, meta and tokenizer."""
    wd = tmp_path_factory.mktemp("pretrain")
    c = pretrain.get_config()
    c.train.update(steps=2, batch_size=4, seq_len=32, warmup_steps=1, log_every=1, ckpt_every=2)
    c.train.eval_every = 0
    c.data.cache = False
    c.mesh.ici.data = 1
    lm.run(c, mesh_lib.build_mesh(c.mesh, jax.devices()[:1]), str(wd))
    return str(wd)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    lines = [json.dumps({"prompt": p}, ensure_ascii=False) for p in PROMPTS]
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    return str(path)


def cli(*args, devices=2):
    env = cpu_env(devices)
    cmd = [sys.executable, "-m", "rlhf_jax.tools.generate", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


SAMPLING = ["--max-new-tokens", "12", "--num-samples", "2", "--seed", "3", "--top-k", "50"]


@pytest.mark.slow
def test_generate_command_writes_one_line_per_completion(workdir, prompts_file, tmp_path):
    out = tmp_path / "sub" / "out.jsonl"
    proc = cli(
        "--checkpoint",
        workdir,
        "--prompts",
        prompts_file,
        "--out",
        out,
        "--batch-size",
        "4",
        *SAMPLING,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote 6 completions of 3 prompts to {out}: mean length" in proc.stdout
    rows = read(out)
    assert [(r["prompt"], r["sample"]) for r in rows] == [(p, s) for p in PROMPTS for s in (0, 1)]
    for r in rows:
        assert set(r) == {"prompt", "response", "tokens", "finished", "sample", "logprob"}
        assert isinstance(r["response"], str) and 1 <= r["tokens"] <= 12
        assert r["finished"] or r["tokens"] == 12
        assert r["logprob"] < 0
    assert len({r["response"] for r in rows}) > 1  # different samples, not one repeated row
    assert not [f for f in os.listdir(out.parent) if f.startswith(".tmp-")]

    # Same seed, another batch size and 8 devices (in-process): the same completions.
    again = tmp_path / "again.jsonl"
    generate.main(
        [
            "--checkpoint",
            workdir,
            "--prompts",
            prompts_file,
            "--out",
            str(again),
            "--batch-size",
            "3",
            *SAMPLING,
        ]
    )
    again = read(again)
    assert [{**r, "logprob": 0} for r in again] == [{**r, "logprob": 0} for r in rows]
    assert all(abs(a["logprob"] - r["logprob"]) < 1e-3 for a, r in zip(again, rows, strict=True))


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main([str(a) for a in argv])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def test_bad_input_is_one_line_error(workdir, prompts_file, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    proc = cli("--checkpoint", workdir, "--prompts", missing, "--out", tmp_path / "o.jsonl")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: prompts file {missing} does not exist"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    line = error_of(["--checkpoint", workdir, "--prompts", bad, "--out", tmp_path / "o"], capsys)
    assert line == f"error: {bad}:2: field 'prompt' is missing"

    line = error_of(
        ["--checkpoint", tmp_path / "none", "--prompts", prompts_file, "--out", "o"], capsys
    )
    assert line.startswith("error: checkpoint directory") and "does not exist" in line

    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "short"}\n' + json.dumps({"prompt": "word " * 400}) + "\n")
    line = error_of(["--checkpoint", workdir, "--prompts", long, "--out", tmp_path / "o"], capsys)
    assert line.startswith(f"error: {long}:2: prompt is") and "room for 128" in line
    assert not os.path.exists(tmp_path / "o")


def test_keep_loaded_restores_each_checkpoint_once_and_only_inside_the_block(workdir, monkeypatch):
    from rlhf_jax.infra import restore
    from rlhf_jax.sampling import load

    reads = []
    real = restore.restore_params
    monkeypatch.setattr(
        restore, "restore_params", lambda *a, **k: reads.append(a[0]) or real(*a, **k)
    )
    mesh = mesh_lib.build_mesh(pretrain.get_config().mesh, jax.devices()[:1])
    with load.keep_loaded(1):
        first = load.load_model(workdir, mesh)
        again = load.load_model(workdir, mesh)
        assert again[1] is first[1] and len(reads) == 1  # the same arrays, not read again
        step2 = load.load_model(workdir, mesh, step=2)  # the latest step: the same key
        assert step2[1] is first[1] and len(reads) == 1
        other_mesh = mesh_lib.build_mesh(pretrain.get_config().mesh, jax.devices()[1:2])
        moved = load.load_model(workdir, other_mesh)  # another placement: read, and the
        assert len(reads) == 2 and moved[1] is not first[1]  # first model evicted (n = 1)
        load.load_model(workdir, mesh)
        assert len(reads) == 3
    outside = load.load_model(workdir, mesh)
    assert len(reads) == 4 and outside[1] is not first[1]
    for a, b in zip(jax.tree.leaves(first[1]), jax.tree.leaves(outside[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
