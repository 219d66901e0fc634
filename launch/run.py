"""The entry point: flags -> (multi-process init) -> Mesh -> the stage named by `config.stage`.

  python -m launch.run --config experiments/<name>.py[:args] --workdir DIR [--config.k=v ...]

Multi-process runs (TPU VM pod slices, SLURM, or explicit `--coordinator_address`,
`--num_processes`, `--process_id`) initialise `jax.distributed` before anything touches a device.
Every process checks at start-up that all processes loaded the same resolved config and the same
code (hashes, rlhf_jax/infra/provenance.py); each start appends the config hash, code version,
command and device count to `WORKDIR/run_info.jsonl` beside the resolved `WORKDIR/config.json`.

Bad input (unknown config key, wrong type, missing file, malformed data) ends the run with one
line on stderr and exit code 2; set RLHF_JAX_TRACEBACK=1 to see the traceback instead. SIGTERM
(preemption) saves a checkpoint at the same step on every process and exits with code 75;
rerunning the same command resumes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax import methods
from rlhf_jax.infra import cli, distributed, paths, preemption, provenance, tracking

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")


def dispatch(config, mesh, workdir):
    """Runs the stage module the method table (rlhf_jax/methods.py) names for config.stage."""
    return methods.stage_module(config.stage).run(config, mesh, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax/absl info and warnings are noise
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no libtpu chatter
    distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    preemption.install()
    # Paths as users type them: resolved against the current directory once, here (paths.py).
    workdir = paths.absolute(_WORKDIR.value)
    paths.resolve_config(_CONFIG.value)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        print(f"error: --workdir {workdir} exists and is not a directory", file=sys.stderr)
        sys.exit(2)
    created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
        cli.run_or_exit(start, _CONFIG.value, workdir)
    except preemption.Preempted as e:
        print(f"{e}; exit code {preemption.EXIT_CODE}", file=sys.stderr, flush=True)
        sys.exit(preemption.EXIT_CODE)
    except BaseException:
        # A start that failed before training (bad input) leaves no workdir behind when this
        # command created it, so the retry does not meet a half-made run (nor reuse a tokenizer
        # trained under the bad flags). Anything more (metrics, checkpoints, a pipeline's stage
        # directories) means work was done: that stays, to be read or resumed.
        unstarted = {"config.json", "run_info.jsonl", "tokenizer.model", "tokenizer"}
        if created and os.path.isdir(workdir) and set(os.listdir(workdir)) <= unstarted:
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def check_same_run(config_hash: str, source_hash: str):
    """Fails with one line if any process loaded a different config or different code."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return
    mine = np.frombuffer(bytes.fromhex(config_hash + source_hash), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    n = len(config_hash) // 2
    for p in range(1, every.shape[0]):
        for what, sl in (("config", slice(0, n)), ("code", slice(n, None))):
            if not np.array_equal(every[p, sl], every[0, sl]):
                raise ValueError(
                    f"process {p} loaded a different {what} than process 0 ({what} hash "
                    f"{every[p, sl].tobytes().hex()} vs {every[0, sl].tobytes().hex()}); start "
                    "every process from the same checkout with the same flags"
                )


def start(config, workdir: str):
    """Builds the mesh, records the resolved config and runs the stage."""
    import jax

    from rlhf_jax.infra import mesh as mesh_lib
    from rlhf_jax.stages import setup

    paths.check_sources(config)
    setup.check_counts(config)  # every stage's, nested pipeline stages' too
    setup.check_lora(config)  # likewise: a bad lora section stops here, in one line
    setup.check_packing(config)  # data.packing on a stage that does not pack: one line
    tracking.check(config)  # wandb on but not installed: one line, before any work
    config_hash = provenance.config_hash(config.to_dict())
    version = provenance.code_version()
    check_same_run(config_hash, version["source_hash"])
    mesh = mesh_lib.build_mesh(config.mesh)
    if jax.process_index() == 0:
        print(
            f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, "
            f"processes: {jax.process_count()}, mesh: {dict(mesh.shape)}",
            flush=True,
        )
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1, default=str)
        info = dict(
            time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            argv=sys.argv,
            config_hash=config_hash,
            code_version=version,
            processes=jax.process_count(),
            devices=jax.device_count(),
            mesh=dict(mesh.shape),
        )
        with open(os.path.join(workdir, "run_info.jsonl"), "a") as f:
            f.write(json.dumps(info) + "\n")
    dispatch(config, mesh, workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
