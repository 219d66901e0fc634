"""Run report: `<run>/report.md` with a results table, training curves and samples.

Writes `report.md` with `report_*.png` beside it (linked relatively, so the directory can be moved
or published as is) from what a pipeline run leaves in its run directory; reading those files
(their layout, eval.json's contract and its defaults for older files) is report_read.py's, the
figures are report_plots.py's. eval.json's models are reported in its order. A missing stage,
model or key is reported as "not run" (or "n/a"), never a crash; a malformed file is an error
naming it. `aggregate` summarises several seeds' eval.json for the README. Command line::

    python -m rlhf_jax.task.report RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import html
import math
import os
import re
import sys
from typing import Any

import numpy as np

from rlhf_jax import methods
from rlhf_jax.task import report_plots as plots
from rlhf_jax.task.report_plots import is_number
from rlhf_jax.task.report_read import (
    METHODS,
    METRICS_FILE,
    MODELS,
    RLHF_METHODS,
    ROUND_STAGES,
    STAGES,
    read_eval,
    read_json,
    read_stage,
    round_dirs,
    split_stage,
)

PLOTS, GOLD_KL_PLOT, ROUNDS_PLOT = plots.TRAINING_PLOTS, plots.GOLD_KL, plots.ROUNDS
SAMPLES_PER_MODEL = 3
MAX_CELL_CHARS = 300
_META_FIELDS = ("seed", "device", "command")
# The last logged values of these keys summarise each stage in the training table.
_SUMMARY_KEYS = {
    "pretrain": ("train/loss", "eval/loss"),
    "sft": ("train/loss", "eval/loss"),
    "rm": ("rm/loss", "eval/accuracy"),
    **{k: methods.BY_KEY[k].summary for k in methods.POLICY_METHODS},  # the method table's
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
    later = round_dirs(run_dir)
    names = [*STAGES, *(f"round_{r}/{s}" for r in later for s in ROUND_STAGES)]
    stages = {s: read_stage(os.path.join(run_dir, s, METRICS_FILE)) for s in names}
    models, meta = read_eval(os.path.join(run_dir, "eval.json"))
    if models is None and all(s is None for s in stages.values()):
        raise ValueError(f"{run_dir}: no stage metrics and no eval.json; is it a run directory?")

    md = ["# rlhf-jax run report", ""] + _header(meta, run_dir) + ["## Results", ""]
    if models is None:
        md += ["Evaluation not run (no eval.json).", ""]
        _save(None, os.path.join(run_dir, GOLD_KL_PLOT))
    else:
        md += _results_table(models) + ["", _alignment_tax(models), ""]
        fig = plots.plot_gold_kl(models, METHODS)
        md += _section(run_dir, GOLD_KL_PLOT, fig, "n/a: no RLHF model has a KL from SFT")
    if (rounds := _rounds(models or {}, meta, stages, later)) is None:
        _save(None, os.path.join(run_dir, ROUNDS_PLOT))
    else:
        md += ["## Rounds", ""] + _rounds_table(*rounds) + [""]
        fig = plots.plot_rounds(*rounds, METHODS)
        md += _section(run_dir, ROUNDS_PLOT, fig, "one round: no per-round plot")
    md += ["## Training", ""] + _stage_table(stages) + [""]
    # (round, stage) -> rows
    ran = {split_stage(n): st for n, st in stages.items() if st is not None}
    rms = {r: st for (r, s), st in ran.items() if s == "rm"}
    ppo = {(s, r): st for (r, s), st in ran.items() if s in ("ppo", "ppo_ptx")}
    figs = (
        plots.plot_lm(stages["pretrain"], stages["sft"]),
        plots.plot_rm(rms),
        plots.plot_ppo(ppo, METHODS),
    )
    for name, fig in zip(PLOTS, figs, strict=True):
        extra = f" Colour per method; {plots.ROUND_STYLES}." if later and name == PLOTS[2] else ""
        md += _section(run_dir, name, fig, "not run", extra)
    md += _text_samples(stages)
    if models is not None:
        md += _model_samples(models)
    out = os.path.join(run_dir, "report.md")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(md).rstrip() + "\n")
    return out


def aggregate(run_dirs: list[str]) -> str:
    """A markdown table of gold score, held-out pretraining loss, alignment tax and KL from SFT
    over several runs.

    Each cell is `mean [min, max]` over the runs that evaluated that model: with a handful of seeds
    the range shows every run, where a standard deviation would be a noisy estimate. The alignment
    tax of an RLHF model is its held-out pretraining loss minus its own run's SFT loss. Rows are
    the union of the runs' models in first-seen order, then any of MODELS that no run evaluated.

    Args:
        run_dirs: run directories (one per seed), each with an eval.json.

    Returns:
        The table, one row per model.

    Raises:
        ValueError: a run has no eval.json (a missing seed would silently narrow the table), or
            an eval.json is malformed.
    """
    fields = ("gold_score", "heldout_pretrain_loss", "tax", "kl_from_sft")
    values: dict[str, dict[str, list[float]]] = {}
    labels, runs, bound = {}, {}, {}
    for d in run_dirs:
        path = os.path.join(d, "eval.json")
        models, _ = read_eval(path)
        if models is None:
            raise ValueError(f"{path}: missing; every aggregated run needs its evaluation")
        base = (models.get("sft") or {}).get("heldout_pretrain_loss")
        for key, m in models.items():
            labels.setdefault(key, m["label"])
            runs[key] = runs.get(key, 0) + 1
            bound[key] = bound.get(key, False) or m["kl_is_bound"]
            v = values.setdefault(key, {f: [] for f in fields})
            loss = m["heldout_pretrain_loss"]
            if m["method"] in RLHF_METHODS and loss is not None and base is not None:
                m = m | {"tax": loss - base}
            for f in (f for f in fields if m.get(f) is not None):
                v[f].append(m[f])
    for key, label in MODELS.items():
        labels.setdefault(key, label)
    md = [
        "| model | runs | gold score, mean [min, max] | held-out pretrain loss, mean [min, max] "
        "| alignment tax (loss - SFT's), mean [min, max] "
        "| KL from SFT (nats/seq), mean [min, max] |",
        "|---|---:|---|---|---|---|",
    ]
    for key, label in labels.items():
        cells = []
        for f in fields:
            v = values.get(key, {}).get(f)
            bounded = "≤ " if f == "kl_from_sft" and bound.get(key) else ""
            sign = "+" if f == "tax" else ""
            cells.append(f"{bounded}{np.mean(v):{sign}.3f} [{min(v):{sign}.3f}, {max(v):{sign}.3f}]"
                         if v else "n/a" if runs.get(key) else "not run")  # fmt: skip
        n = runs.get(key, 0)
        md.append(f"| {_cell(label)} | {n} of {len(run_dirs)} | " + " | ".join(cells) + " |")
    return "\n".join(md)


def _last(rows: list[dict] | None, key: str) -> float | None:
    """The last finite number logged under `key`, or None."""
    vals = [r[key] for r in rows or () if is_number(r.get(key)) and math.isfinite(r[key])]
    return float(vals[-1]) if vals else None


def _save(fig, path: str) -> bool:
    """Writes `fig` as a PNG at `path`; with no figure, removes a stale one. True if written."""
    if fig is not None:
        fig.savefig(path, dpi=100)
        return True
    if os.path.exists(path):
        os.remove(path)  # a stale plot from an earlier build would contradict "not run"
    return False


def _section(run_dir: str, name: str, fig, missing: str, extra: str = "") -> list[str]:
    """A plot's markdown section: title, link and caption, or title and `missing`."""
    title, caption = plots.CAPTIONS[name]
    if _save(fig, os.path.join(run_dir, name)):
        return [f"### {title}", "", f"![{title}]({name})", "", caption + extra, ""]
    return [f"### {title}", "", missing, ""]


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
    timings = read_json(os.path.join(run_dir, "timings.json"))
    timings = meta.get("timings") if timings is None else timings
    timings = {k: float(v) for k, v in timings.items() if is_number(v)} if timings else {}
    total = max(meta.get("elapsed_seconds") or 0.0, sum(timings.values())) or None
    md = ["| seed | total time | device | command |", "|---|---|---|---|"]
    md += [f"| {shown['seed']} | {_duration(total)} | {shown['device']} | {shown['command']} |"]
    if lora := meta.get("lora"):
        md += [
            "",
            f"Every stage after pretraining trained LoRA adapters: rank {lora.get('rank')} on "
            f"{lora.get('targets')}, alpha {lora.get('alpha')}, the base held in "
            f"{lora.get('base_dtype')} (`config.lora`).",
        ]
    if timings:
        md += ["", "| stage | time | share |", "|---|---:|---:|"]
        for stage, t in timings.items():
            share = f"{100 * t / total:.0f}%" if total else "n/a"
            md.append(f"| {_cell(stage)} | {_duration(t)} | {share} |")
    return md + [""]


def _rows(models: dict) -> list[tuple[str, str, dict | None]]:
    """(label, method, entry) per table row: eval.json's models in its order, then MODELS that
    it lacks with entry None, so a run that skipped a pipeline model says so."""
    rows = [(m["label"], m["method"], m) for m in models.values()]
    return rows + [(label, key, None) for key, label in MODELS.items() if key not in models]


def _results_table(models: dict) -> list[str]:
    md = [
        "| model | gold score (mean ± std) | KL from SFT (nats/seq) | held-out pretrain loss "
        "| RM score | response length | finished fraction |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, _, m in _rows(models):
        if m is None:
            md.append(f"| {_cell(label)} | not run | | | | | |")
            continue
        gold = _fmt(m["gold_score"])
        if m["gold_score"] is not None and m["gold_score_std"] is not None:
            gold += f" ± {_fmt(m['gold_score_std'])}"
        kl = _fmt(m["kl_from_sft"])
        kl = f"≤ {kl}" if m["kl_is_bound"] and m["kl_from_sft"] is not None else kl
        cells = [gold, kl, _fmt(m["heldout_pretrain_loss"]), _fmt(m["rm_score"])]
        cells += [_fmt(m["response_length"], ".1f"), _fmt(m["finished_fraction"], ".2f")]
        md.append(f"| {_cell(label)} | " + " | ".join(cells) + " |")
    return md


def _alignment_tax(models: dict) -> str:
    sft = models.get("sft") or next((m for m in models.values() if m["method"] == "sft"), {})
    base = sft.get("heldout_pretrain_loss")
    head = "**Alignment tax** (held-out pretraining loss increase over SFT): "
    if base is None:
        return head + "n/a (no SFT held-out pretraining loss)."
    parts = []
    for label, method, m in _rows(models):
        if method in RLHF_METHODS:
            loss = (m or {}).get("heldout_pretrain_loss")
            parts.append(f"{_cell(label)} " + ("n/a" if loss is None else f"{loss - base:+.3f}"))
    return head + (", ".join(parts) if parts else "no RLHF model evaluated") + "."


def _rounds(
    models: dict, meta: dict, stages: dict, later: list[int]
) -> tuple[list[dict], list[str]] | None:
    """(rounds, methods) of an iterated run, or None if it has no rounds (neither meta.rounds
    nor round_{r} directories).

    Returns:
        rounds: one {"round", "rm_accuracy", "comparisons", "gold": {method: score}} per round,
            ascending; a method missing from "gold" has no model in that round (None: it has one
            without a gold score). The RM accuracy is meta.rounds' when recorded, else the last
            eval/accuracy of that round's RM.
        methods: the methods of the models of rounds >= 1, in eval.json order.
    """
    listed = {r["round"]: r for r in meta.get("rounds", [])}
    if not listed and not later:
        return None
    rlhf = [m for m in models.values() if m["round"] >= 1]
    numbers = set(listed) | set(later) | {m["round"] for m in rlhf} | ({1} if later else set())
    rounds = []
    for r in sorted(numbers):
        entry, gold = listed.get(r, {}), {}
        for m in (m for m in rlhf if m["round"] == r):
            gold.setdefault(m["method"], m["gold_score"])
        acc = entry.get("rm_accuracy")
        if acc is None:
            acc = _last(stages.get("rm" if r == 1 else f"round_{r}/rm"), "eval/accuracy")
        rounds.append(dict(round=r, rm_accuracy=acc, comparisons=entry.get("comparisons"),
                           gold=gold))  # fmt: skip
    return rounds, list(dict.fromkeys(m["method"] for m in rlhf))


def _rounds_table(rounds: list[dict], methods: list[str]) -> list[str]:
    head = "".join(f" {_cell(METHODS.get(m, m))} gold |" for m in methods)
    md = ["| round | RM held-out accuracy | comparisons |" + head]
    md.append("|---:" * (3 + len(methods)) + "|")
    for r in rounds:
        golds = [_fmt(r["gold"][m]) if m in r["gold"] else "not run" for m in methods]
        cells = [str(r["round"]), _fmt(r["rm_accuracy"]), _fmt(r["comparisons"], ".0f"), *golds]
        md.append("| " + " | ".join(cells) + " |")
    return md + ["", "Each round r >= 2 collects comparisons on samples of round r-1's policy, "
                 "trains a new RM on them and continues PPO and PPO-ptx against it."]  # fmt: skip


def _stage_table(stages: dict) -> list[str]:
    md = ["| stage | status | last step | last logged values |", "|---|---|---:|---|"]
    for name, st in stages.items():
        if not st:
            md.append(f"| {name} | {'not run' if st is None else 'nothing logged'} | | |")
            continue
        keys, last = _SUMMARY_KEYS[split_stage(name)[1]], {}
        for r in st:  # later rows overwrite: the last finite value of each key
            last.update({k: r[k] for k in keys if is_number(r.get(k))})
        shown = ", ".join(f"{k} {last[k]:.4g}" for k in keys if k in last)
        md.append(f"| {name} | ran | {max(r['step'] for r in st)} | {shown} |")
    return md


def _text_samples(stages: dict) -> list[str]:
    md = ["## Samples logged during training", ""]
    logged = [("sft", "eval/samples", "SFT eval samples")]
    for name in (n for n in stages if split_stage(n)[1] in ("ppo", "ppo_ptx")):
        r, method = split_stage(name)
        label = METHODS[method] + (f", round {r}" if r > 1 else "")
        title = f"{label} rollout samples ([score] prompt -> response)"
        logged.append((name, "ppo/samples", title))
    for name, key, title in logged:
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
    for m in models.values():
        samples = m["samples"][:SAMPLES_PER_MODEL]
        md += [f"### {_cell(m['label'])}", ""]
        md += ["| prompt | response | gold |", "|---|---|---:|"] if samples else ["none recorded"]
        for s in samples:
            md.append(f"| {_cell(s.get('prompt', ''))} | {_cell(s.get('response', ''))} | "
                      f"{_fmt(s['gold'])} |")  # fmt: skip
        md.append("")
    return md


def main(argv: list[str] | None = None) -> int:
    """Rebuilds each DIR/report.md; with several DIRs also prints the aggregate table."""
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_jax.task.report",
        description="Write DIR/report.md from a run's metrics and eval.json; with several DIRs "
        "(seeds) also print a mean [min, max] table of gold score, held-out loss and KL from SFT.",
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
