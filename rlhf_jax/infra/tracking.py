"""Experiment tracking in Weights & Biases (`config.log.wandb`), beside JSONL and TensorBoard.

Off by default (mode "disabled"), and then `wandb` is never imported: it is an optional extra
(`pip install -e '.[wandb]'`). With mode "online" or "offline", process 0 starts one wandb run per
stage run (other processes log nothing, as in metrics.py); the run records the resolved config
flattened to dotted keys (`train.lr`), every row metrics.jsonl gets at the same step, the samples
texts as `wandb.Table`s, and, for a pipeline, its report's plots as `wandb.Image`s.

A run's id is kept in `<workdir>/wandb_run.json`: a preempted or killed run started again with
the same command resumes the same wandb run, so its curves continue. Offline runs are written
under `<workdir>/wandb/` (or `$WANDB_DIR`) and uploaded later with `wandb sync`.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Mapping
from typing import Any

MODES = ("disabled", "offline", "online")
RUN_FILE = "wandb_run.json"


def _section(config):
    """config.log.wandb, or None for a config built without one (hand-made test configs)."""
    log = config.get("log") if hasattr(config, "get") else None
    return None if log is None else log.get("wandb")


def check(config):
    """Fails early, in one line, on a bad `log.wandb.mode` or a missing `wandb` when it is on.

    Raises:
        ValueError: the mode is unknown, or wandb is not installed and the mode is not disabled.
    """
    w = _section(config)
    if w is None:
        return
    if w.mode not in MODES:
        raise ValueError(f"unknown config.log.wandb.mode: {w.mode!r}; expected one of {MODES}")
    if w.mode != "disabled":
        _import(w.mode)


def _import(mode: str):
    try:
        import wandb
    except ImportError:
        raise ValueError(
            f"config.log.wandb.mode={mode!r} needs the wandb package, which is not installed: "
            "pip install -e '.[wandb]' (or leave config.log.wandb.mode='disabled')"
        ) from None
    return wandb


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"train.lr": 0.001, ...}: wandb's run table compares flat keys."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif value is None or isinstance(value, (str, bool, int, float, list, tuple)):
            out[name] = value
        else:  # what config.json writes with default=str (e.g. a dtype)
            out[name] = str(value)
    return out


def nest(config, parent_config, parent_workdir: str, workdir: str):
    """Sets `config.log` for a run started inside another run's workdir (a pipeline's stages,
    rsft's rounds): the parent's settings, named `<parent name>/<path below it>` and grouped
    with the parent, so one pipeline's runs sit together in wandb."""
    w, parent = _section(config), _section(parent_config)
    if w is None or parent is None:
        return
    w.update(parent.to_dict())
    name = parent.name or _basename(parent_workdir)
    w.name = f"{name}/{os.path.relpath(workdir, parent_workdir)}"
    w.group = parent.group or name


def _basename(workdir: str) -> str:
    return os.path.basename(os.path.normpath(os.path.abspath(workdir)))


def start(config, workdir: str, *, parent: bool = False) -> Tracker | None:
    """Starts (or resumes) the wandb run of the stage run in `workdir`.

    Args:
        config: the run's resolved config (its `log.wandb` section and `stage`).
        workdir: the run's workdir; keeps the run id in `wandb_run.json`.
        parent: a run other runs nest in (pipeline, rsft): grouped under its own name when
            `log.wandb.group` is empty, as `nest` groups its children.

    Returns:
        A Tracker, or None when tracking is disabled or this is not process 0.

    Raises:
        ValueError: wandb is missing, or wandb.init failed (e.g. online without a login).
    """
    import jax  # here: launch/run.py imports this module before jax.distributed starts

    w = _section(config)
    if w is None or w.mode == "disabled" or jax.process_index() != 0:
        return None
    check(config)
    wandb = _import(w.mode)
    path = os.path.join(workdir, RUN_FILE)
    run_id = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            run_id = json.load(f)["id"]
    name = w.name or _basename(workdir)
    try:
        run = wandb.init(
            project=w.project or None,
            entity=w.entity or None,
            group=w.group or (name if parent else None),
            name=name,
            job_type=config.get("stage") or None,
            id=run_id,
            resume="allow" if run_id else None,
            mode=w.mode,
            dir=os.environ.get("WANDB_DIR") or workdir,
            config=flatten(config.to_dict()),
            # A pipeline's stage (and rsft's rounds) start their runs while the parent's is open.
            settings=wandb.Settings(reinit="create_new"),
        )
    except Exception as e:  # wandb's own error types; the entry reports it in one line
        raise ValueError(
            f"wandb.init failed in mode {w.mode!r}: {e} (`wandb login` or WANDB_API_KEY for "
            "online runs; config.log.wandb.mode='offline' needs neither)"
        ) from None
    if run_id is None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"id": run.id, "project": w.project, "entity": w.entity}, f)
        os.replace(tmp, path)
    return Tracker(run, wandb)


class Tracker:
    """One wandb run: what MetricsWriter and the pipeline's report send it."""

    def __init__(self, run, wandb):
        self.run = run
        self._wandb = wandb
        # A resumed online run continues at its last logged step + 1; the steps before it that
        # the restarted run logs again (after the checkpoint, before the kill) are already there
        # with the same values (resume is bitwise), and wandb would refuse them with a warning.
        self._first = run.step

    def log(self, step: int | None, row: Mapping[str, Any]):
        """Logs `row` at `step` (None: the run's next step, for runs without a training step)."""
        if step is None:
            self.run.log(dict(row))
        elif step >= self._first:
            self.run.log(dict(row), step=step)

    def log_text(self, step: int, key: str, text: str):
        """A samples text (SFT's eval samples, PPO's sample table) as a wandb.Table."""
        columns, rows = text_table(text)
        self.log(step, {key: self._wandb.Table(columns=columns, data=rows)})

    def table(self, columns: list[str], rows: list[list]):
        return self._wandb.Table(columns=columns, data=rows)

    def image(self, path: str):
        return self._wandb.Image(path)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb):
        self.finish(exc)

    def finish(self, error: BaseException | None = None):
        """Ends the run: finished, failed (exit code 1) or preempting (it will be resumed)."""
        from rlhf_jax.infra import preemption

        if isinstance(error, preemption.Preempted):
            self.run.mark_preempting()
            self.run.finish(exit_code=preemption.EXIT_CODE)
        else:
            self.run.finish(exit_code=0 if error is None else 1)


# "[+0.123] 'prompt' -> 'response'": a row of PPO's sample table (stages/ppo.py sample_table).
_SCORED = re.compile(r"^\[(?P<score>[^\]]+)\] (?P<rest>.*)$")
# SFT's eval samples (stages/samples.py): a "step N" line, then per prompt three lines.
_SFT = re.compile(r"prompt: (.*)\n  sample: (.*?)( \[no EOS\])?\n  reference: (.*)")


def text_table(text: str) -> tuple[list[str], list[list]]:
    """(columns, rows) of a samples text: prompt/response/score for PPO's table, prompt/sample/
    finished/reference for SFT's samples, one row per line for any other text."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    scored = [_scored_row(ln) for ln in lines]
    if scored and all(r is not None for r in scored):
        return ["score", "prompt", "response"], scored
    blocks = _SFT.findall(text)
    if blocks and all(_literal(p) is not None for p, _, _, _ in blocks):
        rows = [[_literal(p), _literal(s), not eos, _literal(r)] for p, s, eos, r in blocks]
        return ["prompt", "sample", "finished", "reference"], rows
    return ["text"], [[ln] for ln in lines]


def _scored_row(line: str) -> list | None:
    m = _SCORED.match(line)
    if m is None:
        return None
    try:
        score = float(m["score"])
    except ValueError:
        return None
    # The prompt may itself hold " -> ": the split is the one where both sides are str literals.
    parts = m["rest"].split(" -> ")
    for i in range(1, len(parts)):
        prompt, response = _literal(" -> ".join(parts[:i])), _literal(" -> ".join(parts[i:]))
        if prompt is not None and response is not None:
            return [score, prompt, response]
    return None


def _literal(s: str) -> str | None:
    try:
        value = ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, str) else None
