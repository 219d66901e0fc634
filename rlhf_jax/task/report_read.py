"""Reading a pipeline run directory for the report: its file layout and the eval.json contract.

This module owns what the report reads and how a bad file fails: the stages' metrics.jsonl rows,
eval.json's models and meta (with defaults for files from older versions) and timings.json. The
layout::

    <run>/{pretrain,sft,rm,<method>...}/metrics.jsonl   round 1 (see metrics.py)
    <run>/round_{r}/{rm,<iterating method>...}/metrics.jsonl   round r >= 2 of iterated RLHF
(the methods are rlhf_jax/methods.py's rows, in its order)
    <run>/eval.json      {"models": {key: {"gold_score": ..., "kl_from_sft": ..., "label": ...,
                          "method": ..., "round": ...}}, "meta": {..., "rounds": [...]}}
    <run>/timings.json   {"stage": seconds} of the pipeline's steps (else meta["timings"])

Files from before `label`/`method`/`round`/`kl_from_sft` existed still read: the label falls back
to MODELS, the method to the key. A missing file reads as None (the report says "not run"); a
malformed file is a ValueError naming it (and the line, for JSONL). Writing report.md is
report.py's; like it, this module never imports jax.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any

from rlhf_jax import methods
from rlhf_jax.task.report_plots import is_number

# The metrics.jsonl name and line contract are metrics.py's; it is not imported because it pulls
# in jax and TensorBoard (seconds of start-up) for a command that only reads JSON.
METRICS_FILE = "metrics.jsonl"
STAGES = ("pretrain", "sft", "rm", *methods.POLICY_METHODS)  # <run>/<stage>
# round r >= 2, in <run>/round_{r}/<stage>
ROUND_STAGES = ("rm", *(m.key for m in methods.METHODS if m.rounds))
# The models every pipeline run evaluates: rows say "not run" when eval.json lacks one.
MODELS = {k: methods.method(k).label for k in ("pretrained", "sft", "ppo", "ppo_ptx")}
# Display names of methods (table columns, legends), and of models whose entry has no label.
METHODS = {m.key: m.label for m in (*methods.METHODS, methods.BEST_OF_K) if m.key != "rm"}
# An alignment tax is reported for these.
RLHF_METHODS = (*methods.POLICY_METHODS, methods.BEST_OF_K.key)
NUMBERS = ("gold_score", "gold_score_std", "heldout_pretrain_loss", "rm_score")
NUMBERS += ("response_length", "finished_fraction", "kl_from_sft", "n")


def round_dirs(run_dir: str) -> list[int]:
    """The rounds r >= 2 that have a `<run_dir>/round_{r}` directory, ascending."""
    found = (re.fullmatch(r"round_(\d+)", n) for n in os.listdir(run_dir))
    rounds = (int(m[1]) for m in found if m and os.path.isdir(os.path.join(run_dir, m[0])))
    return sorted(r for r in rounds if r >= 2)


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

    Every model entry comes back with each of `NUMBERS` as a float or None, its samples, and
    `label`, `method`, `round`, `kl_is_bound` (defaults for files from before they existed: the
    MODELS/METHODS name or key, the key, 1 for RLHF methods and 0 otherwise, False). meta.rounds
    comes back as a list of {"round", "rm_accuracy", "comparisons", ...} ([] if absent).

    Raises:
        ValueError: the file is not JSON, or an entry has the wrong type (names file and key).
    """
    if (ev := read_json(path)) is None:
        return None, {}
    models, meta = ev.get("models", {}), ev.get("meta", {})
    if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        raise ValueError(f"{path}: 'models' must map model names to objects")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: 'meta' must be an object")
    out = {}
    for name, m in models.items():
        where = f"{path}: models.{name}"
        out[name] = {k: _num(m, k, where) for k in NUMBERS}
        method = _typed(m, "method", str, name, where)
        out[name]["method"] = method
        out[name]["label"] = _typed(m, "label", str, METHODS.get(name, name), where)
        out[name]["round"] = _typed(m, "round", int, int(method in RLHF_METHODS), where)
        out[name]["kl_is_bound"] = _typed(m, "kl_is_bound", bool, False, where)
        samples = m.get("samples") or []
        if not isinstance(samples, list) or not all(isinstance(s, dict) for s in samples):
            raise ValueError(f"{path}: models.{name}.samples must be a list of objects")
        for s in samples:
            s["gold"] = _num(s, "gold", f"{path}: models.{name}.samples")
        out[name]["samples"] = samples
    _num(meta, "elapsed_seconds", f"{path}: meta")
    if not isinstance(meta.get("timings", {}), dict):
        raise ValueError(f"{path}: meta.timings must map stage names to seconds")
    rounds = meta.get("rounds") or []
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        raise ValueError(f"{path}: meta.rounds must be a list of objects")
    for i, r in enumerate(rounds):
        where = f"{path}: meta.rounds[{i}]"
        if not isinstance(r.get("round"), int) or isinstance(r["round"], bool):
            raise ValueError(f"{where}: round is {r.get('round')!r}; expected an integer")
        r.update({k: _num(r, k, where) for k in ("rm_accuracy", "comparisons")})
    meta["rounds"] = rounds
    return out, meta


def read_json(path: str) -> dict | None:
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


def _num(entry: dict, key: str, where: str) -> float | None:
    v = entry.get(key)
    if v is not None and not is_number(v):
        raise ValueError(f"{where}: {key} is {v!r}; expected a number")
    return None if v is None else float(v)


def _typed(entry: dict, key: str, kind: type, default: Any, where: str) -> Any:
    """entry[key] if it is a `kind` (bool is no int here), `default` if absent or null."""
    v = entry.get(key)
    if v is None:
        return default
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise ValueError(f"{where}: {key} is {v!r}; expected {kind.__name__}")
    return v


def split_stage(stage: str) -> tuple[int, str]:
    """(round, stage) of a stage directory name: "ppo" -> (1, "ppo"), "round_2/rm" -> (2, "rm")."""
    head, _, base = stage.rpartition("/")
    return (int(head.removeprefix("round_")) if head else 1), base
