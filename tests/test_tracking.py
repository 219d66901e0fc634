"""rlhf_jax.infra.tracking (wandb, config.log.wandb): what an offline run records, read back from
its own files; resume; process 0 only; nothing imported when disabled; nested runs' names.

No test touches the network: wandb runs in offline mode with its directories in tmp. The wandb
tests skip where wandb (the `wandb` extra, part of `test`) is not installed.
"""

import glob
import json
import os
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from cpu_env import cpu_env
from test_loop_hooks import setup_for

from experiments import pretrain
from rlhf_jax.infra import metrics, preemption, tracking
from rlhf_jax.stages import loop, pipeline, ppo, samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = (
    "error: config.log.wandb.mode='offline' needs the wandb package, which is not installed: "
    "pip install -e '.[wandb]' (or leave config.log.wandb.mode='disabled')"
)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb importable, offline, its settings, cache and data directories in tmp."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for name in ("CONFIG", "CACHE", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / f"wandb_{name.lower()}"))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return wandb


def offline_config(**wandb):
    c = pretrain.get_config()
    c.log.wandb.update(dict(mode="offline", **wandb))
    return c


def read_run(run_dir):
    """(run record, history rows by step) of a finished offline run, from its `run-<id>.wandb`.

    wandb's service writes the file after `finish` returns (an offline run's last records are
    flushed asynchronously), so this waits for the run's `exit` record, for up to 30 s.
    """
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    deadline = time.time() + 30
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() > deadline:
            break
        time.sleep(0.2)
    run, history = None, {}
    for rec in records:
        if rec.WhichOneof("record_type") == "run":
            run = rec.run
        elif rec.WhichOneof("record_type") == "history":
            history[rec.history.step.num] = {
                item.key or ".".join(item.nested_key): json.loads(item.value_json)
                for item in rec.history.item
            }
    return run, history


def wandb_records(path):
    """The `Record` protobufs of a `.wandb` file: a LevelDB-style log (the 7-byte `:W&B`
    header, then 32 KiB blocks of chunks framed as crc32 [4], length [2], type [1]: 1 full,
    2 first, 3 middle, 4 last). wandb 0.31 no longer ships a Python reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        buf = f.read()
    assert buf[:4] == b":W&B"
    pos, chunks = 7, []
    while pos + 7 <= len(buf):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos : pos + 7])
        if kind == 0 or pos + 7 + n > len(buf):  # zero padding, or a chunk still being written
            return
        chunks.append(buf[pos + 7 : pos + 7 + n])
        pos += 7 + n
        if kind in (1, 4):
            yield pb.Record.FromString(b"".join(chunks))
            chunks = []


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_dirs(workdir):
    return sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))


def test_disabled_imports_no_wandb_and_a_missing_wandb_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now fails
    c = pretrain.get_config()
    assert c.log.wandb.mode == "disabled"
    tracking.check(c)
    assert tracking.start(c, str(tmp_path)) is None
    with metrics.MetricsWriter(str(tmp_path), total_steps=1, progress=False) as mw:
        mw.write(1, {"train/loss": 1.0})
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "tb"]
    c.log.wandb.mode = "offline"
    with pytest.raises(ValueError) as e:
        tracking.check(c)
    assert f"error: {e.value}" == MISSING
    c.log.wandb.mode = "offlin"
    with pytest.raises(ValueError, match=r"unknown config.log.wandb.mode: 'offlin'; expected"):
        tracking.check(c)


def test_missing_wandb_stops_the_entry_before_any_work(tmp_path):
    shim = tmp_path / "shim" / "wandb"
    shim.mkdir(parents=True)  # a `wandb` package that fails to import, as if not installed
    (shim / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    env = cpu_env(1)
    env["PYTHONPATH"] = os.pathsep.join([str(shim.parent), env.get("PYTHONPATH", "")])
    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.run", "--config", "experiments/pretrain.py",
           "--workdir", str(work), "--config.log.wandb.mode=offline"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == MISSING
    assert "Traceback" not in proc.stderr and not work.exists()  # nothing started


def test_other_processes_start_no_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # process 0 alone may import it
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert tracking.start(offline_config(), str(tmp_path)) is None
    mw = metrics.MetricsWriter(str(tmp_path), total_steps=1, progress=False)
    mw.write(1, {"train/loss": 1.0})
    mw.write_text(1, "ppo/samples", "[+1.000] 'a' -> 'b'")
    mw.close()
    assert os.listdir(tmp_path) == []


class FakeRun:
    def __init__(self, step=0):
        self.step, self.logged, self.ended = step, [], []

    def log(self, row, step=None):
        self.logged.append((step, row))

    def mark_preempting(self):
        self.ended.append("preempting")

    def finish(self, exit_code):
        self.ended.append(exit_code)


def test_a_run_ends_finished_failed_or_preempting(tmp_path):
    def train(mw, error):
        try:  # as loop.train closes its writer: in a `finally`, with the error in flight
            if error is not None:
                raise error
        finally:
            mw.close()

    ends = []
    for error in (None, FloatingPointError("nan"), preemption.Preempted(4, "pretrain")):
        run = FakeRun()
        tracker = tracking.Tracker(run, wandb=None)
        mw = metrics.MetricsWriter(str(tmp_path), total_steps=1, progress=False, tracker=tracker)
        if error is None:
            train(mw, error)
        else:
            with pytest.raises(type(error)):
                train(mw, error)
        ends.append(run.ended)
    assert ends == [[0], [1], ["preempting", preemption.EXIT_CODE]]


def test_resumed_run_skips_the_steps_it_already_holds():
    # A resumed online run continues at its last step + 1; the restarted run's first log steps
    # (after its checkpoint, logged before the kill) are skipped, not refused by wandb.
    run = FakeRun(step=6)
    t = tracking.Tracker(run, wandb=None)
    for step in (5, 6, 7):
        t.log(step, {"train/loss": float(step)})
    t.log(None, {"report/x": 1})
    assert run.logged == [
        (6, {"train/loss": 6.0}),
        (7, {"train/loss": 7.0}),
        (None, {"report/x": 1}),
    ]


def test_offline_run_holds_the_config_every_jsonl_metric_and_the_samples(tmp_path, wandb_env):
    work = tmp_path / "w"
    text = "[+0.500] 'a -> b' -> 'c'\n[-1.250] \"it's\" -> ''"

    def run(steps):
        s, state, start, ckpt, _, _ = setup_for(work, steps=steps)
        s.config.log.wandb.update(mode="offline", project="p", group="g")
        s.config.train.log_every = 1
        s.after_step = lambda n, m, is_log, writer: writer.write_text(n, "ppo/samples", text)
        loop.train(s, state, start, ckpt)
        return s.config

    config = run(steps=2)
    (first,) = run_dirs(work)
    run_id = json.loads((work / tracking.RUN_FILE).read_text())["id"]
    assert first.endswith(f"-{run_id}")
    record, history = read_run(first)
    assert (record.run_id, record.project, record.run_group) == (run_id, "p", "g")
    assert (record.display_name, record.job_type) == ("w", "pretrain")
    cfg = {u.key: json.loads(u.value_json) for u in record.config.update}
    assert cfg["train.lr"] == config.train.lr and cfg["train.log_every"] == 1
    assert cfg["log.wandb.mode"] == "offline" and cfg["model.size"] == config.model.size
    rows = metrics.read_metrics(str(work / "metrics.jsonl"))
    assert [r["step"] for r in rows if "ppo/loss" in r] == [1, 2]
    for row in rows:
        for key, value in row.items():
            if key not in ("step", "time", "ppo/samples"):
                assert history[row["step"]][key] == pytest.approx(value), (row["step"], key)
    # The samples text as a table at each logged step, columns parsed from PPO's layout.
    for step in (1, 2):
        assert history[step]["ppo/samples._type"] == "table-file"
        table = read_json(os.path.join(first, "files", history[step]["ppo/samples.path"]))
        assert table["columns"] == ["score", "prompt", "response"]
        assert table["data"] == [[0.5, "a -> b", "c"], [-1.25, "it's", ""]]

    # Started again to step 4: the same wandb run (id), resumed, its curve continued at step 3.
    run(steps=4)
    second = [d for d in run_dirs(work) if d != first]
    assert len(second) == 1 and second[0].endswith(f"-{run_id}")
    record, history = read_run(second[0])
    assert record.run_id == run_id and record.resume
    rows = metrics.read_metrics(str(work / "metrics.jsonl"))
    assert (
        sorted(history) == [3, 4] == [r["step"] for r in rows if r["step"] > 2 and "ppo/loss" in r]
    )
    assert history[4]["ppo/loss"] == rows[-1]["ppo/loss"]


def test_pipeline_runs_nest_and_the_report_logs_its_plots(tmp_path, monkeypatch, wandb_env):
    parent = pretrain.get_config()
    parent.log.wandb.mode = "offline"
    child = pretrain.get_config()
    tracking.nest(child, parent, str(tmp_path / "pipe"), str(tmp_path / "pipe" / "round_2" / "rm"))
    assert (child.log.wandb.mode, child.log.wandb.name) == ("offline", "pipe/round_2/rm")
    assert child.log.wandb.group == "pipe"
    parent.log.wandb.update(name="exp", group="sweep")
    tracking.nest(child, parent, str(tmp_path / "pipe"), str(tmp_path / "pipe" / "sft"))
    assert (child.log.wandb.name, child.log.wandb.group) == ("exp/sft", "sweep")

    work = tmp_path / "pipe"
    work.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    fig.savefig(work / "report_lm_loss.png")
    plt.close(fig)
    models = {"sft": {"gold_score": 0.25, "method": "sft", "label": "SFT"}}
    (work / "eval.json").write_text(json.dumps({"models": models}))
    config = pretrain.get_config()
    config.stage = "pipeline"
    config.log.wandb.mode = "offline"
    pipeline.track_report(config, str(work))
    (run_dir,) = glob.glob(str(tmp_path / "wandb_dir" / "wandb" / "offline-run-*"))
    record, history = read_run(run_dir)
    assert (record.display_name, record.run_group, record.job_type) == ("pipe", "pipe", "pipeline")
    (row,) = history.values()
    assert row["report/lm_loss._type"] == "image-file"
    table = read_json(os.path.join(run_dir, "files", row["report/results.path"]))
    assert table["columns"][:3] == ["model", "label", "gold_score"]
    assert table["data"][0][:3] == ["sft", "SFT", 0.25]


class CharTok:
    """Token ids are character codes; 0 is EOS."""

    eos_ids = (0,)

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_samples_texts_become_table_columns():
    prompts, responses = ["Q: 1 -> 2?", "it's"], ["' -> '", ""]
    p = max(map(len, prompts))
    tokens = np.zeros((2, p + 8), np.int32)
    pm, rm = np.zeros_like(tokens, bool)[:, :p], np.zeros((2, 8), bool)
    for i, (q, a) in enumerate(zip(prompts, responses, strict=True)):
        tokens[i, p - len(q) : p] = [ord(ch) for ch in q]  # left-padded prompt
        pm[i, p - len(q) :] = True
        tokens[i, p : p + len(a)] = [ord(ch) for ch in a]
        rm[i, : len(a) + 1] = True  # the response and its EOS
    roll = {"tokens": tokens, "prompt_mask": pm, "response_mask": rm}
    c = type("C", (), {"sample_rows": 2, "prompt_len": p})
    text = ppo.sample_table(CharTok(), roll, np.array([0.5, -2.0], np.float32), c)
    cols, rows = tracking.text_table(text)
    assert cols == ["score", "prompt", "response"]
    assert rows == [[0.5, prompts[0], responses[0]], [-2.0, prompts[1], responses[1]]]

    demos = [{"prompt": "a?", "response": "b"}, {"prompt": "c\nd", "response": "e"}]
    text = samples.format_samples(7, demos, ["x [no EOS]", "y"], [True, False])
    cols, rows = tracking.text_table(text)
    assert cols == ["prompt", "sample", "finished", "reference"]
    assert rows == [["a?", "x [no EOS]", True, "b"], ["c\nd", "y", False, "e"]]

    assert tracking.text_table("free text\n\nsecond line") == (
        ["text"],
        [["free text"], ["second line"]],
    )
