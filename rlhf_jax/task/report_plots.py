"""The run report's figures: matplotlib drawings of metrics and eval.json numbers already read.

report_read.py owns reading the run directory and report.py writing report.md; this module only
draws. Every function returns a `Figure` (or None when there is nothing to draw) on the Agg
canvas, without pyplot's global state, so building a report needs no display and leaves nothing
open. Like report.py it never imports jax: the report only reads JSON.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_jax import methods

SMOOTH_WINDOW = 10  # PPO iterations in the trailing moving average
TRAINING_PLOTS = ("report_lm_loss.png", "report_rm_accuracy.png", "report_ppo.png")
GOLD_KL, ROUNDS = "report_gold_kl.png", "report_rounds.png"
CAPTIONS = {  # file name -> (title, caption) in report.md
    "report_lm_loss.png": ("Pretraining and SFT loss", "Train (line) and eval (markers) loss."),
    "report_rm_accuracy.png": (
        "Reward model accuracy",
        "Held-out pairwise accuracy, overall and per number of responses K (dotted, with one RM); "
        "train accuracy faint; chance is 0.5. With several rounds, one colour per round's RM.",
    ),
    "report_ppo.png": (
        "PPO vs PPO-ptx",
        "RM score and KL to SFT per sequence. Faint: every iteration; solid: trailing moving "
        f"average over {SMOOTH_WINDOW} iterations; markers: held-out eval prompts.",
    ),
    GOLD_KL: (
        "Gold score vs KL from SFT",
        "Each model's gold score against its KL from the SFT policy on held-out prompts (error "
        "bars: standard error, where eval.json records the sample count n); SFT sits at 0 and "
        "lines join one method's successive rounds. RLHF methods trade KL from SFT for gold "
        "score. Best-of-K sampling's KL (hollow marker) is the analytic bound log K - (K-1)/K: "
        "its true KL lies at or left of the marker.",
    ),
    ROUNDS: (
        "Iterated RLHF",
        "Left: gold score of each method's model per round. Right: held-out pairwise accuracy of "
        "each round's reward model (chance 0.5).",
    ),
}
# One colour and marker per method, the same in every figure; unknown methods take _SPARE ones.
METHOD_STYLES = {  # methods.py's, for every row that is a model (the RM is not)
    m.key: m.style for m in (*methods.METHODS, methods.BEST_OF_K) if m.key != "rm"
}
_SPARE = (("tab:cyan", ">"), ("gold", "p"), ("navy", "h"), ("teal", "<"))
ROUND_LINES = ("-", "--", "-.", ":")  # round 1, 2, ... of the same run (cycled past 4)
ROUND_MARKERS = ("o", "s", "^", "D")
ROUND_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:brown")
ROUND_STYLES = "rounds 2, 3, 4: dashed, dash-dotted, dotted"  # ROUND_LINES, for captions


def is_number(v) -> bool:
    """A JSON number: int or float, not bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [N], values [N]) of the rows that log `key` as a number or null (-> NaN, a gap).

    A string under the key is text, which metrics.py also accepts; it is not part of the curve.
    """
    rows = [r for r in rows if key in r and (r[key] is None or is_number(r[key]))]
    ys = [np.nan if r[key] is None else float(r[key]) for r in rows]
    return np.asarray([r["step"] for r in rows]), np.asarray(ys, np.float64)


def method_style(method: str, seen: list[str]) -> tuple[str, str]:
    """(colour, marker) of a method; `seen` numbers the unknown ones in order of appearance."""
    if method in METHOD_STYLES:
        return METHOD_STYLES[method]
    if method not in seen:
        seen.append(method)
    return _SPARE[seen.index(method) % len(_SPARE)]


def _plot(ax, rows: list[dict], key: str, fmt: str = "-", **style):
    """Draws `key` of a stage if it logged any."""
    x, y = series(rows, key)
    if len(x):
        ax.plot(x, y, fmt, markersize=4, **style)


def _figure(ncols: int):
    # A bare Figure on the Agg canvas: no pyplot global state, no display needed. Fixed margins
    # rather than a layout engine, which draws every figure twice.
    fig = Figure(figsize=(5.5 * ncols, 4))
    fig.subplots_adjust(left=0.14 / ncols**0.9, right=0.98, bottom=0.12, top=0.92, wspace=0.2)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _finish(ax, title: str, ylabel: str, xlabel: str = "step"):
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps, also when there are few
    ax.grid(alpha=0.3)
    if ax.lines or ax.collections:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)


def plot_lm(pretrain: list[dict] | None, sft: list[dict] | None) -> Figure | None:
    """Train and eval loss of pretraining and SFT, one panel each; None if neither ran."""
    if pretrain is None and sft is None:
        return None
    fig, axes = _figure(2)
    for ax, rows, title in zip(axes, (pretrain, sft), ("Pretraining", "SFT"), strict=True):
        if rows is not None:
            _plot(ax, rows, "train/loss", label="train/loss")
            _plot(ax, rows, "eval/loss", "o--", label="eval/loss")
        _finish(ax, title, "loss")
    return fig


def plot_rm(rms: dict[int, list[dict]]) -> Figure | None:
    """Pairwise accuracy of each round's reward model; None if none ran.

    Args:
        rms: {round: that round's RM metrics rows}, only the rounds whose RM ran.
    """
    if not rms:
        return None
    fig, (ax,) = _figure(1)
    for i, (r, rows) in enumerate(sorted(rms.items())):
        color = ROUND_COLORS[i % len(ROUND_COLORS)]
        tag = f"round {r} " if len(rms) > 1 else ""
        _plot(ax, rows, "rm/accuracy", color=color, alpha=0.3, label=f"{tag}rm/accuracy (train)")
        _plot(ax, rows, "eval/accuracy", "o-", color=color, label=f"{tag}eval/accuracy")
        if len(rms) > 1:
            continue  # per-K curves of several RMs would bury the overall ones
        per_k = {k for row in rows for k in row if re.fullmatch(r"eval/accuracy_k\d+", k)}
        for key in sorted(per_k, key=lambda k: int(k.rsplit("k", 1)[1])):
            _plot(ax, rows, key, ".:", label=key)
    if ax.lines:
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
    _finish(ax, "Reward model" + ("s, one per round" if len(rms) > 1 else ""), "pairwise accuracy")
    return fig


def plot_ppo(runs: dict[tuple[str, int], list[dict]], labels: dict[str, str]) -> Figure | None:
    """RM score and KL per sequence of every PPO run: colour per method, line style per round.

    Args:
        runs: {(method, round): metrics rows} of the PPO runs that ran.
        labels: method -> display name.
    """
    if not runs:
        return None
    fig, axes = _figure(2)
    panels = (
        ("ppo/score", "eval/score", "RM score"),
        ("ppo/kl_per_seq", "eval/kl_per_seq", "KL per sequence"),
    )
    spare: list[str] = []
    for ax, (train_key, eval_key, ylabel) in zip(axes, panels, strict=True):
        for (method, r), rows in runs.items():
            color, _ = method_style(method, spare)
            ls, mk = ROUND_LINES[(r - 1) % 4], ROUND_MARKERS[(r - 1) % 4]
            label = labels.get(method, method) + (f" r{r}" if r > 1 else "")
            x, y = series(rows, train_key)
            if len(x):  # every iteration is noisy: faint raw points under a moving average
                ax.plot(x, y, color=color, ls=ls, alpha=0.2, lw=0.8)
                ax.plot(x, moving_average(y, SMOOTH_WINDOW), color=color, ls=ls,
                        label=f"{label} {train_key} (avg {SMOOTH_WINDOW})")  # fmt: skip
            _plot(ax, rows, eval_key, mk, color=color, ls=ls, lw=0.8, label=f"{label} {eval_key}")
        methods = " vs ".join(dict.fromkeys(labels.get(m, m) for m, _ in runs))
        _finish(ax, f"{ylabel}: {methods}", ylabel)
    return fig


def gold_kl_points(models: dict) -> list[dict[str, Any]]:
    """One point per model with a gold score and a KL from SFT (SFT's is 0 by definition).

    Args:
        models: report_read.read_eval's models.

    Returns:
        {"label", "method", "round", "kl", "gold", "err", "bound"} per point, in eval.json order;
        err is the standard error std/sqrt(n) where the entry records n, else None; bound: `kl`
        is an upper bound (best-of-K).
    """
    points = []
    for m in models.values():
        kl = 0.0 if m["method"] == "sft" and m["kl_from_sft"] is None else m["kl_from_sft"]
        if m["gold_score"] is None or kl is None:
            continue
        std, n = m["gold_score_std"], m["n"]
        err = std / np.sqrt(n) if std is not None and n else None
        points.append(dict(label=m["label"], method=m["method"], round=m["round"], kl=kl,
                           gold=m["gold_score"], err=err, bound=m["kl_is_bound"]))  # fmt: skip
    return points


def plot_gold_kl(models: dict, labels: dict[str, str]) -> Figure | None:
    """Gold score against KL from SFT, one point per model; None unless an RLHF model has a KL.

    Args:
        models: report_read.read_eval's models (see gold_kl_points).
        labels: method -> display name, for the legend.
    """
    points = gold_kl_points(models)
    if not any(p["method"] not in ("sft", "pretrained") for p in points):
        return None
    fig, (ax,) = _figure(1)
    fig.set_size_inches(7, 5)
    spare: list[str] = []
    by_method: dict[str, list[dict]] = {}
    for p in points:
        by_method.setdefault(p["method"], []).append(p)
    for method, ps in by_method.items():
        color, marker = method_style(method, spare)
        ps = sorted(ps, key=lambda p: p["round"])
        if len(ps) > 1:  # successive rounds of one method
            ax.plot([p["kl"] for p in ps], [p["gold"] for p in ps], color=color, lw=1, alpha=0.6)
        for i, p in enumerate(ps):
            # An upper bound (best-of-K) is hollow: the true KL lies somewhere to its left.
            face = "none" if p["bound"] else color
            name = None if i else labels.get(method, method)  # one legend entry per method
            ax.errorbar(p["kl"], p["gold"], yerr=p["err"], fmt=marker, color=color, mfc=face,
                        ms=7, capsize=3, label=name)  # fmt: skip
            text = ("≤ " if p["bound"] else "") + p["label"]
            ax.annotate(text, (p["kl"], p["gold"]), xytext=(5, 4), textcoords="offset points",
                        fontsize="x-small")  # fmt: skip
    lo, hi = min(0.0, *(p["kl"] for p in points)), max(p["kl"] for p in points)
    span = (hi - lo) or 1.0
    ax.set_xlim(lo - 0.05 * span, hi + 0.25 * span)  # room for the rightmost point's label
    _finish(ax, "Gold score vs KL from SFT", "gold score", xlabel="KL from SFT (nats/seq)")
    ax.xaxis.get_major_locator().set_params(integer=False)
    return fig


def plot_rounds(rounds: list[dict], methods: list[str], labels: dict[str, str]) -> Figure | None:
    """Gold score per round of each method, and each round's RM accuracy; None under 2 rounds.

    Args:
        rounds: one {"round", "rm_accuracy", "gold": {method: score}} per round, ascending (a
            method missing from "gold" has no model that round).
        methods: the methods to draw.
        labels: method -> display name.
    """
    if len(rounds) < 2:
        return None
    fig, axes = _figure(2)
    x = np.asarray([r["round"] for r in rounds])  # [R]
    spare: list[str] = []
    panels = [(axes[0], labels.get(m, m), m, [r["gold"].get(m) for r in rounds]) for m in methods]
    panels.append((axes[1], "RM accuracy", None, [r["rm_accuracy"] for r in rounds]))
    for ax, label, method, values in panels:
        y = np.asarray([np.nan if v is None else v for v in values], np.float64)  # [R]
        ok = np.isfinite(y)  # skip the gaps, so one missing round does not cut the line
        color, marker = method_style(method, spare) if method else ("tab:gray", "o")
        if ok.any():
            ax.plot(x[ok], y[ok], "-" + marker, color=color, label=label)
    if axes[1].lines:
        axes[1].axhline(0.5, color="gray", lw=0.8, ls="--")
    _finish(axes[0], "Gold score per round", "gold score", xlabel="round")
    _finish(axes[1], "Reward model per round", "held-out pairwise accuracy", xlabel="round")
    return fig
