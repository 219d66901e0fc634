"""Gathers a sweep's results: one row per point with its overrides, status and final metrics.

  python -m launch.sweep collect runs/tiny_lr --metrics train/loss --x train.lr --y train/loss

The points come from WORKDIR/sweep.json (written by `launch.sweep run`). A point's row holds
- its overrides, one column per override key;
- `status` and `seconds` from its sweep_point.json (`unknown` for a point directory without one,
  e.g. one run by an emitted command; `missing` for no point directory);
- for every metrics.jsonl under the point directory, in subdirectory R, the last logged value of
  each numeric key k: column `k` at the point directory itself, `R:k` below it
  (`ppo:eval/kl_per_seq`);
- for every eval.json, its numeric leaves: `eval.<dotted path>`, or `R:eval.<dotted path>`.

Writes WORKDIR/sweep.csv (every column), WORKDIR/sweep.md (overrides, status and the chosen
metrics) and, given --x and --y, one plot per y key: WORKDIR/sweep_<y>.png.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
import re

from launch import sweep as sweep_lib
from rlhf_jax.infra.metrics import METRICS_FILE, read_metrics

EVAL_FILE = "eval.json"
# Checkpoint and TensorBoard trees can be large and never hold either file.
_SKIP_DIRS = ("checkpoints", "tb")
# Not metrics: the step is the x axis of a run, the time a wall-clock stamp.
_NOT_METRICS = ("step", "time")
# Points known to have stopped early; their last values would mislead a plot.
_INCOMPLETE = ("failed", "preempted", "missing")


def point_metrics(point_dir: str) -> dict[str, float]:
    """The final metrics of one point: `k` / `R:k` and `eval.x.y` / `R:eval.x.y` columns."""
    out: dict[str, float] = {}
    for dirpath, dirnames, filenames in os.walk(point_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        rel = os.path.relpath(dirpath, point_dir).replace(os.sep, "/")
        prefix = "" if rel == "." else f"{rel}:"
        if METRICS_FILE in filenames:
            for row in read_metrics(os.path.join(dirpath, METRICS_FILE)):
                for k, v in row.items():
                    if k in _NOT_METRICS or isinstance(v, (bool, str)):
                        continue
                    if v is None or isinstance(v, (int, float)):
                        out[prefix + k] = math.nan if v is None else v  # null: non-finite
        if EVAL_FILE in filenames:
            with open(os.path.join(dirpath, EVAL_FILE), encoding="utf-8") as f:
                _flatten(json.load(f), prefix + "eval", out)
    return out


def _flatten(obj, key: str, out: dict):
    # Lists (e.g. eval.json's sample tables) are examples, not summary numbers: skipped.
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{key}.{k}", out)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[key] = obj


def collect_rows(workdir: str) -> tuple[list[str], list[dict]]:
    """Returns (override keys in sweep order, one row dict per point)."""
    path = os.path.join(workdir, sweep_lib.SWEEP_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; is {workdir} a `launch.sweep run` workdir?")
    with open(path, encoding="utf-8") as f:
        points = json.load(f)["points"]
    keys = list(dict.fromkeys(k for p in points for k in p["overrides"]))
    rows = []
    for p in points:
        point_dir = os.path.join(workdir, p["name"])
        info = sweep_lib.read_point(point_dir)
        row = dict(p["overrides"])
        if info is not None:
            row.update(status=info.get("status", "unknown"), seconds=info.get("seconds"))
        else:
            row.update(status="unknown" if os.path.isdir(point_dir) else "missing", seconds=None)
        if os.path.isdir(point_dir):
            row.update(point_metrics(point_dir))
        rows.append(row)
    return keys, rows


def _check_keys(flag: str, wanted: list[str], available: list[str]):
    for key in wanted:
        if key not in available:
            # difflib finds typos; the substring match finds `lr` for `train.lr`
            close = difflib.get_close_matches(key, available, n=5, cutoff=0.5)
            close = list(dict.fromkeys(close + [k for k in available if key in k]))[:5]
            hint = f"close: {close}" if close else f"some available: {sorted(available)[:8]}"
            raise ValueError(f"{flag} {key!r} is in no point's results; {hint}")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        return sweep_lib.format_value(v)
    return str(v)  # floats: shortest round-trip form, so the csv holds the logged values


def _md_cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return _cell(v).replace("|", "\\|")


def collect(
    workdir: str,
    metrics: list[str] | None = None,
    x: str | None = None,
    y: list[str] | None = None,
    logx: bool = False,
    together: bool = False,
) -> list[str]:
    """Writes sweep.csv, sweep.md and the plots into `workdir`; returns (and prints) the paths.

    Args:
        workdir: the sweep's workdir.
        metrics: columns to keep (default: every metric column in the csv, none in the table).
        x: the plots' x axis, an override or a metric key.
        y: metric keys, one plot each (and the table's columns when `metrics` is empty).
        logx: log-scale x axis.
        together: one plot with a line per y key (`sweep_<x>.png`), each point labelled with its
            swept values, e.g. a gold and a proxy score against KL; else one plot per y key.
    """
    metrics, y = list(metrics or []), list(y or [])
    if bool(x) != bool(y):
        raise ValueError("--x and --y go together: give both for plots, or neither")
    keys, rows = collect_rows(workdir)
    columns = sorted({k for r in rows for k in r} - set(keys) - {"status", "seconds"})
    _check_keys("--metrics", metrics, [*columns, "seconds"])
    _check_keys("--y", y, [*columns, "seconds"])
    if x:
        _check_keys("--x", [x], [*keys, *columns, "seconds"])

    written = []
    csv_path = os.path.join(workdir, "sweep.csv")
    header = [*keys, "status", "seconds", *(metrics or columns)]
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([_cell(r.get(k)) for k in header] for r in rows)
    written.append(csv_path)

    md_path = os.path.join(workdir, "sweep.md")
    md_cols = [*keys, "status", *(metrics or y)]
    lines = ["| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    lines += ["| " + " | ".join(_md_cell(r.get(k)) for k in md_cols) + " |" for r in rows]
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    written.append(md_path)

    if x:
        complete = [r for r in rows if r["status"] not in _INCOMPLETE]
        if len(complete) < len(rows):
            print(f"plots leave out {len(rows) - len(complete)} points that did not finish")
        # One line per combination of the other keys that actually vary across points.
        others = [k for k in keys if k != x and len({_cell(r.get(k)) for r in rows}) > 1]
        safe = lambda k: re.sub(r"[^A-Za-z0-9._-]", "_", k)  # noqa: E731
        if together:
            path = os.path.join(workdir, f"sweep_{safe(x)}.png")
            plot_together(complete, x, y, keys, path, logx)
            written.append(path)
        for key in [] if together else y:
            path = os.path.join(workdir, f"sweep_{safe(key)}.png")
            plot(complete, x, key, others, path, logx)
            written.append(path)
    for path in written:
        print(path, flush=True)
    return written


def plot(rows: list[dict], x: str, y: str, others: list[str], path: str, logx: bool):
    """y against x, one line (with markers) per combination of the `others` keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list] = {}
    for r in rows:
        xv, yv = r.get(x), r.get(y)
        if xv is None or not isinstance(yv, (int, float)):
            continue
        if not isinstance(xv, (int, float)) or isinstance(xv, bool):
            xv = _cell(xv)  # categorical axis
        label = ", ".join(f"{k}={_cell(r.get(k))}" for k in others)
        lines.setdefault(label, []).append((xv, yv))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in lines.items():
        if all(isinstance(p[0], (int, float)) for p in pts):
            pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or None)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{y} vs {x}")
    ax.grid(True, alpha=0.3)
    if any(lines):
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_together(rows: list[dict], x: str, ys: list[str], keys: list[str], path: str, logx: bool):
    """Every y key against a numeric x in one plot; points labelled with their swept values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for y in ys:
        pts = sorted(
            (r[x], r[y], ",".join(f"{k.rsplit('.', 1)[-1]}={_cell(r.get(k))}" for k in keys))
            for r in rows
            if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))
        )
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=y)
        for px, py, label in pts:
            ax.annotate(label, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=x, title=f"against {x}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
