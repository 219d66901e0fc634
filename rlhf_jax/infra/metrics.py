"""Run metrics: `<workdir>/metrics.jsonl`, TensorBoard events, and a progress bar.

Owns what a run reports while it trains. Only process 0 writes or prints; on every other process
each method is a no-op, so stage code calls the writer unconditionally.

`metrics.jsonl` holds one JSON object per `write` / `write_text` call::

    {"step": 100, "time": 1718000000.5, "train/loss": 2.31, "train/tokens_per_sec": 51234.0}

Keys are slash-namespaced (`train/loss`, `eval/loss`, `ppo/kl`). A non-finite float (NaN, inf)
is written as `null` so every line stays strict JSON that any reader (jq, pandas, a browser)
accepts; `read_metrics` returns it as None. Each line is flushed as soon as it is written, so a
killed run keeps everything it logged.

Resuming from a checkpoint at `start_step` drops the lines a killed run logged after that step
(they are about to be logged again), and TensorBoard hides them through `purge_step`.

With a `tracker` (tracking.py: a wandb run, `config.log.wandb`), every row and text goes there
too, at the same step.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tqdm


def _import_summary_writer():
    """tensorboardX's SummaryWriter, without its optional `import torch` (seconds per process
    start where torch is installed; we only log floats and arrays). Torch stays importable."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes tensorboardX's `import torch` an ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


SummaryWriter = _import_summary_writer()

METRICS_FILE = "metrics.jsonl"
TB_SUBDIR = "tb"
_RESERVED = ("step", "time")
_WRITER_IDS = itertools.count()


class MetricsWriter:
    """Writes scalar metrics and text to JSONL and TensorBoard, and drives a progress bar.

    Example:
        with MetricsWriter(workdir, total_steps=cfg.steps, start_step=start) as mw:
            for step in range(start + 1, cfg.steps + 1):
                ...
                mw.write(step, {"train/loss": loss, "train/tokens_per_sec": tps})
    """

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        start_step: int = 0,
        desc: str = "train",
        tensorboard: bool = True,
        progress: bool = True,
        tracker=None,
    ):
        """Opens the metrics outputs of a run, truncating what a killed run logged past resume.

        Args:
            workdir: the run's workdir; gets `metrics.jsonl` and `tb/`.
            total_steps: the step the run ends at (the progress bar's total).
            start_step: the step the run resumes from (the restored checkpoint's step, 0 for a
                fresh run). Logged lines with a larger step are dropped.
            desc: progress-bar label.
            tensorboard: also write TensorBoard event files.
            progress: show a tqdm progress bar on stderr.
            tracker: a `tracking.Tracker` (wandb) that gets every row and text too, or None;
                finished by `close`.
        """
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self._file = None
        self._tb = None
        self._bar = None
        self._postfix: dict[str, str] = {}
        self._tracker = tracker if self.active else None
        if not self.active:
            return

        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            _truncate_after(self.path, start_step)
        # Line-buffered append: each write() below is one whole line, flushed at once.
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

        if tensorboard:
            tb_dir = os.path.join(workdir, TB_SUBDIR)
            # TensorBoard hides events with step >= purge_step from earlier event files, i.e.
            # what a killed run logged past the checkpoint we resume from.
            purge = start_step + 1 if os.path.isdir(tb_dir) else None
            # Event files are named by the second and host; pid and a counter keep a quick
            # restart (or a second writer in this process) from clobbering an earlier file.
            suffix = f".{os.getpid()}.{next(_WRITER_IDS)}"
            self._tb = SummaryWriter(
                logdir=tb_dir, purge_step=purge, flush_secs=30, filename_suffix=suffix
            )

        if progress:
            tty = sys.stderr.isatty()
            self._bar = tqdm.tqdm(
                total=total_steps,
                initial=start_step,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                # In a log file every refresh is a new line; keep those few.
                mininterval=0.1 if tty else 30.0,
                file=sys.stderr,
            )

    def write(self, step: int, metrics: Mapping[str, Any]):
        """Logs scalar metrics for `step` to JSONL, TensorBoard and the progress bar.

        Args:
            step: the training step these metrics belong to.
            metrics: slash-namespaced key -> scalar (Python, numpy or jax; jax values are
                fetched in one device_get) or string (JSONL only).

        Raises:
            ValueError: a value is not a scalar, or a key is `step` or `time`.
        """
        if not self.active:
            return
        metrics = jax.device_get(dict(metrics))
        row = {key: _to_json_value(key, value) for key, value in metrics.items()}
        self._append(step, row)
        if self._tracker is not None:  # non-finite values as they are (wandb charts NaN as gaps)
            self._tracker.log(
                step, {k: _raw(metrics[k]) if v is None else v for k, v in row.items()}
            )
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=step)
                elif value is None:  # non-finite: TensorBoard shows NaN/inf faithfully
                    self._tb.add_scalar(key, _raw(metrics[key]), global_step=step)
        if self._bar is not None:
            for key, value in row.items():
                if key.endswith("/loss") and isinstance(value, (int, float)):
                    self._postfix[key] = f"{value:.4g}"
                elif key.endswith("/loss") and value is None:
                    self._postfix[key] = "nan"
                elif key.endswith("/tokens_per_sec") and isinstance(value, (int, float)):
                    self._postfix[key.replace("tokens_per_sec", "tok/s")] = f"{value:,.0f}"
            self._advance(step)

    def write_text(self, step: int, key: str, text: str):
        """Logs a text (e.g. sampled completions) to TensorBoard and as a JSONL line.

        Args:
            step: the training step.
            key: slash-namespaced name, e.g. `samples/completions`.
            text: the text; TensorBoard renders it as markdown.
        """
        if not self.active:
            return
        if key in _RESERVED:
            raise ValueError(f"metric key {key!r} is reserved; use a namespaced key")
        self._append(step, {key: str(text)})
        if self._tracker is not None:
            self._tracker.log_text(step, key, str(text))
        if self._tb is not None:
            self._tb.add_text(key, str(text), global_step=step)

    def log(self, msg: str):
        """Prints a line on stderr without breaking the progress bar.

        Args:
            msg: the message.
        """
        if not self.active:
            return
        if self._bar is not None:
            tqdm.tqdm.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def flush(self):
        """Pushes buffered TensorBoard events to disk (JSONL is always flushed)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        """Flushes and closes every output. Idempotent."""
        if self._tracker is not None:
            # Called from the loop's `finally`: an exception in flight (NaN stop, preemption,
            # bug) marks the wandb run failed or preempting rather than finished.
            self._tracker.finish(sys.exc_info()[1])
            self._tracker = None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc):
        self.close()

    def _append(self, step: int, row: dict[str, Any]):
        line = json.dumps({"step": int(step), "time": time.time(), **row}, allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()

    def _advance(self, step: int):
        if self._postfix:
            self._bar.set_postfix(self._postfix, refresh=False)
        # update() rather than setting n keeps tqdm's rate (and so the ETA) right.
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        else:
            self._bar.refresh()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Reads a metrics.jsonl file.

    Args:
        path: the file (normally `<workdir>/metrics.jsonl`).

    Returns:
        One dict per line, in file order; non-finite values read back as None.

    Raises:
        ValueError: a line is not a JSON object with an integer `step` (names file:line).
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                rows.append(_parse_line(path, lineno, line))
    return rows


def _parse_line(path: str, lineno: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: malformed metrics line: {e.msg}") from None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int):
        raise ValueError(f"{path}:{lineno}: metrics line is not an object with an integer step")
    return row


def _truncate_after(path: str, start_step: int):
    """Atomically drops the lines logged after `start_step` by a run that is being redone."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if lineno == len(lines) and not line.endswith("\n"):
            # A process killed inside write() leaves a partial last line; it is not data.
            try:
                row = _parse_line(path, lineno, line)
            except ValueError:
                continue
        else:
            row = _parse_line(path, lineno, line)
        if row["step"] <= start_step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _raw(value: Any) -> float:
    return float(np.asarray(value).reshape(()))


def _to_json_value(key: str, value: Any) -> Any:
    """Converts a metric value to a JSON-safe Python scalar (non-finite -> None)."""
    if key in _RESERVED:
        raise ValueError(f"metric key {key!r} is reserved; use a namespaced key")
    if isinstance(value, str):
        return value
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {key!r} has shape {arr.shape}; only scalars can be logged")
    item = arr.reshape(()).item()
    if isinstance(item, float) and not math.isfinite(item):
        return None
    if not isinstance(item, (bool, int, float)):
        raise ValueError(f"metric {key!r} has type {type(value).__name__}; expected a number")
    return item
