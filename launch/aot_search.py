"""The planner's search: which configuration of a stage to run on which TPU slice.

  python -m launch.aot_search --config experiments/<name>.py[:args] \\
      --topology v5e:2x2,v5e:2x4,v5e:4x4 [--rm_size SIZE] [--axes mesh,remat,...] [--lora R] \\
      [--top 3] [--max_compiles 12] [--budget_min 30] [--out search.json] [--config.k=v ...]

For each topology, every candidate along the search axes (rlhf_jax/infra/plan_search.py: mesh
splits, remat, gradient accumulation, PPO's frozen dtype, and LoRA with `--lora R`) is built as
the stage's abstract functions and ranked without compiling: candidates whose arguments alone
exceed the chip's HBM are dropped, the rest get an estimated step (or RL iteration) time from
model FLOPs and the mesh's collectives. Candidates that differ only in remat and accumulation form
a family, a ladder from its fastest member to its leanest; families are searched fastest first
(ties: the least argument bytes per chip, the most room for activations, first), each down its
ladder until a member fits (its best: the rest are no faster), compiled by the TPU compiler.
The search stops when `--top` families fit and the next one cannot beat them (its fastest member
is no faster than the slowest found), after `--max_compiles` candidates compiled a new program, or
after `--budget_min` minutes. A function whose lowered program repeats (the rollout does not
change with remat) compiles once and is looked at first; a candidate stops at its first function
that does not fit, the largest arguments (the update) tried first.

Printed per topology: every candidate compiled (per-chip GiB the compiler needs, whether it fits
and which function did not, the estimate, and for one that fits the planner's roofline bound
from its compile: an unrolled model's is `launch.aot`'s; a scanned model's is the compile's own
count, which over-counts what sits outside the layer loop, so plan the pick with `launch.aot`,
whose probes correct it), how many were dropped or refused by the stage's own checks or the
torus's shape (first reason shown), and the families that fit, by that bound; at the end the
smallest listed slice with one and the `launch.aot` line that plans it in full. Exit code 2 when
nothing fits.

Needs `libtpu` (`pip install -e ".[tpu]"`); no TPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rlhf_jax.infra import cli, paths, plan, plan_search  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=False
)
_TOPOLOGY = flags.DEFINE_list("topology", None, "TPU slices to try, e.g. v5e:2x2,v5e:2x4.")
_RM_SIZE = flags.DEFINE_string("rm_size", "", "PPO, GRPO, rsft: the reward model's preset.")
_AXES = flags.DEFINE_list("axes", list(plan_search.AXES), "Search axes.")
_LORA = flags.DEFINE_integer("lora", 0, "Also try LoRA at this rank (0: full parameters only).")
_TOP = flags.DEFINE_integer("top", 3, "Fitting candidates to find per topology.")
_MAX = flags.DEFINE_integer(
    "max_compiles", 12, "Candidates per topology that may compile a new program."
)
_BUDGET = flags.DEFINE_float(
    "budget_min", 30.0, "Start no compile after this many minutes (the search reports so far)."
)
_OUT = flags.DEFINE_string("out", None, "Write the search as JSON here.")
START = time.time()


def _ms(seconds: float) -> str:
    """Milliseconds for the printout: whole above 100, three significant digits below."""
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def _compile(fns, devices, chip, n, cache: dict) -> tuple[list[dict], int]:
    """(plan.row of the functions up to the first that does not fit, programs newly compiled).

    Each distinct lowered program compiles once across candidates; functions already compiled
    are looked at first, so a candidate whose cached program does not fit costs no compile."""
    lowered = []
    for fn in fns:
        low = fn.lower()
        lowered.append((fn, low, hashlib.sha256(low.as_text().encode()).hexdigest()))
    # The known ones first, then the largest arguments (the update, with the optimizer state),
    # the likeliest not to fit.
    lowered.sort(key=lambda x: (x[2] not in cache, -plan.chip_bytes(x[0].args)))
    rows, new = [], 0
    for fn, low, key in lowered:
        t0 = time.time()
        if key not in cache:
            cache[key] = plan.compile_stats(low, devices, chip, fn.loop_trips)
            new += 1
        rows.append(plan.row(fn, cache[key], chip, n, time.time() - t0))
        if not rows[-1]["fits"]:
            break  # the candidate does not fit: the rest need not compile
    return rows, new


def search_topology(base, topology: str, rm_size: str, cache: dict) -> dict:
    from rlhf_jax.infra import mesh as mesh_lib
    from rlhf_jax.stages import aot

    devices = plan.topology_devices(topology)
    chip, n = plan.chip_of(devices), len(devices)
    ranked, dropped, refused, n_refused = [], 0, {}, 0
    for cand in plan_search.candidates(base, topology, _AXES.value, _LORA.value):
        config = plan_search.apply(base, cand.overrides)
        try:
            mesh = mesh_lib.build_mesh(config.mesh, devices)
            fns = aot.functions(config, mesh, rm_size)
        except (ValueError, NotImplementedError) as e:  # the stage's checks, the torus's shape
            refused.setdefault(str(e).splitlines()[0][:200], cand.label())
            n_refused += 1
            continue
        est = plan_search.estimate(config, fns, mesh, chip)
        if est["arg_bytes"] > chip.hbm_bytes:
            dropped += 1
            continue
        ranked.append((est, cand, mesh, fns))
    tried, good, compiled = [], [], 0
    for ladder in plan_search.families(ranked):
        over = compiled >= _MAX.value or time.time() - START > 60 * _BUDGET.value
        # Branch and bound: a family whose fastest member is no faster than the slowest of the
        # `--top` found cannot improve on them.
        bound = len(good) >= _TOP.value and ladder[0][0]["est_s"] >= max(good)
        if over or bound:
            break
        for est, cand, mesh, fns in ladder:
            t0 = time.time()
            rows, new = _compile(fns, list(mesh.devices.flat), chip, n, cache)
            compiled += new > 0
            need = max(r["total_bytes"] for r in rows)
            ok = all(r["fits"] for r in rows)
            short = "" if ok else f" ({rows[-1]['function']})"
            bound_s = plan_search.compiled_bound(rows, chip, n)
            tried.append({"candidate": cand.label(), "overrides": cand.overrides,
                          "est_s": est["est_s"], "bound_s": bound_s, "arg_bytes": est["arg_bytes"],
                          "total_bytes": need, "fits": ok,
                          "misfit": None if ok else rows[-1]["function"], "new_programs": new,
                          "compile_s": round(time.time() - t0, 1)})  # fmt: skip
            at = "" if bound_s is None else f", bound {_ms(bound_s)} ms"
            print(f"  {topology} {cand.label()}: est {_ms(est['est_s'])} ms{at}, needs "
                  f"{need / plan.GiB:.2f} GiB per chip "
                  f"({'fits' if ok else 'does not fit'}{short}), {new} programs compiled, "
                  f"{time.time() - t0:.0f} s", flush=True)  # fmt: skip
            if ok:
                good.append(est["est_s"])
                break  # the family's best: its other members are no faster
            if compiled >= _MAX.value or time.time() - START > 60 * _BUDGET.value:
                break
    return {"topology": topology, "chips": n, "hbm_bytes": chip.hbm_bytes,
            "candidates": len(ranked) + dropped + n_refused, "ranked": len(ranked),
            "dropped_over_hbm": dropped, "refused": refused, "compiled": tried}  # fmt: skip


def _command(topology: str, overrides: dict) -> str:
    flags_ = " ".join(f"--config.{k}={v}" for k, v in overrides.items())
    rm = f" --rm_size {_RM_SIZE.value}" if _RM_SIZE.value else ""
    extra = " ".join(a for a in sys.argv[1:] if a.startswith("--config."))
    config = next(a for a in sys.argv[1:] if a.startswith("--config=") or a == "--config")
    config = config if "=" in config else f"--config {sys.argv[sys.argv.index(config) + 1]}"
    return f"python -m launch.aot {config} --topology {topology}{rm} {extra} {flags_}".replace(
        "  ", " "
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _TOPOLOGY.value:
        raise app.UsageError("--config and --topology are required")
    unknown = sorted(set(_AXES.value) - set(plan_search.AXES))
    if unknown:
        print(f"error: --axes {unknown}: expected some of {list(plan_search.AXES)}",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    logging.getLogger("absl").setLevel(logging.ERROR)
    paths.resolve_config(_CONFIG.value)
    base, cache, out = _CONFIG.value, {}, []
    order = sorted(_TOPOLOGY.value, key=lambda t: math.prod(plan.parse_topology(t)[1]))
    print(f"search: {base.stage} on {', '.join(order)}; axes {', '.join(_AXES.value)}", flush=True)
    for topology in order:
        out.append(cli.run_or_exit(search_topology, base, topology, _RM_SIZE.value, cache))
    print()
    best = None
    for res in out:
        # The fits by the compiled bound (the estimate where a bound is missing).
        good = sorted((c for c in res["compiled"] if c["fits"]),
                      key=lambda c: c["bound_s"] or c["est_s"])  # fmt: skip
        print(f"{res['topology']} ({res['chips']} chips, {res['hbm_bytes'] / plan.GiB:.2f} GiB "
              f"each): {res['candidates']} candidates, {res['dropped_over_hbm']} over HBM on "
              f"their arguments alone, {len(res['refused'])} kinds refused, "
              f"{len(res['compiled'])} compiled, {len(good)} fit")  # fmt: skip
        for reason, example in res["refused"].items():
            print(f"  refused ({example}): {reason}")
        for c in good[: _TOP.value]:
            print(
                f"  fits: {c['candidate']}: {c['total_bytes'] / plan.GiB:.2f} GiB per chip, "
                f"bound {_ms(c['bound_s'] or 0)} ms, est {_ms(c['est_s'])} ms"
            )
        if good and best is None:
            best = (res["topology"], good[0])
    report = {"command": "python -m launch.aot_search " + " ".join(sys.argv[1:]),
              "stage": base.stage, "topologies": out}  # fmt: skip
    if best is not None:
        report["smallest"] = {"topology": best[0], **best[1]}
        report["plan_command"] = _command(best[0], best[1]["overrides"])
        print(f"\nsmallest slice that fits: {best[0]} with {best[1]['candidate']}")
        print(f"plan it in full: {report['plan_command']}")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {_OUT.value}")
    if best is None:
        print("error: no candidate fits any of the topologies searched", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
