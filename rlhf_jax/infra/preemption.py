"""Preemption: SIGTERM -> every process checkpoints the same step -> exit code 75 -> rerun resumes.

TPU spot VMs and SLURM (at preemption, or `--signal=TERM@N` before the time limit) send SIGTERM,
often to one host first. The processes of a multi-process run must stop at the SAME step or the
collective checkpoint save would hang, so they agree through JAX's preemption sync point: the
coordination service catches SIGTERM on any process, tells the others, and
`reached_preemption_sync_point(step)` returns True on every process at one common step. A
single-process run has no coordination service; a Python SIGTERM handler sets a flag instead.

Training loops call `stop_requested()` once per step (cheap: a flag read). When it is True
they save a checkpoint at that step and raise `Preempted`; `launch.run` turns that into exit code
`EXIT_CODE`, which the SLURM script requeues on and the TPU script retries on. Steps between
stages (sampling, evaluation) call `check()`, which raises as soon as a signal has arrived.
"""

from __future__ import annotations

import signal
import threading

import jax

EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", i.e. rerun the same command to resume
_requested = threading.Event()
_installed = False
_calls = 0


class Preempted(Exception):
    """Raised after the checkpoint at `step` is written; the run exits with EXIT_CODE."""

    def __init__(self, step: int | None, where: str):
        self.step = step
        at = f" at step {step} (checkpoint saved)" if step is not None else ""
        super().__init__(f"preempted{at} in {where}; rerun the same command to resume")


def install():
    """Catches SIGTERM in a single-process run (multi-process runs rely on jax.distributed's)."""
    global _installed
    if _installed or jax.process_count() > 1:
        return
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread (e.g. not in some tests)
    signal.signal(signal.SIGTERM, lambda signum, frame: _requested.set())
    _installed = True


def stop_requested() -> bool:
    """True on every process at the same call once any process has received SIGTERM.

    Every process must make the same sequence of calls (one per training step). The sync point
    needs ids that only grow, and a pipeline restarts its step count at every stage, so the id is
    the number of calls so far in this process, not the stage's step.
    """
    global _calls
    _calls += 1
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return bool(multihost_utils.reached_preemption_sync_point(_calls))
    return _requested.is_set()


def check(where: str):
    """Raises Preempted (no checkpoint) if a single-process run has received SIGTERM.

    For boundaries between stages, where there is nothing to save: the finished stages are on disk.
    """
    if _requested.is_set():
        raise Preempted(None, where)


def reset():
    """Forgets a received signal (for tests that run several stages in one process)."""
    _requested.clear()
