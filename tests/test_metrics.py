"""Tests for rlhf_jax.infra.metrics: JSONL content, resume truncation, TensorBoard, process 0
only."""

import json
import os
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from rlhf_jax.infra.metrics import MetricsWriter, read_metrics


def _lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _raw_events(workdir):
    """Every Event proto in the event files under <workdir>/tb (TFRecord framing)."""
    events = []
    tb = os.path.join(workdir, "tb")
    for name in os.listdir(tb):
        with open(os.path.join(tb, name), "rb") as f:
            buf = f.read()
        pos = 0
        while pos < len(buf):
            (length,) = struct.unpack("<Q", buf[pos : pos + 8])
            events.append(event_pb2.Event.FromString(buf[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4  # length, its crc, payload, payload crc
    return events


def _tb_events(workdir):
    """(tag, step, scalar or text) for every summary value under <workdir>/tb."""
    out = []
    for event in _raw_events(workdir):
        for v in event.summary.value:
            text = v.tensor.string_val[0].decode() if v.tensor.string_val else None
            out.append((v.tag, event.step, v.simple_value if text is None else text))
    return out


def test_jsonl_lines_are_written_and_flushed_per_call(tmp_path):
    mw = MetricsWriter(str(tmp_path), total_steps=10, progress=False)
    mw.write(1, {"train/loss": jnp.float32(2.5), "train/tokens_per_sec": np.float64(1e4)})
    # readable before close: a killed run keeps what it logged
    (row,) = _lines(tmp_path)
    assert row["step"] == 1 and row["train/loss"] == 2.5 and row["train/tokens_per_sec"] == 1e4
    assert abs(row["time"] - time.time()) < 60
    mw.write(2, {"train/loss": 1.0, "train/count": jnp.int32(7), "eval/acc": np.array([0.5])})
    mw.write(3, {"train/loss": float("nan"), "train/grad_norm": jnp.inf})
    mw.close()
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["train/count"] == 7 and isinstance(rows[1]["train/count"], int)
    assert rows[1]["eval/acc"] == 0.5
    # non-finite values are null (strict JSON), not the non-standard NaN token
    assert rows[2]["train/loss"] is None and rows[2]["train/grad_norm"] is None
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_non_scalar_and_reserved_keys_are_rejected(tmp_path):
    with MetricsWriter(str(tmp_path), total_steps=1, progress=False) as mw:
        with pytest.raises(ValueError, match="'train/logits' has shape \\(2,\\)"):
            mw.write(1, {"train/logits": jnp.zeros(2)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            mw.write(1, {"step": 3})


def test_resume_drops_lines_after_start_step_and_keeps_earlier(tmp_path):
    with MetricsWriter(str(tmp_path), total_steps=100, progress=False) as mw:
        for step in (10, 20, 30, 40):
            mw.write(step, {"train/loss": float(step)})
        mw.write_text(30, "samples/text", "late sample")
    # killed after the checkpoint at step 20; a partial line from the kill ends the file
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "train/lo')
    with MetricsWriter(str(tmp_path), total_steps=100, start_step=20, progress=False) as mw:
        assert [r["step"] for r in _lines(tmp_path)] == [10, 20]
        mw.write(30, {"train/loss": -30.0})
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["train/loss"]) for r in rows] == [(10, 10.0), (20, 20.0), (30, -30.0)]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    # a fresh start (no checkpoint) also drops the lines of the attempt it redoes
    MetricsWriter(str(tmp_path), total_steps=100, progress=False).close()
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == []


def test_tensorboard_scalars_text_and_purge_step(tmp_path):
    with MetricsWriter(str(tmp_path), total_steps=10, progress=False) as mw:
        mw.write(1, {"train/loss": 3.0, "train/note": "warmup"})
        mw.write(2, {"train/loss": 2.0})
        mw.write_text(2, "samples/completions", "the cat sat")
    events = _tb_events(tmp_path)
    assert ("train/loss", 1, 3.0) in events and ("train/loss", 2, 2.0) in events
    assert not [e for e in events if e[0] == "train/note"]  # strings go to JSONL only
    assert any(tag.startswith("samples/completions") and text == "the cat sat"
               for tag, _, text in events)  # fmt: skip
    # write_text also lands in the JSONL
    assert _lines(tmp_path)[-1]["samples/completions"] == "the cat sat"

    with MetricsWriter(str(tmp_path), total_steps=10, start_step=1, progress=False) as mw:
        mw.write(2, {"train/loss": 5.0})
    assert len(os.listdir(tmp_path / "tb")) == 2  # the resumed run adds its own event file
    # ...which opens with the purge marker: TensorBoard hides older events from step 2 on
    starts = [e.step for e in _raw_events(tmp_path) if e.session_log.status == e.session_log.START]
    assert starts == [2]
    assert ("train/loss", 2, 5.0) in _tb_events(tmp_path)


def test_progress_bar_shows_loss_and_throughput(tmp_path, capsys):
    with MetricsWriter(str(tmp_path), total_steps=10, start_step=2, tensorboard=False) as mw:
        mw.write(4, {"train/loss": 1.25, "train/tokens_per_sec": 12345.0})
        mw.log("hello from the loop")
        assert mw._bar.n == 4
    err = capsys.readouterr().err
    assert "hello from the loop" in err
    assert "train/loss=1.25" in err and "train/tok/s=12,345" in err
    assert "/10" in err
    assert not (tmp_path / "tb").exists()


def test_read_metrics_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 1.0}\n\n{"step": 2, "train/loss": \n')
    with pytest.raises(ValueError, match=f"^{path}:3: malformed metrics line"):
        read_metrics(str(path))
    path.write_text('{"step": 1}\n["not", "an", "object"]\n')
    with pytest.raises(ValueError, match=f"^{path}:2: "):
        read_metrics(str(path))


def test_non_zero_process_is_a_no_op(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with MetricsWriter(str(tmp_path / "run"), total_steps=10) as mw:
        mw.write(1, {"train/loss": 1.0})
        mw.write_text(1, "samples/x", "y")
        mw.log("nope")
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().err == ""


def test_non_zero_process_leaves_existing_file_alone(tmp_path, monkeypatch):
    with MetricsWriter(str(tmp_path), total_steps=10, progress=False) as mw:
        mw.write(5, {"train/loss": 1.0})
    monkeypatch.setattr(jax, "process_index", lambda: 3)
    MetricsWriter(str(tmp_path), total_steps=10, start_step=1).close()
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [5]
