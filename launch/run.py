"""The entry point: flags -> (multi-process init) -> Mesh -> the stage named by `config.stage`.

  python -m launch.run --config experiments/<name>.py[:args] --workdir DIR [--config.k=v ...]

Multi-process runs (TPU VM pod slices, SLURM, or explicit `--coordinator_address`,
`--num_processes`, `--process_id`) initialise `jax.distributed` before anything touches a device.
Bad input (unknown config key, wrong type, missing file, malformed data) ends the run with one
line on stderr and exit code 2; set RLHF_JAX_TRACEBACK=1 to see the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from rlhf_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")

STAGES = ("pretrain", "sft", "rm", "ppo", "pipeline")


def _multi_process_env() -> bool:
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    return "JAX_COORDINATOR_ADDRESS" in env


def init_distributed():
    import jax

    if _COORD.value:
        jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    elif _multi_process_env():
        jax.distributed.initialize()  # cluster auto-detection: TPU VM, SLURM, env vars


def dispatch(config, mesh, workdir):
    stage = config.stage
    if stage in ("pretrain", "sft"):
        from rlhf_jax.stages import lm

        return lm.run(config, mesh, workdir)
    if stage == "rm":
        from rlhf_jax.stages import rm

        return rm.run(config, mesh, workdir)
    if stage == "ppo":
        from rlhf_jax.stages import ppo

        return ppo.run(config, mesh, workdir)
    if stage == "pipeline":
        from rlhf_jax.stages import pipeline

        return pipeline.run(config, mesh, workdir)
    raise ValueError(f"unknown config.stage: {stage!r}; expected one of {STAGES}")


def parse_flags(argv):
    """absl flag parsing, with a bad override (unknown key, wrong type) as one line."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # absl raises several types here, ml_collections AttributeError
        text = str(e)
        if "Traceback" in text:  # an error raised inside get_config: keep its last line
            text = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = " ".join(text.replace("\\n", " ").replace("\\'", "'").split())
        if len(text) > 1 and text[0] == text[-1] == "'":
            text = text[1:-1]
        if "Did you mean" in text or isinstance(e, AttributeError):
            text = f"unknown config key {text}"
        print(f"error: bad flag or config override: {text}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax/absl info and warnings are noise
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no libtpu chatter
    init_distributed()
    os.makedirs(_WORKDIR.value, exist_ok=True)
    cli.run_or_exit(start, _CONFIG.value, _WORKDIR.value)


def start(config, workdir: str):
    """Builds the mesh, records the resolved config and runs the stage."""
    import jax

    from launch import mesh as mesh_lib

    mesh = mesh_lib.build_mesh(config.mesh)
    if jax.process_index() == 0:
        print(
            f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, "
            f"processes: {jax.process_count()}, mesh: {dict(mesh.shape)}",
            flush=True,
        )
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=1, default=str)
    dispatch(config, mesh, workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
