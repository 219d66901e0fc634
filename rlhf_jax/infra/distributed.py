"""Joining a multi-process run: `jax.distributed` before anything touches a device.

Every entry point (`launch.run` for the stages, each command-line tool in `rlhf_jax/tools/`) calls
`initialize` first. Three ways a process learns it is one of several:
  - explicit flags `--coordinator_address host:port --num_processes N --process_id i` (what
    `python -m launch.local` passes to each process it starts);
  - `JAX_COORDINATOR_ADDRESS` (and jax's own `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`) in the
    environment;
  - a cluster jax detects by itself: a TPU VM pod slice (several `TPU_WORKER_HOSTNAMES`) or a SLURM
    job with more than one task.
Otherwise the run is one process and nothing is initialised.
"""

from __future__ import annotations

import os


def multi_process_env(env=None) -> bool:
    """Whether the environment says this process is one of several (a cluster jax detects)."""
    env = os.environ if env is None else env
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    return "JAX_COORDINATOR_ADDRESS" in env


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins the run the flags or the environment describe; a no-op for one process."""
    import jax

    # The coordinator (process 0) listens only on the address it is given, not on every
    # interface (DESIGN.md §5); with cluster auto-detection jax picks and binds the address.
    if coordinator_address:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            coordinator_bind_address=coordinator_address,
        )
    elif "JAX_COORDINATOR_ADDRESS" in os.environ:
        addr = os.environ["JAX_COORDINATOR_ADDRESS"]
        jax.distributed.initialize(coordinator_bind_address=addr)
    elif multi_process_env():
        jax.distributed.initialize()  # cluster auto-detection: TPU VM, SLURM


def add_flags(parser) -> None:
    """The three flags `launch.local` passes, for an argparse command-line tool."""
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--process_id", type=int, default=None)


def initialize_from(args) -> None:
    """`initialize` with a tool's parsed `add_flags` arguments."""
    initialize(args.coordinator_address, args.num_processes, args.process_id)
