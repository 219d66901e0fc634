"""Declarative sweeps: a Python file lists the points, one command runs (or resumes) them all.

A sweep file (e.g. `experiments/sweeps/tiny_lr.py`) names the experiment config every point runs
and returns the points, one dict of config overrides each:

    CONFIG = "experiments/pretrain.py:size=tiny"   # relative to the repository root
    FIXED = {"train.steps": 20}                   # optional, shared by every point
    def get_sweep():
        return grid({"train.lr": [1e-3, 3e-3], "seed": [0, 1]})

  python -m launch.sweep run experiments/sweeps/tiny_lr.py --workdir runs/tiny_lr --parallel 2
  python -m launch.sweep collect runs/tiny_lr --x train.lr --y train/loss --logx

Each point is a `launch.run` in WORKDIR/<name> (`lr=0.001+seed=0`), logging to run.log there; a
finished one leaves sweep_point.json with its status. Running the sweep again skips the points
that are done and resumes the others from their checkpoints. `--emit slurm|tpu|local` prints the
commands for another launcher instead. `collect` (launch/sweep_collect.py) gathers every point's
final metrics into WORKDIR/sweep.csv, sweep.md and plots.

It stays one piece (a little over 400 lines): loading a sweep file, naming its points and running
or emitting them are one command's flow, and sweep files import `grid` / `zipped` / `product`
from here.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import numbers
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

# launch.run's exit code for a run that saved a checkpoint and stopped because it was told to
# (SIGTERM from a scheduler); such a point is rerun, and resumes, like a failed one.
PREEMPTED_EXIT = 75
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINT_FILE = "sweep_point.json"
SWEEP_FILE = "sweep.json"
EMIT_KINDS = ("local", "slurm", "tpu")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")  # no ",": data paths split on it
GROUP_KEY = "log.wandb.group"  # rlhf_jax/infra/tracking.py: a sweep's points group under it


# --- building the list of points -------------------------------------------------------------


def grid(d: dict[str, list]) -> list[dict]:
    """Cartesian product of the value lists, the first key varying slowest."""
    _check_lists("grid", d)
    return [dict(zip(d, combo, strict=True)) for combo in itertools.product(*d.values())]


def zipped(d: dict[str, list]) -> list[dict]:
    """The i-th point takes the i-th value of every list; the lists must be equally long."""
    _check_lists("zipped", d)
    lengths = {k: len(v) for k, v in d.items()}
    if len(set(lengths.values())) > 1:
        sizes = ", ".join(f"{k}={n}" for k, n in lengths.items())
        raise ValueError(f"zipped: the value lists differ in length: {sizes}")
    return [dict(zip(d, combo, strict=True)) for combo in zip(*d.values(), strict=True)]


def product(*sweeps: list[dict]) -> list[dict]:
    """Every combination of one point from each list, merged into one point."""
    points = []
    for combo in itertools.product(*sweeps):
        merged: dict = {}
        for part in combo:
            for k, v in part.items():
                if k in merged and merged[k] != v:
                    raise ValueError(f"product: {k!r} is set to both {merged[k]!r} and {v!r}")
                merged[k] = v
        points.append(merged)
    return points


def _check_lists(fn: str, d: dict):
    for k, v in d.items():
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{fn}: the values of {k!r} must be a list, got {v!r}")


# --- loading and naming ----------------------------------------------------------------------


@dataclass
class Sweep:
    file: str
    config: str  # path[:arg] of the experiment config, relative to the repository root
    fixed: dict
    points: list[dict]
    names: list[str]


def load_sweep(path: str) -> Sweep:
    """Loads and checks a sweep file; any problem is a ValueError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sweep file not found: {path}")
    spec = importlib.util.spec_from_file_location("_sweep_" + _UNSAFE.sub("_", path), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = getattr(module, "CONFIG", None)
    if not isinstance(config, str) or not config:
        raise ValueError(f"{path}: defines no CONFIG (e.g. 'experiments/pretrain.py:size=tiny')")
    if not os.path.isfile(os.path.join(ROOT, config.split(":", 1)[0])):
        raise ValueError(f"{path}: CONFIG {config!r} names no file under the repository root")
    if not callable(getattr(module, "get_sweep", None)):
        raise ValueError(f"{path}: defines no get_sweep() returning the list of points")
    fixed = _check_point(path, "FIXED", getattr(module, "FIXED", {}))
    points = module.get_sweep()
    if not isinstance(points, list) or not points:
        raise ValueError(f"{path}: get_sweep() must return a non-empty list of dicts")
    points = [_check_point(path, f"point {i}", p) for i, p in enumerate(points)]
    seen: dict[str, int] = {}
    for i, p in enumerate(points):
        key = repr(sorted(p.items()))  # the same overrides in another order are the same point
        if key in seen:
            raise ValueError(f"{path}: points {seen[key]} and {i} are the same: {p}")
        seen[key] = i
        both = sorted(set(p) & set(fixed))
        if both:
            raise ValueError(f"{path}: point {i} sets {both}, which FIXED sets too")
    return Sweep(path, config, fixed, points, point_names(points))


def _check_point(path: str, what: str, point) -> dict:
    """A dict of str keys to flag-able values, numpy scalars turned into Python ones."""
    if not isinstance(point, dict):
        raise ValueError(f"{path}: {what} is not a dict: {point!r}")
    out = {}
    for k, v in point.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"{path}: {what} has a key that is not a config path: {k!r}")
        out[k] = _plain(path, f"{what} {k}", v)
    return out


def _plain(path: str, what: str, v):
    if v is None or isinstance(v, (str, bool)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, (list, tuple)):
        return tuple(_plain(path, what, x) for x in v)
    raise ValueError(f"{path}: {what} = {v!r}: expected a str, bool, number or tuple")


def format_value(v) -> str:
    """A value as ml_collections' flag parser reads it back (`(1,2)` for a tuple)."""
    if isinstance(v, (list, tuple)):
        inner = ",".join(repr(x) if isinstance(x, str) else format_value(x) for x in v)
        return f"({inner}{',' if len(v) == 1 else ''})"
    if isinstance(v, (bool, str)) or v is None:
        return str(v)
    return repr(v)  # shortest round-trip form: 0.001, 1e-05


def point_names(points: list[dict]) -> list[str]:
    """`key=value,...` per point, key shortened to its last component where that is unique."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: s if last.count(s) == 1 else k for k, s in zip(keys, last, strict=True)}
    names = []
    for p in points:
        name = "+".join(f"{short[k]}={format_value(v)}" for k, v in p.items()) or "base"
        names.append(_UNSAFE.sub("_", name))
    for i, name in enumerate(names):
        j = names.index(name)
        if j != i:
            raise ValueError(f"points {points[j]} and {points[i]} both get the name {name!r}")
    return names


# --- commands --------------------------------------------------------------------------------


def run_args(sweep: Sweep, i: int, workdir: str) -> list[str]:
    """launch.run's arguments for point i in `workdir` (WORKDIR/<name>): FIXED first, then the
    point's own overrides, then the wandb group, the sweep's name (WORKDIR's), unless they set
    it: with config.log.wandb on, the points are one group in wandb (rlhf_jax/infra/tracking.py)."""
    overrides = {**sweep.fixed, **sweep.points[i]}
    if GROUP_KEY not in overrides:
        overrides[GROUP_KEY] = os.path.basename(os.path.dirname(os.path.abspath(workdir)))
    flags = [f"--config.{k}={format_value(v)}" for k, v in overrides.items()]
    return ["--config", sweep.config, "--workdir", workdir, *flags]


def emit_command(kind: str, args: list[str], launcher_args: str) -> str:
    """The shell command that runs one point through `kind`'s launcher, from the repo root."""
    extra = shlex.split(launcher_args)
    if kind == "local":
        return shlex.join(["python", "-m", "launch.run", *args])
    if kind == "slurm":
        return shlex.join(["python", "-m", "launch.slurm", *extra, "--", *args])
    if kind == "tpu":
        return shlex.join(["python", "-m", "launch.tpu", *extra, "run", "--", *args])
    raise ValueError(f"unknown --emit: {kind!r}; expected one of {EMIT_KINDS}")


def read_point(point_dir: str) -> dict | None:
    """The point's sweep_point.json, None before its first run ends."""
    path = os.path.join(point_dir, POINT_FILE)
    return _read_json(path) if os.path.exists(path) else None


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj):
    """Atomic: a reader (or a killed sweep) never sees half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def check_workdir(sweep: Sweep, workdir: str, write: bool):
    """Records the sweep in WORKDIR/sweep.json; a workdir holding another sweep is an error."""
    record = {
        "file": sweep.file,
        "config": sweep.config,
        "fixed": sweep.fixed,
        "points": [
            {"name": n, "overrides": p} for n, p in zip(sweep.names, sweep.points, strict=True)
        ],
    }
    record = json.loads(json.dumps(record))  # tuples -> lists, as they read back
    path = os.path.join(workdir, SWEEP_FILE)
    if os.path.exists(path):
        old = _read_json(path)
        for key in ("config", "fixed", "points"):
            if old.get(key) != record[key]:
                raise ValueError(
                    f"{path} records a different sweep ({key} differs, from {old.get('file')}); "
                    "use a new --workdir for a new sweep"
                )
    if write:
        os.makedirs(workdir, exist_ok=True)
        write_json(path, record)


# --- running ---------------------------------------------------------------------------------


def status_of(exit_code: int) -> str:
    if exit_code == 0:
        return "done"
    # launch.run's preemption exit, or a signal (from this sweep's stop) that ended it
    if exit_code in (PREEMPTED_EXIT, -signal.SIGTERM, -signal.SIGINT):
        return "preempted"
    return "failed"


def _last_line(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [ln.strip() for ln in f.read()[-4000:].splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_sweep(sweep: Sweep, workdir: str, parallel: int) -> int:
    """Runs every point that is not done, `parallel` at a time; returns the exit code."""
    from rlhf_jax.infra import provenance

    if parallel < 1:
        raise ValueError(f"--parallel must be at least 1, got {parallel}")
    workdir = os.path.abspath(workdir)  # the points run with the repository root as cwd
    check_workdir(sweep, workdir, write=True)
    version = provenance.code_version()
    todo, status = [], {}
    for i, name in enumerate(sweep.names):
        prev = read_point(os.path.join(workdir, name))
        if prev is not None and prev.get("status") == "done":
            print(f"skip {name} (done)", flush=True)
            status[name] = "done"
        else:
            todo.append(i)

    running: dict[int, tuple[subprocess.Popen, float, object]] = {}
    stopping = False

    def stop(signum, frame):
        # Stop starting points; ask the running ones to checkpoint and exit (launch.run treats
        # SIGTERM as a preemption), then record them as usual.
        nonlocal stopping
        stopping = True
        for proc, _, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while running or (todo and not stopping):
            while todo and len(running) < parallel and not stopping:
                i = todo.pop(0)
                point_dir = os.path.join(workdir, sweep.names[i])
                os.makedirs(point_dir, exist_ok=True)
                cmd = [sys.executable, "-m", "launch.run", *run_args(sweep, i, point_dir)]
                log = open(os.path.join(point_dir, "run.log"), "a", encoding="utf-8")  # noqa: SIM115
                proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                running[i] = (proc, time.time(), log)
                print(f"start {sweep.names[i]}", flush=True)
            for i in [i for i, (proc, _, _) in running.items() if proc.poll() is not None]:
                proc, t0, log = running.pop(i)
                log.close()
                status[sweep.names[i]] = _finish(sweep, i, workdir, proc, t0, version)
            time.sleep(0.2)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    counts = {s: list(status.values()).count(s) for s in ("done", "failed", "preempted")}
    counts["not started"] = len(sweep.names) - len(status)
    not_done = [n for n in sweep.names if status.get(n) != "done"]
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    print(f"sweep: {len(sweep.names)} points: {summary}", flush=True)
    if not_done:
        print(f"not done: {' '.join(not_done)}", flush=True)
    return 1 if not_done else 0


def _finish(sweep, i, workdir, proc, t0, version) -> str:
    name = sweep.names[i]
    point_dir = os.path.join(workdir, name)
    seconds = time.time() - t0
    status = status_of(proc.returncode)
    record = {
        "name": name,
        "overrides": sweep.points[i],
        "config": sweep.config,
        "status": status,
        "exit_code": proc.returncode,
        "seconds": round(seconds, 2),
        "command": list(proc.args),
        "code_version": version,
    }
    write_json(os.path.join(point_dir, POINT_FILE), record)
    log = os.path.join(point_dir, "run.log")
    why = "" if status == "done" else f", exit {proc.returncode}; {log}): {_last_line(log)}"
    print(f"{status} {name} ({seconds:.1f}s{why or ')'}", flush=True)
    return status


def emit(sweep: Sweep, workdir: str, kind: str, launcher_args: str, write: bool):
    """Prints one command per point that is not done; runs nothing."""
    check_workdir(sweep, workdir, write=write)
    for i, name in enumerate(sweep.names):
        point_dir = os.path.join(workdir, name)
        prev = read_point(point_dir)
        if prev is None or prev.get("status") != "done":
            print(emit_command(kind, run_args(sweep, i, point_dir), launcher_args), flush=True)


# --- command line ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, as every other entry point reports bad input (rlhf_jax/infra/cli.py).
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="python -m launch.sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) every point of a sweep file")
    run.add_argument("file", help="the sweep file, e.g. experiments/sweeps/tiny_lr.py")
    run.add_argument("--workdir", required=True, help="one subdirectory per point goes here")
    run.add_argument("--parallel", type=int, default=1, help="points running at once")
    run.add_argument("--emit", choices=EMIT_KINDS, help="print the commands, run nothing")
    run.add_argument("--launcher_args", default="", help='e.g. --launcher_args="--nodes 2"')
    run.add_argument("--dry-run", action="store_true", help="print the local commands only")
    col = sub.add_parser("collect", help="gather final metrics into sweep.csv/.md and plots")
    col.add_argument("workdir")
    col.add_argument("--metrics", default="", help="comma-separated columns to keep")
    col.add_argument("--x", default="", help="x axis of the plots: an override or metric key")
    col.add_argument("--y", default="", help="comma-separated metric keys, one plot each")
    col.add_argument("--logx", action="store_true", help="log-scale x axis")
    col.add_argument(
        "--together", action="store_true", help="all --y keys in one plot, sweep_<x>.png"
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.command == "collect":
        from launch import sweep_collect

        split = lambda s: [k for k in s.split(",") if k]
        sweep_collect.collect(
            args.workdir, split(args.metrics), args.x or None, split(args.y), args.logx,
            together=args.together,
        )  # fmt: skip
        return 0
    if args.launcher_args and args.emit not in ("slurm", "tpu"):
        raise ValueError("--launcher_args goes with --emit slurm or --emit tpu")
    sweep = load_sweep(args.file)
    if args.emit or args.dry_run:
        # --emit records sweep.json, so `collect` works once the emitted runs finish;
        # --dry-run leaves no trace.
        emit(sweep, args.workdir, args.emit or "local", args.launcher_args, write=not args.dry_run)
        return 0
    return run_sweep(sweep, args.workdir, args.parallel)


if __name__ == "__main__":
    from rlhf_jax.infra import cli

    sys.exit(cli.run_or_exit(main, sys.argv[1:]))
