"""SLURM driver: writes a batch script that runs `launch.run` on every node and submits it.

  python -m launch.slurm --nodes 2 [options] -- <launch.run args>

One process per node (`--per node`, the default) sees all of its node's GPUs, so `config.mesh.ici`
is the mesh inside a node (NVLink) and `config.mesh.dcn` the mesh across nodes. One process per
GPU (`--per gpu`) makes every GPU its own process, so the whole mesh is `config.mesh.dcn`.
`launch.run` calls `jax.distributed.initialize()`, which reads the coordinator, process count and
process id from SLURM's environment; the script adds only what that auto-detection gets wrong.

Preemption: `#SBATCH --signal=TERM@N` sends SIGTERM to every task N seconds before the time
limit; each process checkpoints at the same step and exits 75. With --requeue the script then
runs `scontrol requeue`, and the job starts again later under the same id and resumes.
--dry-run prints the batch script and the sbatch command and writes nothing. No jax import.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

PREEMPTED = 75  # launch.run's exit code after a SIGTERM checkpoint


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every entry point of the project
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _seconds(time: str) -> int:
    days, _, hms = time.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def flag_value(run_args: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in the launch.run args, else None."""
    for i, a in enumerate(run_args):
        if a == f"--{name}" and i + 1 < len(run_args):
            return run_args[i + 1]
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits `argv` at the first `--` into driver options and launch.run args, and checks them."""
    if "--" in argv:
        i = argv.index("--")
        argv, run_args = argv[:i], argv[i + 1 :]
    else:
        run_args = []
    p = _Parser(
        usage="python -m launch.slurm [options] -- <launch.run args>",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument(
        "--per",
        choices=("node", "gpu"),
        default="node",
        help="one process per node (all its GPUs) or one per GPU",
    )
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="time limit, [D-]HH:MM:SS")
    p.add_argument("--job_name", help="default: the workdir's basename")
    p.add_argument(
        "--setup",
        default="source .venv/bin/activate",
        help="shell line run before srun, in the submit directory",
    )
    p.add_argument("--requeue", action="store_true", help="requeue the job when it exits 75")
    p.add_argument(
        "--signal_seconds",
        type=int,
        default=120,
        help="SIGTERM this long before the time limit, to checkpoint",
    )
    p.add_argument(
        "--script_dir", help="where the .sbatch file and log go; default: the workdir's parent"
    )
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="print, submit nothing")
    args = p.parse_args(argv)

    if args.nodes < 1 or args.gpus_per_node < 1:
        p.error("--nodes and --gpus_per_node must be >= 1")
    if args.time is not None:
        if not re.fullmatch(r"(\d+-)?\d+:\d\d:\d\d", args.time):
            p.error(f"--time {args.time!r} is not [D-]HH:MM:SS")
        if args.signal_seconds >= _seconds(args.time):
            p.error(f"--signal_seconds {args.signal_seconds} leaves no time to run in {args.time}")
    if not 0 < args.signal_seconds <= 65535:  # SLURM's limit for --signal
        p.error("--signal_seconds must be in 1..65535")
    for name in ("config", "workdir"):
        if not flag_value(run_args, name):
            p.error(
                f"the launch.run args after -- need --{name}, e.g. -- --config "
                "experiments/pretrain.py --workdir /shared/runs/x"
            )
    return args, run_args


def paths(args, run_args, cwd: str) -> tuple[str, str, str]:
    """(job name, batch script path, log path), absolute; the log name has SLURM's %j (job id)."""
    workdir = os.path.normpath(os.path.join(cwd, flag_value(run_args, "workdir")))
    job = args.job_name or os.path.basename(workdir) or "rlhf-jax"
    script_dir = os.path.join(cwd, args.script_dir) if args.script_dir else os.path.dirname(workdir)
    script_dir = os.path.normpath(script_dir)
    return job, os.path.join(script_dir, f"{job}.sbatch"), os.path.join(script_dir, f"{job}-%j.log")


def batch_script(args, run_args: list[str], cwd: str) -> str:
    """The batch script text for `sbatch`; `cwd` is where launch.run starts (relative paths)."""
    job, script, log = paths(args, run_args, cwd)
    tasks = 1 if args.per == "node" else args.gpus_per_node
    sb = [
        f"--job-name={job}",
        f"--nodes={args.nodes}",
        f"--ntasks-per-node={tasks}",
        f"--gpus-per-node={args.gpus_per_node}",
        *([f"--time={args.time}"] if args.time else []),
        *([f"--partition={args.partition}"] if args.partition else []),
        *([f"--account={args.account}"] if args.account else []),
        # To the tasks (not the batch shell): launch.run checkpoints and exits 75.
        f"--signal=TERM@{args.signal_seconds}",
        *(["--requeue"] if args.requeue else []),
        "--open-mode=append",  # a requeued job keeps its id, so its log continues
        f"--output={log}",
    ]
    lines = ["#!/bin/bash", f"# Written by `python -m launch.slurm`; submit: sbatch {script}"]
    lines += [f"#SBATCH {s}" for s in sb]
    lines += [
        "",
        "# Preemption or scancel also signal this shell; trapping TERM keeps it alive until srun",
        "# returns, so the exit-code check below still runs.",
        "trap 'echo \"launch.slurm: SIGTERM, waiting for launch.run to checkpoint\"' TERM",
        f"cd {shlex.quote(cwd)}",
        args.setup,
    ]
    srun = ["srun", f"--nodes={args.nodes}", f"--ntasks-per-node={tasks}"]
    if args.per == "node":
        ids = ",".join(str(i) for i in range(args.gpus_per_node))
        lines += [
            "# jax's SLURM auto-detection gives each process only GPU $SLURM_LOCALID; one",
            "# process per node must drive all of them.",
            f"export JAX_LOCAL_DEVICE_IDS={ids}",
        ]
    else:
        # Every task sees all of the node's GPUs and jax picks GPU $SLURM_LOCALID; binding one
        # GPU per task (--gpus-per-task=1) would renumber it 0 and break that pick.
        srun.append("--gpu-bind=none")
    lines += [
        shlex.join([*srun, "python", "-m", "launch.run", *run_args]),
        "rc=$?",
        f'if [ "$rc" -eq {PREEMPTED} ]; then',
    ]
    if args.requeue:
        lines += [
            '  echo "launch.slurm: checkpointed on SIGTERM; requeueing job $SLURM_JOB_ID"',
            '  scontrol requeue "$SLURM_JOB_ID"',
        ]
    else:
        lines.append(f'  echo "launch.slurm: checkpointed on SIGTERM; sbatch {script} resumes"')
    lines += ["fi", 'exit "$rc"']
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args, run_args = parse(sys.argv[1:] if argv is None else argv)
    cwd = os.getcwd()
    _, script, _ = paths(args, run_args, cwd)
    text = batch_script(args, run_args, cwd)
    cmd = ["sbatch", script]
    if args.dry_run:
        print(text, end="")
        print(shlex.join(cmd))
        return 0
    os.makedirs(os.path.dirname(script), exist_ok=True)  # SLURM cannot open a log in a missing dir
    with open(script, "w") as f:
        f.write(text)
    print(f"wrote {script}\n+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
