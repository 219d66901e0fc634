"""The ahead-of-time planner: compile a stage for a TPU topology on a CPU host, report its fit.

  python -m launch.aot --config experiments/<name>.py[:args] --topology v5e:2x2 \
      [--num_slices N] [--rm_size SIZE] [--only FN,...] [--out plan.json] [--config.k=v ...]

Needs `libtpu` (`pip install -e ".[tpu]"`); no TPU. Every compiled function of the stage
(rlhf_jax/stages/aot.py's `PLANNERS`: LM/SFT, RM and DPO train and eval steps; PPO's and GRPO's
rollout, score and update; rsft's rollout, RM scoring and SFT step) is compiled by the real TPU
compiler with its real shapes and shardings on the topology's devices, allocating nothing. For
each, per chip: params, optimizer state, frozen models, batch, what stays resident, temporaries,
outputs, the total against the chip's HBM; and the model FLOPs of one call, its collectives'
bytes and time on the interconnect (rlhf_jax/infra/plan_comm.py), a roofline time with that
communication overlapped and one with it serial, tokens/s, samples/s and MFU
(rlhf_jax/infra/plan.py says how each is computed). A scanned model's costs come from unrolled
2- and 4-layer compiles (rlhf_jax/stages/aot_probe.py). A PPO or GRPO
iteration, an rsft round, is bounded by the sum of its functions' roofline times, each times its
calls. The table goes to stdout and, with `--out`, the same as JSON.

A function whose arguments alone exceed HBM is not compiled. If any function does not fit, the
table is followed by `error: <function> needs X GiB per chip, <topology> chips have Y GiB` on
stderr and exit code 2; bad flags and configs are one `error:` line and exit code 2 too.
`--num_slices N` plans N slices joined over DCN (`config.mesh.dcn.data` defaults to N).
`--only rollout` compiles and reports only the functions named (no iteration bound then).

With `config.rollout.engine=paged` the sampling stages' `rollout` is the paged rollout engine's
(rlhf_jax/stages/aot_rollout.py): its row adds the engine, slots, pages, page pool bytes per chip
and the decode steps it takes.
"""

from __future__ import annotations

import os

# The planner compiles for TPU devices it builds itself; the default backend stays the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rlhf_jax.infra import cli, paths, plan  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e:2x2, v4:2x2x2, v6e:4x8.")
_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN.")
_RM_SIZE = flags.DEFINE_string(
    "rm_size",
    "",
    "PPO, GRPO, rsft: preset of the reward (and PPO's value) model when no reward workdir is "
    "here (default: the policy's).",
)
_OUT = flags.DEFINE_string("out", None, "Write the report as JSON here.")
_ONLY = flags.DEFINE_list(
    "only", [], "Plan only these functions of the stage (e.g. rollout); default: all of them."
)


def _versions() -> dict:
    import jax

    out = {"jax": jax.__version__}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        out["libtpu"] = importlib.metadata.version("libtpu")
    return out


def plan_stage(config, topology: str, num_slices: int, rm_size: str, only=()) -> dict:
    """Compiles every function of `config.stage` (those named in `only`, when given) for
    `topology`; returns the report dict."""
    from rlhf_jax.infra import mesh as mesh_lib
    from rlhf_jax.stages import aot, aot_inputs, aot_probe

    devices = plan.topology_devices(topology, num_slices)
    chip = plan.chip_of(devices)
    if num_slices > 1 and all(int(v) == 1 for v in dict(config.mesh.dcn).values()):
        config.mesh.dcn.data = num_slices
    mesh = mesh_lib.build_mesh(config.mesh, devices)
    n = len(devices)
    print(
        f"plan: {config.stage} on {topology}"
        + (f" x {num_slices} slices" if num_slices > 1 else "")
        + f": {n} x {chip.kind} ({chip.hbm_bytes / plan.GiB:.2f} GiB HBM, "
        f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bw / 1e9:.0f} GB/s); "
        f"mesh {dict(mesh.shape)}",
        flush=True,
    )
    aot_inputs.reset_layers_seen()
    fns = aot.functions(config, mesh, rm_size)
    seen = aot_inputs.layers_seen()
    unknown = set(only) - {fn.name for fn in fns}
    if unknown:
        raise ValueError(
            f"--only {sorted(unknown)}: not a function of {config.stage}; expected some of "
            f"{[fn.name for fn in fns]}"
        )
    todo, stats_of, took = [fn for fn in fns if not only or fn.name in only], {}, {}
    for fn in todo:
        t0 = time.time()
        stats = None
        if plan.chip_bytes(fn.args) + plan.chip_bytes(fn.resident) <= chip.hbm_bytes:
            stats = plan.compile_stats(fn.lower(), list(mesh.devices.flat), chip, fn.loop_trips)
        stats_of[fn.name], took[fn.name] = stats, time.time() - t0
        done = "skipped (arguments exceed HBM)" if stats is None else "compiled"
        done = "over HBM (compiler)" if stats and stats["oom"] else done
        print(f"  {fn.name}: {done} in {took[fn.name]:.1f}s; {fn.note}".rstrip("; "), flush=True)
    # Scanned layers: FLOPs and bytes from unrolled 2- and 4-layer probes (stages/aot_probe.py).
    fitted = [name for name, st in stats_of.items() if st and not st["oom"]]
    if config.model.scan_layers and fitted:
        t0 = time.time()
        for name, est in aot_probe.layer_costs(config, mesh, rm_size, fitted, seen).items():
            st = stats_of[name]
            st["scanned_compiler_flops"] = st["compiler_flops"]
            st["scanned_compiler_bytes"] = st["compiler_bytes"]
            st.update(est)
        print(f"  per-layer cost probes {seen}: {time.time() - t0:.1f}s", flush=True)
    rows = [plan.row(fn, stats_of[fn.name], chip, n, took[fn.name]) for fn in todo]
    report = {
        "command": "python -m launch.aot " + " ".join(sys.argv[1:]),
        "stage": config.stage,
        "topology": topology,
        "num_slices": num_slices,
        "chips": n,
        "chip": dataclasses.asdict(chip),
        "mesh": dict(mesh.shape),
        "versions": _versions(),
        "functions": rows,
    }
    if only:
        report["only"] = list(only)
    it = None if only else plan.iteration(rows, chip, n)  # an RL iteration, an rsft round
    if it is not None:
        report["iteration"] = it
    return report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _TOPOLOGY.value is None:
        raise app.UsageError("--config and --topology are required")
    logging.getLogger("absl").setLevel(logging.ERROR)
    paths.resolve_config(_CONFIG.value)
    report = cli.run_or_exit(
        plan_stage, _CONFIG.value, _TOPOLOGY.value, _SLICES.value, _RM_SIZE.value, _ONLY.value
    )
    print()
    print(plan.table(report["functions"]))
    if "iteration" in report:
        it = report["iteration"]
        calls = " + ".join(k + (f" x {c}" if c > 1 else "") for k, c in it["functions"].items())
        print(
            f"\n{report['stage']} iteration ({calls}): {it['roofline_s'] * 1e3:.3g} ms "
            f"overlapped ({it['samples_per_s']:,.1f} samples/s, MFU {it['mfu']:.0%}), "
            f"{it['serial_s'] * 1e3:.3g} ms serial (MFU {it['mfu_serial']:.0%})"
        )
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {_OUT.value}")
    bad = plan.first_misfit(report["functions"])
    if bad is not None:
        least = "" if bad["compiled"] else "at least "  # arguments alone, nothing compiled
        print(
            f"error: {bad['function']} needs {least}{bad['total_bytes'] / plan.GiB:.2f} GiB per "
            f"chip, {report['topology']} chips have {bad['hbm_bytes'] / plan.GiB:.2f} GiB",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
