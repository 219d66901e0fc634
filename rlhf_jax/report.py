"""Run report: `<run>/report.md` with a results table, training curves and samples.

Reads what a pipeline run leaves in its run directory and writes `report.md` with `report_*.png`
beside it (linked relatively, so the directory can be moved or published as is)::

    <run>/{pretrain,sft,rm,ppo,ppo_ptx}/metrics.jsonl   each stage's metrics (see metrics.py)
    <run>/eval.json        {"models": {"pretrained"|"sft"|"ppo"|"ppo_ptx": {...}}, "meta": {...}}
    <run>/timings.json     {"stage": seconds} of the pipeline's steps (else meta["timings"])

A missing stage, model or key is reported as "not run" (or "n/a"), never a crash; a malformed
file is an error naming it (and the line, for JSONL). `aggregate` summarises several seeds'
`eval.json` for the README. Command line::

    python -m rlhf_jax.report RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import math
import os
import re
import sys
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# The metrics.jsonl name and line contract are metrics.py's; it is not imported because it pulls
# in jax and TensorBoard (seconds of start-up) for a command that only reads JSON.
METRICS_FILE = "metrics.jsonl"
STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx")
MODELS = {"pretrained": "Pretrained", "sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx"}
RL_RUNS = {"ppo": ("PPO", "tab:blue"), "ppo_ptx": ("PPO-ptx", "tab:orange")}
PLOTS = ("report_lm_loss.png", "report_rm_accuracy.png", "report_ppo.png")
SMOOTH_WINDOW = 10  # PPO iterations in the trailing moving average
SAMPLES_PER_MODEL = 3
MAX_CELL_CHARS = 300
_NUMBERS = ("gold_score", "gold_score_std", "heldout_pretrain_loss", "rm_score")
_NUMBERS += ("response_length", "finished_fraction")
_META_FIELDS = ("seed", "device", "command")
# The last logged values of these keys summarise each stage in the training table.
_SUMMARY_KEYS = {
    "pretrain": ("train/loss", "eval/loss"),
    "sft": ("train/loss", "eval/loss"),
    "rm": ("rm/loss", "eval/accuracy"),
    "ppo": ("ppo/score", "eval/score", "ppo/kl_per_seq"),
    "ppo_ptx": ("ppo/score", "eval/score", "ppo/kl_per_seq", "ppo/ptx_loss"),
}
_CAPTIONS = {
    "report_lm_loss.png": ("Pretraining and SFT loss", "Train (line) and eval (markers) loss."),
    "report_rm_accuracy.png": (
        "Reward model accuracy",
        "Held-out pairwise accuracy, overall and per number of responses K (dotted); train "
        "accuracy faint; chance is 0.5.",
    ),
    "report_ppo.png": (
        "PPO vs PPO-ptx",
        "RM score and KL to SFT per sequence. Faint: every iteration; solid: trailing moving "
        f"average over {SMOOTH_WINDOW} iterations; markers: held-out eval prompts.",
    ),
}


def build_report(run_dir: str) -> str:
    """Writes `<run_dir>/report.md` and its `report_*.png` plots from the run's files.

    Args:
        run_dir: a pipeline run directory.

    Returns:
        The path of the written report.md.

    Raises:
        ValueError: `run_dir` is not a run directory, or one of its files is malformed.
    """
    if not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir}: not a directory")
    stages = {s: read_stage(os.path.join(run_dir, s, METRICS_FILE)) for s in STAGES}
    models, meta = read_eval(os.path.join(run_dir, "eval.json"))
    if models is None and all(s is None for s in stages.values()):
        raise ValueError(f"{run_dir}: no stage metrics and no eval.json; is it a run directory?")

    md = ["# rlhf-jax run report", ""] + _header(meta, run_dir) + ["## Results", ""]
    if models is None:
        md += ["Evaluation not run (no eval.json).", ""]
    else:
        md += _results_table(models) + ["", _alignment_tax(models), ""]
    md += ["## Training", ""] + _stage_table(stages) + [""]
    for name, plot in zip(PLOTS, (_plot_lm, _plot_rm, _plot_ppo), strict=True):
        path, (title, caption) = os.path.join(run_dir, name), _CAPTIONS[name]
        md += [f"### {title}", ""]
        if (fig := plot(stages)) is not None:
            fig.savefig(path, dpi=100)
            md += [f"![{title}]({name})", "", caption, ""]
        else:
            md += ["not run", ""]
            if os.path.exists(path):
                os.remove(path)  # a stale plot from an earlier build would contradict "not run"
    md += _text_samples(stages)
    if models is not None:
        md += _model_samples(models)
    out = os.path.join(run_dir, "report.md")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(md).rstrip() + "\n")
    return out


def aggregate(run_dirs: list[str]) -> str:
    """A markdown table of gold score and held-out pretraining loss over several runs (seeds).

    Each cell is `mean [min, max]` over the runs that evaluated that model: with a handful of seeds
    the range shows every run, where a standard deviation would be a noisy estimate.

    Args:
        run_dirs: run directories, each with an eval.json.

    Returns:
        The table, one row per model.

    Raises:
        ValueError: a run has no eval.json (a missing seed would silently narrow the table), or
            an eval.json is malformed.
    """
    fields = ("gold_score", "heldout_pretrain_loss")
    values = {m: {f: [] for f in fields} for m in MODELS}
    for d in run_dirs:
        path = os.path.join(d, "eval.json")
        models, _ = read_eval(path)
        if models is None:
            raise ValueError(f"{path}: missing; every aggregated run needs its evaluation")
        for m, f in ((m, f) for m in models if m in MODELS for f in fields):
            if models[m][f] is not None:
                values[m][f].append(models[m][f])
    md = [
        "| model | runs | gold score, mean [min, max] | held-out pretrain loss, mean [min, max] |",
        "|---|---:|---|---|",
    ]
    for m, label in MODELS.items():
        n = max(len(v) for v in values[m].values())
        cells = [f"{np.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]" if v else "not run"
                 for v in values[m].values()]  # fmt: skip
        md.append(f"| {label} | {n} of {len(run_dirs)} | " + " | ".join(cells) + " |")
    return "\n".join(md)


def read_stage(path: str) -> list[dict[str, Any]] | None:
    """A stage's metrics.jsonl rows (non-finite values as None), or None if the file is missing.

    Raises:
        ValueError: a line is not a JSON object with an integer `step` (names file:line).
    """
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        *whole, tail = f.read().split("\n")
    rows = [_parse_line(path, i, line) for i, line in enumerate(whole, 1) if line.strip()]
    # The writer appends whole lines, so an unterminated last line is a write in progress (a live
    # run) or one cut short by a kill: not data, as metrics.py also treats it on resume.
    with contextlib.suppress(ValueError):
        if tail.strip():
            rows.append(_parse_line(path, len(whole) + 1, tail))
    return rows


def read_eval(path: str) -> tuple[dict | None, dict]:
    """(models, meta) of an eval.json; (None, {}) if it is missing.

    Every model entry comes back with each of `_NUMBERS` as a float or None, and its samples.

    Raises:
        ValueError: the file is not JSON, or an entry has the wrong type (names file and key).
    """
    if (ev := _read_json(path)) is None:
        return None, {}
    models, meta = ev.get("models", {}), ev.get("meta", {})
    if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        raise ValueError(f"{path}: 'models' must map model names to objects")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: 'meta' must be an object")
    out = {}
    for name, m in models.items():
        out[name] = {k: _num(m, k, f"{path}: models.{name}") for k in _NUMBERS}
        samples = m.get("samples") or []
        if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
            raise ValueError(f"{path}: models.{name}.samples must be a list of objects")
        for s in samples:
            s["gold"] = _num(s, "gold", f"{path}: models.{name}.samples")
        out[name]["samples"] = samples
    _num(meta, "elapsed_seconds", f"{path}: meta")
    if not isinstance(meta.get("timings", {}), dict):
        raise ValueError(f"{path}: meta.timings must map stage names to seconds")
    return out, meta


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of `y` [N] over up to `window` points, ignoring NaN (NaN if all are)."""
    y = np.asarray(y, np.float64)
    ok = np.isfinite(y)
    total = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    count = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, len(y) + 1)
    lo = np.maximum(hi - window, 0)
    n = count[hi] - count[lo]
    return np.where(n > 0, (total[hi] - total[lo]) / np.maximum(n, 1), np.nan)


def _read_json(path: str) -> dict | None:
    """A JSON object file, or None if it is missing."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse_line(path: str, lineno: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: malformed metrics line: {e.msg}") from None
    step = row.get("step") if isinstance(row, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f"{path}:{lineno}: metrics line is not an object with an integer step")
    return row


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(entry: dict, key: str, where: str) -> float | None:
    v = entry.get(key)
    if v is not None and not _is_num(v):
        raise ValueError(f"{where}: {key} is {v!r}; expected a number")
    return None if v is None else float(v)


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def _duration(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 60:
        return f"{s:.1f}s"
    h, rem = divmod(round(s), 3600)
    return f"{h}h {rem // 60:02d}m {rem % 60:02d}s" if h else f"{rem // 60}m {rem % 60:02d}s"


def _cell(v: Any) -> str:
    """Text safe inside a markdown table cell: one line, no pipes, no raw HTML, bounded."""
    s = str(v)
    s = s[:MAX_CELL_CHARS] + "…" if len(s) > MAX_CELL_CHARS else s
    return html.escape(s, quote=False).replace("|", "\\|").replace("\n", "<br>")


def _header(meta: dict, run_dir: str) -> list[str]:
    shown = {k: _cell(meta[k]) if k in meta else "not recorded" for k in _META_FIELDS}
    if "command" in meta:  # a code span shows HTML entities literally: escape pipes only
        shown["command"] = "`" + str(meta["command"]).replace("|", "\\|") + "`"
    # The pipeline rewrites timings.json after every step, so it also times the steps that ended
    # after eval.json was written (evaluation itself); meta["timings"] is the fallback.
    timings = _read_json(os.path.join(run_dir, "timings.json"))
    timings = meta.get("timings") if timings is None else timings
    timings = {k: float(v) for k, v in timings.items() if _is_num(v)} if timings else {}
    total = max(meta.get("elapsed_seconds") or 0.0, sum(timings.values())) or None
    md = ["| seed | total time | device | command |", "|---|---|---|---|"]
    md += [f"| {shown['seed']} | {_duration(total)} | {shown['device']} | {shown['command']} |"]
    if timings:
        md += ["", "| stage | time | share |", "|---|---:|---:|"]
        for stage, t in timings.items():
            share = f"{100 * t / total:.0f}%" if total else "n/a"
            md.append(f"| {_cell(stage)} | {_duration(t)} | {share} |")
    return md + [""]


def _results_table(models: dict) -> list[str]:
    md = [
        "| model | gold score (mean ± std) | held-out pretrain loss | RM score | response length "
        "| finished fraction |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key, label in MODELS.items():
        m = models.get(key)
        if m is None:
            md.append(f"| {label} | not run | | | | |")
            continue
        gold = _fmt(m["gold_score"])
        if m["gold_score"] is not None and m["gold_score_std"] is not None:
            gold += f" ± {_fmt(m['gold_score_std'])}"
        cells = [gold, _fmt(m["heldout_pretrain_loss"]), _fmt(m["rm_score"])]
        cells += [_fmt(m["response_length"], ".1f"), _fmt(m["finished_fraction"], ".2f")]
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    return md


def _alignment_tax(models: dict) -> str:
    loss = {k: (models.get(k) or {}).get("heldout_pretrain_loss") for k in ("sft", *RL_RUNS)}
    head = "**Alignment tax** (held-out pretraining loss increase over SFT): "
    if loss["sft"] is None:
        return head + "n/a (no SFT held-out pretraining loss)."
    parts = [
        f"{MODELS[k]} {loss[k] - loss['sft']:+.3f}" if loss[k] is not None else f"{MODELS[k]} n/a"
        for k in RL_RUNS
    ]
    return head + ", ".join(parts) + "."


def _stage_table(stages: dict) -> list[str]:
    md = ["| stage | status | last step | last logged values |", "|---|---|---:|---|"]
    for name, st in stages.items():
        if not st:
            md.append(f"| {name} | {'not run' if st is None else 'nothing logged'} | | |")
            continue
        last = {}
        for r in st:  # later rows overwrite: the last finite value of each key
            last.update({k: r[k] for k in _SUMMARY_KEYS[name] if _is_num(r.get(k))})
        shown = ", ".join(f"{k} {last[k]:.4g}" for k in _SUMMARY_KEYS[name] if k in last)
        md.append(f"| {name} | ran | {max(r['step'] for r in st)} | {shown} |")
    return md


def _text_samples(stages: dict) -> list[str]:
    md = ["## Samples logged during training", ""]
    for name, key, title in (
        ("sft", "eval/samples", "SFT eval samples"),
        ("ppo", "ppo/samples", "PPO rollout samples ([score] prompt -> response)"),
        ("ppo_ptx", "ppo/samples", "PPO-ptx rollout samples ([score] prompt -> response)"),
    ):
        st = stages[name]
        texts = [(r["step"], r[key]) for r in st or () if isinstance(r.get(key), str)]
        if not texts:
            md += [f"### {title}", "", "not run" if st is None else "none logged", ""]
            continue
        step, text = texts[-1]
        # A fence longer than any backtick run in the text cannot be closed by it.
        fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
        md += [f"### {title}, step {step}", "", fence + "text", text, fence, ""]
    return md


def _model_samples(models: dict) -> list[str]:
    md = ["## Held-out samples per model", ""]
    for key, label in MODELS.items():
        if key not in models:
            continue
        samples = models[key]["samples"][:SAMPLES_PER_MODEL]
        md += [f"### {label}", ""]
        md += ["| prompt | response | gold |", "|---|---|---:|"] if samples else ["none recorded"]
        for s in samples:
            md.append(f"| {_cell(s.get('prompt', ''))} | {_cell(s.get('response', ''))} | "
                      f"{_fmt(s['gold'])} |")  # fmt: skip
        md.append("")
    return md


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [N], values [N]) of the rows that log `key` as a number or null (-> NaN, a gap).

    A string under the key is text, which metrics.py also accepts; it is not part of the curve.
    """
    rows = [r for r in rows if key in r and (r[key] is None or _is_num(r[key]))]
    ys = [np.nan if r[key] is None else float(r[key]) for r in rows]
    return np.asarray([r["step"] for r in rows]), np.asarray(ys, np.float64)


def _plot(ax, rows: list[dict], key: str, fmt: str = "-", **style):
    """Draws `key` of a stage if it logged any."""
    x, y = _series(rows, key)
    if len(x):
        ax.plot(x, y, fmt, markersize=4, **style)


def _figure(ncols: int):
    # A bare Figure on the Agg canvas: no pyplot global state, no display needed. Fixed margins
    # rather than a layout engine, which draws every figure twice.
    fig = Figure(figsize=(5.5 * ncols, 4))
    fig.subplots_adjust(left=0.14 / ncols**0.9, right=0.98, bottom=0.12, top=0.92, wspace=0.2)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _finish(ax, title: str, ylabel: str):
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps, also when there are few
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)


def _plot_lm(stages: dict) -> Figure | None:
    if stages["pretrain"] is None and stages["sft"] is None:
        return None
    fig, axes = _figure(2)
    for ax, name, title in zip(axes, ("pretrain", "sft"), ("Pretraining", "SFT"), strict=True):
        if stages[name] is not None:
            _plot(ax, stages[name], "train/loss", label="train/loss")
            _plot(ax, stages[name], "eval/loss", "o--", label="eval/loss")
        _finish(ax, title, "loss")
    return fig


def _plot_rm(stages: dict) -> Figure | None:
    if (st := stages["rm"]) is None:
        return None
    fig, (ax,) = _figure(1)
    _plot(ax, st, "rm/accuracy", alpha=0.3, label="rm/accuracy (train)")
    _plot(ax, st, "eval/accuracy", "o-", label="eval/accuracy")
    per_k = {k for r in st for k in r if re.fullmatch(r"eval/accuracy_k\d+", k)}
    for key in sorted(per_k, key=lambda k: int(k.rsplit("k", 1)[1])):
        _plot(ax, st, key, ".:", label=key)
    if ax.lines:
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    _finish(ax, "Reward model", "pairwise accuracy")
    return fig


def _plot_ppo(stages: dict) -> Figure | None:
    if all(stages[name] is None for name in RL_RUNS):
        return None
    fig, axes = _figure(2)
    panels = (
        ("ppo/score", "eval/score", "RM score"),
        ("ppo/kl_per_seq", "eval/kl_per_seq", "KL per sequence"),
    )
    for ax, (train_key, eval_key, ylabel) in zip(axes, panels, strict=True):
        for name, (label, color) in RL_RUNS.items():
            if (st := stages[name]) is None:
                continue
            x, y = _series(st, train_key)
            if len(x):  # every iteration is noisy: faint raw points under a moving average
                ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
                ax.plot(x, moving_average(y, SMOOTH_WINDOW), color=color,
                        label=f"{label} {train_key} (avg {SMOOTH_WINDOW})")  # fmt: skip
            _plot(ax, st, eval_key, "o--", color=color, label=f"{label} {eval_key}")
        _finish(ax, f"{ylabel}: PPO vs PPO-ptx", ylabel)
    return fig


def main(argv: list[str] | None = None) -> int:
    """Rebuilds each DIR/report.md; with several DIRs also prints the aggregate table."""
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_jax.report",
        description="Write DIR/report.md from a run's metrics and eval.json; with several DIRs "
        "(seeds) also print a mean [min, max] table of gold score and held-out loss.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="DIR")
    args = parser.parse_args(argv)
    try:
        for d in args.run_dirs:
            print(f"wrote {build_report(d)}", file=sys.stderr)
        if len(args.run_dirs) > 1:
            print(aggregate(args.run_dirs))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
