"""Cloud TPU VM driver: create a TPU VM or pod slice, install the project on every worker, run
`launch.run` on all workers at once, follow worker 0's log, stop the run, delete the VM.

  python -m launch.tpu --name NAME --zone ZONE --accelerator v4-8 [options] \
      ACTION [-- <launch.run args>]

ACTION is create | setup | run | logs | stop | delete | all (create, setup, run, then delete
unless --keep). It shells out to gcloud from the repository root; --dry-run prints every command,
one per line, and runs nothing. No jax import: the driver starts instantly on a laptop.

How a run lives on the workers (files in --dir): `run` starts `launch.run` detached on every worker
(setsid + nohup, so a dropped ssh connection does not kill training), appending to `run.log`,
with the job's process-group id in `run.pid` and its exit code in `run.rc`; then it follows
worker 0's log until the job ends and exits with worker 0's code. `logs` re-attaches, `stop`
sends SIGTERM to the job on every worker: each process checkpoints at the same step and exits
75, and the same `run` command later resumes.

--retries N (spot VMs): after a run ends with 75 or the connection drops (ssh's 255), the driver
asks gcloud for the VM's state. A VM that is gone or not READY (a preempted spot VM must be
deleted and created again) is recreated, set up and the run started again: it resumes from the
last checkpoint in the shared workdir. On a READY VM a dropped connection re-attaches to the log;
exit 75 there means someone stopped the run, which is not retried.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTIONS = ("create", "setup", "run", "logs", "stop", "delete", "all")
# Default runtime (--version) per accelerator family, the part of --accelerator before "-N".
RUNTIMES = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
PREEMPTED = 75  # launch.run's exit code after a SIGTERM checkpoint
SSH_LOST = 255  # ssh's code when the connection drops, e.g. the VM was preempted
LOG_LINES = 100  # lines of history `logs` shows before following
METADATA = (
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
    "worker-network-endpoints"
)
GCLOUD = ("gcloud", "compute", "tpus", "tpu-vm")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every entry point of the project
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits `argv` at the first `--` into driver options and launch.run args, and checks them."""
    if "--" in argv:
        i = argv.index("--")
        argv, run_args = argv[:i], argv[i + 1 :]
    else:
        run_args = []
    p = _Parser(
        usage="python -m launch.tpu [options] ACTION [-- <launch.run args>]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("--name", help="TPU VM name (required)")
    p.add_argument("--zone", help="zone, e.g. us-central2-b (required)")
    p.add_argument("--project", help="project; gcloud's default when left out")
    p.add_argument("--accelerator", help="accelerator type, e.g. v4-8, v5litepod-256, v5p-128")
    p.add_argument("--version", help="TPU runtime; default from the accelerator family")
    price = p.add_mutually_exclusive_group()
    price.add_argument("--spot", action="store_true", help="a spot VM (can be preempted)")
    price.add_argument("--preemptible", action="store_true", help="a legacy preemptible VM")
    p.add_argument(
        "--code",
        choices=("copy", "git"),
        default="copy",
        help="copy: `git archive HEAD` + scp; git: clone --repo at --ref on the VM",
    )
    p.add_argument("--repo", help="git URL for --code git")
    p.add_argument("--ref", default="main", help="branch or tag for --code git")
    p.add_argument("--dir", default="~/rlhf-jax", help="checkout directory on every worker")
    p.add_argument("--bucket", help="GCS bucket to mount with gcsfuse at /mnt/BUCKET")
    p.add_argument("--retries", type=int, default=0, help="recreate-and-resume attempts")
    p.add_argument("--detach", action="store_true", help="run: start and return, no log follow")
    p.add_argument("--keep", action="store_true", help="all: keep the VM after the run")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="print, run nothing")
    args = p.parse_args(argv)

    for opt in ("name", "zone"):
        if not getattr(args, opt):
            p.error(f"--{opt} is required")
    if args.retries < 0:
        p.error("--retries must be >= 0")
    recreates = args.action == "run" and args.retries > 0  # a preempted VM is created again
    if args.action in ("create", "all") or recreates:
        if not args.accelerator:
            why = " --retries (to recreate a preempted VM)" if recreates else ""
            p.error(f"--accelerator is required for {args.action}{why}")
        if not args.version:
            family = args.accelerator.rsplit("-", 1)[0]
            if family not in RUNTIMES:
                p.error(
                    f"no default runtime for accelerator {args.accelerator!r}; pass --version "
                    f"(known families: {', '.join(RUNTIMES)})"
                )
            args.version = RUNTIMES[family]
    if args.code == "git" and not args.repo and (args.action in ("setup", "all") or recreates):
        p.error("--code git needs --repo URL")
    if args.action in ("run", "all") and not run_args:
        p.error(
            f"{args.action} needs the launch.run args after --, e.g. -- --config "
            "experiments/pretrain.py --workdir /mnt/BUCKET/runs/x"
        )
    if args.action not in ("run", "all") and run_args:
        p.error(f"launch.run args after -- are used only by run and all, not {args.action}")
    return args, run_args


# ---- gcloud commands (argv lists) -------------------------------------------------------------


def _gcloud(args, verb: str, positional: list[str], *flags: str) -> list[str]:
    project = [f"--project={args.project}"] if args.project else []
    return [*GCLOUD, verb, *positional, f"--zone={args.zone}", *project, *flags]


def ssh(args, command: str, worker: str = "all") -> list[str]:
    return _gcloud(args, "ssh", [args.name], f"--worker={worker}", f"--command={command}")


def create_cmd(args) -> list[str]:
    price = ["--spot"] if args.spot else ["--preemptible"] if args.preemptible else []
    return _gcloud(
        args,
        "create",
        [args.name],
        f"--accelerator-type={args.accelerator}",
        f"--version={args.version}",
        *price,
    )


def delete_cmd(args) -> list[str]:
    return _gcloud(args, "delete", [args.name], "--quiet")


def describe_cmd(args) -> list[str]:
    return _gcloud(args, "describe", [args.name], "--format=value(state)")


# ---- shell text that runs on the workers ------------------------------------------------------


def remote_dir(path: str) -> str:
    """Shell text for a remote path; a leading `~/` stays unquoted for the worker to expand."""
    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def _tarball(args) -> str:
    return f"build/{args.name}-code.tar.gz"


def code_cmds(args) -> list[list[str]]:
    """Puts the code in --dir on every worker: a `git archive` of HEAD, or a git clone/fetch."""
    d = remote_dir(args.dir)
    if args.code == "git":
        repo, ref = shlex.quote(args.repo), shlex.quote(args.ref)
        # Idempotent, so `setup` can be run again after a push to update every worker.
        script = (
            f"if [ -d {d}/.git ]; then git -C {d} fetch --depth=1 origin {ref} "
            f"&& git -C {d} checkout --force FETCH_HEAD; "
            f"else git clone --depth=1 --branch {ref} {repo} {d}; fi"
        )
        return [ssh(args, script)]
    name = os.path.basename(_tarball(args))
    return [
        # Only committed code travels (the same on every worker, so the start-up code check holds).
        ["git", "archive", "--format=tar.gz", f"--output={_tarball(args)}", "HEAD"],
        _gcloud(args, "scp", [_tarball(args), f"{args.name}:{name}"], "--worker=all"),
        ssh(args, f"mkdir -p {d} && tar -xzf ~/{name} -C {d} && rm -f ~/{name}"),
    ]


def _mount(bucket: str) -> str:
    b, mnt = shlex.quote(bucket), shlex.quote(f"/mnt/{bucket}")
    return f"(mountpoint -q {mnt} || gcsfuse --implicit-dirs {b} {mnt})"


def setup_script(args) -> str:
    """Installs the project into DIR/.venv; with --bucket also installs gcsfuse and mounts it."""
    parts = [
        f"cd {remote_dir(args.dir)}",
        # Ubuntu's python3 lacks ensurepip (so venv) until python3-venv is installed.
        '(python3 -c "import ensurepip" 2>/dev/null'
        " || (sudo apt-get update -qq && "
        "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv))",
        "python3 -m venv .venv",
        ".venv/bin/pip install -q --upgrade pip",
        # pyproject has no tpu extra: jax[tpu] adds libtpu at the jax version pyproject allows.
        '.venv/bin/pip install -q -e . "jax[tpu]"',
    ]
    if args.bucket:
        mnt = shlex.quote(f"/mnt/{args.bucket}")
        key = "/usr/share/keyrings/cloud.google.asc"
        parts += [
            "(command -v gcsfuse >/dev/null || ("
            f"curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
            f"| sudo tee {key} >/dev/null && "
            f'echo "deb [signed-by={key}] https://packages.cloud.google.com/apt '
            f'gcsfuse-$(lsb_release -cs) main" '
            "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && "
            "sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse))",
            f'sudo mkdir -p {mnt} && sudo chown "$(id -u):$(id -g)" {mnt}',
            _mount(args.bucket),
        ]
    return " && ".join(parts)


def _running() -> str:
    return '[ -s run.pid ] && kill -0 -- -"$(cat run.pid)" 2>/dev/null'


def start_script(args, run_args: list[str]) -> str:
    """Starts launch.run detached on one worker, unless a run is already going there."""
    job = (
        # The shell survives SIGTERM to record python's exit code. A trap (unlike an ignore) is
        # reset in children, so python still sees SIGTERM. Its pid is the group `stop` signals.
        "trap true TERM; echo $$ > run.pid; "
        # launch.run initialises jax.distributed only where it sees a multi-process environment,
        # and a GCE TPU VM keeps its worker list in the metadata server, not in the environment.
        # Worker 0's address (jax's TPU coordinator port) marks one; process ids still come from
        # jax's own TPU auto-detection. Entries are "host" or "name:id:ip".
        f'ep=$(curl -sf --max-time 10 -H "Metadata-Flavor: Google" {METADATA}); '
        'if [ -n "$ep" ]; then w0=${ep%%,*}; export JAX_COORDINATOR_ADDRESS=${w0##*:}:8482; fi; '
        'echo "== launch.tpu: start $(date -u +%FT%TZ) on $(hostname)"; '
        f"PYTHONUNBUFFERED=1 .venv/bin/python -m launch.run {shlex.join(run_args)}; "
        "echo $? > run.rc"
    )
    parts = [f"cd {remote_dir(args.dir)}"]
    if args.bucket:
        parts.append(_mount(args.bucket))  # a rebooted worker has lost its mount
    parts.append(
        f'if {_running()}; then echo "launch.tpu: a run is already going on $(hostname)"; '
        f"else rm -f run.pid run.rc && "
        f"(setsid nohup bash -c {shlex.quote(job)} >> run.log 2>&1 < /dev/null &) && "
        # Return once the job has written its pid, so `stop` or a second `run` can see it.
        "for i in $(seq 100); do [ -s run.pid ] && break; sleep 0.1; done; fi"
    )
    return " && ".join(parts)


def follow_script(args) -> str:
    """Shows worker 0's log until its job ends, then exits with the job's exit code."""
    return (
        f"cd {remote_dir(args.dir)} && "
        # `logs` may come right after a detached `run` whose job has not written its pid yet.
        "for i in $(seq 10); do [ -s run.pid ] && break; sleep 1; done && "
        f'tail -n {LOG_LINES} -F --pid="$(cat run.pid)" run.log; '
        'exit "$(cat run.rc 2>/dev/null || echo 1)"'
    )


def stop_script(args) -> str:
    return (
        f"cd {remote_dir(args.dir)} && if {_running()}; then "
        'kill -TERM -- -"$(cat run.pid)" && echo "launch.tpu: sent SIGTERM on $(hostname)"; '
        'else echo "launch.tpu: no run on $(hostname)"; fi'
    )


def setup_cmds(args) -> list[list[str]]:
    return [*code_cmds(args), ssh(args, setup_script(args))]


def run_cmds(args, run_args) -> list[list[str]]:
    follow = [] if args.detach else [ssh(args, follow_script(args), worker="0")]
    return [ssh(args, start_script(args, run_args)), *follow]


# ---- execution --------------------------------------------------------------------------------


def _execute(cmd: list[str]) -> int:
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def _query(cmd: list[str]) -> tuple[int, str]:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    return proc.returncode, proc.stdout.strip()


def _steps(cmds, execute) -> int:
    """Runs commands in order; stops at (and returns) the first non-zero exit code."""
    for cmd in cmds:
        rc = execute(cmd)
        if rc:
            return rc
    return 0


def run_with_retries(args, run_args, execute, query) -> int:
    """`run`, then up to --retries recoveries from a preempted or lost VM (see the docstring)."""
    rc = _steps(run_cmds(args, run_args), execute)
    for attempt in range(1, args.retries + 1):
        if rc not in (PREEMPTED, SSH_LOST) or args.detach:
            return rc
        qrc, state = query(describe_cmd(args))
        state = state if qrc == 0 else ""
        if state == "READY":
            if rc == PREEMPTED:
                return rc  # stopped on a live VM: `launch.tpu stop`, or a signal from outside
            print("launch.tpu: connection lost; following the log again", file=sys.stderr)
            rc = execute(ssh(args, follow_script(args), worker="0"))
            continue
        print(
            f"launch.tpu: VM is {state or 'gone'}; recreating it and resuming "
            f"(retry {attempt}/{args.retries})",
            file=sys.stderr,
        )
        rebuild = ([delete_cmd(args)] if state else []) + [create_cmd(args), *setup_cmds(args)]
        rc = _steps([*rebuild, *run_cmds(args, run_args)], execute)
    return rc


def main(argv: list[str] | None = None, execute=None, query=None) -> int:
    """Runs ACTION; returns the exit code. `execute`/`query` replace subprocess in tests."""
    args, run_args = parse(sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        execute = lambda cmd: print(shlex.join(cmd), flush=True) or 0
        query = lambda cmd: (0, "READY")
    elif execute is None and args.code == "copy" and args.action in ("setup", "run", "all"):
        os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)  # for the code tarball
        if _query(["git", "status", "--porcelain", "--untracked-files=no"])[1]:
            print(
                "launch.tpu: note: uncommitted changes are not copied (git archive HEAD)",
                file=sys.stderr,
            )
    execute, query = execute or _execute, query or _query

    action = args.action
    if action == "create":
        return execute(create_cmd(args))
    if action == "setup":
        return _steps(setup_cmds(args), execute)
    if action == "run":
        return run_with_retries(args, run_args, execute, query)
    if action == "logs":
        return execute(ssh(args, follow_script(args), worker="0"))
    if action == "stop":
        return execute(ssh(args, stop_script(args)))
    if action == "delete":
        return execute(delete_cmd(args))
    if action == "all":
        rc = execute(create_cmd(args))
        if rc:  # never delete a VM this command did not create (the name may be taken)
            return rc
        rc = _steps(setup_cmds(args), execute)
        if rc == 0:
            rc = run_with_retries(args, run_args, execute, query)
        if not args.keep:  # a forgotten pod slice is expensive; the workdir holds the results
            delete_rc = execute(delete_cmd(args))
            rc = rc or delete_rc
        return rc
    raise ValueError(f"unknown action: {action!r}; expected one of {ACTIONS}")


if __name__ == "__main__":
    sys.exit(main())
