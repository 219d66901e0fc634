"""Runs N cooperating `launch.run` processes on this machine, as a cluster would, for testing.

  python -m launch.local --processes 2 --devices_per_process 4 -- \\
      --config experiments/pretrain.py:size=tiny --workdir runs/mp
  python -m launch.local --processes 2 --devices_per_process 4 --module rlhf_jax.tools.generate \\
      -- --checkpoint runs/sft_tiny --prompts prompts.jsonl --out out.jsonl

`--module` runs another entry point that takes the same three process flags (the command-line
tools in rlhf_jax/tools/); the default is `launch.run`.

Each process gets `--coordinator_address localhost:PORT --num_processes N --process_id i` and
its own devices: on CPU, D fake host devices (XLA_FLAGS); with `--platform gpu`, D of the visible
GPUs (CUDA_VISIBLE_DEVICES). Output lines are prefixed with `[pI]`. SIGTERM or Ctrl-C is passed to
every process, so a local run shows the same preemption behaviour as a cluster job. The exit code
is the processes' common code, else the first non-zero one. `--dry-run` prints the commands.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(base: dict, i: int, devices: int, platform: str) -> dict:
    """The environment of process i: its own D devices."""
    env = dict(base)
    # The processes run in the caller's directory, so relative paths mean what the user typed;
    # the checkout stays importable from anywhere.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, base.get("PYTHONPATH", "")) if p)
    if platform == "cpu":
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * devices + d) for d in range(devices))
    return env


def commands(n: int, port: int, run_args: list[str], module: str = "launch.run") -> list[list[str]]:
    coord = f"localhost:{port}"
    return [
        [sys.executable, "-m", module, *run_args, f"--coordinator_address={coord}"]
        + [f"--num_processes={n}", f"--process_id={i}"]
        for i in range(n)
    ]


def _pump(stream, prefix: str, out):
    for line in iter(stream.readline, ""):
        out.write(f"{prefix}{line}")
        out.flush()


def run(args) -> int:
    cmds = commands(args.processes, args.port or free_port(), args.run_args, args.module)
    if args.dry_run:
        for i, cmd in enumerate(cmds):
            env = process_env({}, i, args.devices_per_process, args.platform)
            print(shlex.join([f"{k}={v}" for k, v in sorted(env.items())] + cmd))
        return 0
    procs = [
        subprocess.Popen(
            cmd,
            env=process_env(os.environ, i, args.devices_per_process, args.platform),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, cmd in enumerate(cmds)
    ]

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    pumps = [
        threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", sys.stdout), daemon=True)
        for i, p in enumerate(procs)
    ]
    for t in pumps:
        t.start()
    codes = [p.wait() for p in procs]
    for t in pumps:
        t.join(timeout=5)
    if len(set(codes)) == 1:
        return codes[0]
    print(f"[local] exit codes differ: {codes}", file=sys.stderr, flush=True)
    return next(c for c in codes if c != 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.local", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--port", type=int, default=0, help="coordinator port (default: a free one)"
    )
    parser.add_argument(
        "--module", default="launch.run", help="entry point to run (python -m MODULE)"
    )
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
    parser.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then launch.run's flags")
    args = parser.parse_args(argv)
    if args.run_args[:1] == ["--"]:
        args.run_args = args.run_args[1:]
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices_per_process must be >= 1")
    if not args.run_args:
        parser.error("give launch.run's flags after --, e.g. -- --config FILE --workdir DIR")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
