"""The planner's arithmetic: TPU chips, per-chip bytes, model FLOPs, the roofline, the report.

`python -m launch.aot` compiles a stage's functions for a TPU topology from a CPU host
(rlhf_jax/stages/aot.py builds them with abstract inputs). This module owns what it does with
them: the TPU topology's devices, the chip table, the bytes each sharded pytree takes on one chip,
the compiled executable's memory and cost, the model FLOPs of a forward pass, the roofline time and
the report (rows, table, fit check). Nothing here allocates device memory.

Why not the compiler's own estimates: XLA's cost analysis counts a loop body once (a PPO update of
4 epochs x 4 minibatches reads as one minibatch, a scanned model as one layer) and its
`optimal_seconds` has come out negative. So FLOPs come from the model (2 N per token and pass plus
attention, times every loop trip), bytes from the compiler scaled to every trip (a scanned model's
layers from unrolled 2- and 4-layer probes, stages/aot_probe.py), and the time is a roofline
against the chip's peaks.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import tempfile

import jax
import numpy as np

from rlhf_jax.infra import plan_comm
from rlhf_jax.models import config as model_config

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: float  # HBM the compiler may use per chip
    hbm_bw: float  # HBM bytes/s per chip
    megacore: bool  # two TensorCores driven as one device (v4, v5p)
    ici_link_bw: float = 0.0  # bidirectional bytes/s of one ICI port (per-chip figure / ports)
    dcn_bw: float | None = None  # data-center network bytes/s per chip; None: no sourced figure


# Dense bf16 peak FLOP/s and HBM bandwidth (bytes/s) per chip, the one table behind MFU (stages),
# the decode roofline (bench) and the planner: vendor datasheets, the TPU rows the Cloud TPU docs'
# system-architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e). Matched as
# substrings of `device_kind` in this order, so "H100 PCIe" wins over the SXM part's "H100".
PEAKS = {
    "H100 PCIe": (756e12, 2.0e12),
    "H100": (989.4e12, 3.35e12),
    "H200": (989.4e12, 4.8e12),
    "A100": (312e12, 2.039e12),
    "TPU v4": (275e12, 1.2e12),
    "TPU v5 lite": (197e12, 8.19e11),
    "TPU v5e": (197e12, 8.19e11),
    "TPU v5p": (459e12, 2.765e12),
    "TPU v6 lite": (918e12, 1.638e12),
    "TPU v6e": (918e12, 1.638e12),
}


def _peaks(device) -> tuple[float, float] | None:
    kind = device.device_kind.lower()
    return next((p for name, p in PEAKS.items() if name.lower() in kind), None)


def peak_flops(device) -> float | None:
    """Dense bf16 FLOP/s of one `device`, None for an unknown kind (CPU)."""
    p = _peaks(device)
    return p[0] if p else None


def peak_hbm_bw(device) -> float | None:
    """HBM bytes/s of one `device`, None for an unknown kind (CPU)."""
    p = _peaks(device)
    return p[1] if p else None


def _chip(kind: str, hbm_gib: float, megacore: bool, ici: float, dcn_gbps: float | None) -> Chip:
    flops, bw = PEAKS[kind]
    dcn = None if dcn_gbps is None else dcn_gbps * 1e9 / 8
    return Chip(kind, flops, hbm_gib * GiB, bw, megacore, ici, dcn)


# HBM: the capacity the TPU compiler itself allows per chip (its RESOURCE_EXHAUSTED message,
# libtpu 0.0.42.1), a little under the docs' 32 GiB / 16 GB / 95 GB / 32 GB since the runtime
# keeps some back.
# ICI, bidirectional bytes/s per port: the Cloud TPU docs' per-chip bidirectional ICI bandwidth
# over the chip's ports (cloud.google.com/tpu/docs/v5e: 400 GB/s, 4 ports; /v5p: 1,200 GB/s, a
# 3D torus, 6 ports; /v6e: 800 GB/s, 4 ports); v4 from the TPU v4 paper (Jouppi et al., ISCA
# 2023: 6 links of 50 GB/s each way). DCN per chip: v5p 50 Gb/s (docs/v5p); v5e 25 Gb/s (docs/v5e:
# 2 x 100 Gb/s NICs per 8-chip host, 6.4 Tb/s per 256-chip pod); v4 and v6e have no per-chip
# figure in those pages, so their DCN time is reported unknown rather than guessed.
CHIPS = {
    "v4": _chip("TPU v4", 30.75, True, 100e9, None),
    "v5e": _chip("TPU v5e", 15.75, False, 100e9, 25),
    "v5p": _chip("TPU v5p", 95.74, True, 200e9, 50),
    "v6e": _chip("TPU v6e", 31.25, False, 200e9, None),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e"}


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """ "v5e:2x2" -> ("v5e", (2, 2)); one clear error for anything else."""
    gen, _, dims = name.partition(":")
    gen = _ALIASES.get(gen.lower(), gen.lower())
    try:
        shape = tuple(int(x) for x in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if gen not in CHIPS or not shape or min(shape) < 1:
        raise ValueError(
            f"--topology {name!r} is not GENERATION:AxB[xC] with a generation among "
            f"{tuple(CHIPS)} (e.g. v5e:2x2, v4:2x2x2, v5p:4x4x4, v6e:4x8)"
        )
    return gen, shape


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The compile-only devices of `num_slices` TPU slices of topology `name` (libtpu on a CPU).

    Megacore chips (v4, v5p) are one device each, as JAX uses them on a TPU VM; a slice smaller
    than a host (v5e:1x1) is its own host.
    """
    gen, shape = parse_topology(name)
    chip = CHIPS[gen]
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax always ships it
        raise ValueError(f"this jax has no TPU topology API: {e}") from None
    chips = math.prod(shape)
    # libtpu reads these at start-up; without them it warns that it is not on a TPU VM.
    kind = {"v4": "v4", "v5p": "v5p", "v5e": "v5litepod", "v6e": "v6e"}[gen]
    cores = chips * (2 if chip.megacore else 1)
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{kind}-{cores}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu guards the chips with a lockfile; compiling touches none, and planners (a test
    # process and the command it starts) may run side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # libtpu 0.0.42.1's compiler overflows its fiber stacks on some large dots (GPT-2 small's RM
    # eval step, 576 x 1024 tokens, dies with SIGSEGV); 256 MiB stacks (virtual memory) compile it.
    args = os.environ.get("LIBTPU_INIT_ARGS", "")
    if "fibers_default_thread_stack_size" not in args:
        flag = f"--fibers_default_thread_stack_size={256 * 2**20}"
        os.environ["LIBTPU_INIT_ARGS"] = f"{args} {flag}".strip()
    kw = dict(chip_config_name="megacore" if chip.megacore else "default", num_slices=num_slices)
    padded = (shape + (1, 1, 1))[:3]
    if chips < 4:  # hosts hold 2x2 chips; a smaller slice is one host
        kw["chips_per_host_bounds"] = padded
    topo_name = f"{'v5' if gen == 'v5p' else gen}:{'x'.join(map(str, shape))}"
    try:
        devices = topologies.get_topology_desc(topo_name, "tpu", **kw).devices
    except RuntimeError as e:  # no libtpu, or a shape libtpu refuses
        raise ValueError(f"cannot build TPU topology {name!r}: {str(e).splitlines()[0]}") from None
    return list(devices)


def chip_of(devices) -> Chip:
    kind = devices[0].device_kind.lower()
    for gen, key in (("v5e", "v5 lite"), ("v6e", "v6"), ("v5p", "v5"), ("v4", "v4")):
        if key in kind:
            return CHIPS[gen]
    raise ValueError(f"no chip peaks known for device kind {devices[0].device_kind!r}")


def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # a threefry key is two uint32
    return np.dtype(dtype).itemsize


def chip_bytes(tree) -> int:
    """Bytes one chip holds of a pytree of ShapeDtypeStructs with NamedShardings (the largest
    shard; replicated leaves count in full)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * _itemsize(x.dtype)
    return total


def gathered_bytes(tree, dtype, keep=("tensor",)) -> int:
    """Bytes one chip reads of a param pytree once its FSDP shards are all-gathered for a matmul:
    only the `keep` mesh axes (tensor parallelism) still split it, in the compute `dtype`."""
    total = 0
    for x in jax.tree.leaves(tree):
        spec = getattr(x.sharding, "spec", ())
        shape = list(x.shape)
        for i, axes in enumerate(spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            shape[i] //= math.prod(x.sharding.mesh.shape[a] for a in axes if a in keep)
        total += math.prod(shape) * np.dtype(dtype).itemsize
    return total


def matmul_params(cfg: model_config.ModelConfig, params) -> tuple[int, int]:
    """(body, head): parameters that multiply activations in the blocks and in the head.

    Embedding lookups cost no FLOPs, so the embedding and GPT-2's position table are left out;
    the head is the unembedding (V x D, the tied table counted here once) or the scalar read-out.
    With a tied LM head, body + head is `param_count(exclude_positions=True)`, the N of 6 N.
    """
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    tables = sum(
        math.prod(x.shape)
        for k, x in params.items()
        if k in ("embed", "pos_embed", "lm_head", "score_head", "score_bias")
    )
    head = cfg.d_model if cfg.head == "scalar" else cfg.vocab_size * cfg.d_model
    return total - tables, head


def forward_flops(cfg, params, tokens: int, ctx: int, head_tokens: int | None = None) -> float:
    """FLOPs of one forward pass over `tokens` tokens attending to `ctx` keys each, with the
    head applied to `head_tokens` of them (default all): 2 per weight and token, and 4 (N H)
    per token and key for the scores and the weighted sum in each layer, a sliding-window layer
    counting at most its window of keys. Training is 3x this (the backward pass is twice the
    forward), as in `stages/setup.flops_per_token`."""
    body, head = matmul_params(cfg, params)
    head_tokens = tokens if head_tokens is None else head_tokens
    attn = 4 * cfg.n_heads * cfg.head_dim * tokens * cfg.attended_keys(ctx)
    return 2 * body * tokens + 2 * head * head_tokens + attn


def remat_factor(cfg) -> float:
    """Hardware FLOPs over model FLOPs of a training pass: full remat reruns the forward."""
    return 4 / 3 if cfg.remat == "full" else 1.0


_OOM = re.compile(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def compile_stats(lowered, devices=None, chip=None, dynamic_trips: int = 1) -> dict:
    """Memory (per chip) and cost of compiling `lowered`; an over-HBM compile is a result, not an
    error: {"oom": True, "needed_bytes": what the compiler said it needs}.

    With `devices` (the program's device assignment, the mesh's devices in order) and `chip`,
    also its communication (infra/plan_comm.py), read from the compiler's dump of the program
    after SPMD partitioning; loops whose trip count is not a constant count `dynamic_trips`."""
    with tempfile.TemporaryDirectory(prefix="rlhf-jax-plan-") as dump:
        options = {}
        if devices is not None:
            options = {
                "xla_dump_to": dump,
                "xla_dump_hlo_pass_re": "spmd-partitioning",
                "xla_dump_hlo_as_text": True,
            }
        try:
            compiled = lowered.compile(options) if options else lowered.compile()
        except Exception as e:  # JaxRuntimeError; its type moved between jax versions
            m = _OOM.search(str(e))
            if "RESOURCE_EXHAUSTED" not in str(e) or not m:
                raise
            return {"oom": True, "needed_bytes": float(m.group(1)) * GiB}
        comm = None
        names = sorted(glob.glob(os.path.join(dump, "*.txt")))
        # "...after_tpu-spmd-partitioning.before_...": the program the partitioner produced (not
        # "after_dce.before_tpu-spmd-partitioning", its input).
        files = [f for f in names if re.search(r"after_[\w-]*spmd-partitioning\.", f)]
        if files:
            with open(files[-1]) as f:
                colls = plan_comm.collectives(f.read(), len(devices), dynamic_trips)
            comm = plan_comm.summary(colls, devices, chip)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost  # a list in older jax
    return {
        "oom": False,
        "argument_bytes": mem.argument_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
        "alias_bytes": mem.alias_size_in_bytes,
        "temp_bytes": mem.temp_size_in_bytes,
        "code_bytes": mem.generated_code_size_in_bytes,
        "compiler_flops": float(cost.get("flops", 0.0)),
        "compiler_bytes": float(cost.get("bytes accessed", 0.0)),
        "comm": comm,
    }


def row(fn, stats: dict, chip: Chip, n_chips: int, compile_s: float) -> dict:
    """One report row: a function's per-chip memory, FLOPs, roofline time and rates.

    `fn` is a stages/aot.py Function. Memory in use during the call = the compiler's arguments +
    outputs - aliased (donated) + temporaries + code, plus what stays resident without being an
    argument (e.g. the optimizer state while the sampler runs). Bytes moved = the compiler's
    bytes accessed scaled by model FLOPs over the FLOPs it counted: it saw each loop body once,
    and the unseen trips are taken to move bytes at the rate of the one it saw (exact for
    identical trips such as microbatches or PPO minibatches), plus the decode loop's per-token
    reads. With `scan_layers` the counts are not the scanned compile's (one layer seen, the
    optimizer and head outside the loop) but stages/aot_probe.py's from unrolled 2- and 4-layer
    compiles, every layer counted and the outside part once (`probes` in the row).

    Communication (`comm`, from `compile_stats`): the collectives' time at the links' bandwidth
    (infra/plan_comm.py). `roofline_s` is the bound with it overlapped with compute and HBM
    traffic, max(compute, comm); `serial_s` the bound with none overlapped, compute + comm. A
    row without `comm` (the compiler wrote no partitioned program) counts none.
    """
    r = {
        "function": fn.name,
        "params_bytes": chip_bytes(fn.parts.get("params")),
        "opt_state_bytes": chip_bytes(fn.parts.get("opt_state")),
        "frozen_bytes": chip_bytes(fn.parts.get("frozen")),
        "batch_bytes": chip_bytes(fn.parts.get("batch")),
        "resident_bytes": chip_bytes(fn.resident),
        "hbm_bytes": chip.hbm_bytes,
        "model_flops": fn.flops,
        "tokens": fn.tokens,
        "samples": fn.samples,
        "compile_s": round(compile_s, 1),
        "note": fn.note,
        "calls": fn.calls,
        **fn.extra,
    }
    if stats is None or stats["oom"]:
        args = r["params_bytes"] + r["opt_state_bytes"] + r["frozen_bytes"] + r["batch_bytes"]
        need = stats["needed_bytes"] if stats else args
        r.update(compiled=stats is not None, total_bytes=need + r["resident_bytes"])
        r["headroom_bytes"] = chip.hbm_bytes - r["total_bytes"]
        r["fits"] = False
        return r
    r.update({k: v for k, v in stats.items() if k not in ("oom", "comm")}, compiled=True)
    total = stats["argument_bytes"] + stats["output_bytes"] - stats["alias_bytes"]
    total += stats["temp_bytes"] + stats["code_bytes"] + r["resident_bytes"]
    r.update(total_bytes=total, headroom_bytes=chip.hbm_bytes - total)
    r["fits"] = total <= chip.hbm_bytes
    flops_chip = fn.flops * fn.hw_factor / n_chips
    seen = max(stats["compiler_flops"], 1.0)
    moved = stats["compiler_bytes"] * max(1.0, (fn.flops_seen or flops_chip) / seen)
    moved += fn.loop_bytes
    t_flops, t_bytes = flops_chip / chip.peak_flops, moved / chip.hbm_bw
    comm = stats.get("comm")
    t_comm = comm["comm_s"] if comm else 0.0
    t_chip = max(t_flops, t_bytes, 1e-12)
    t = max(t_chip, t_comm)  # communication overlapped with compute
    serial = t_chip + t_comm  # none of it overlapped
    bound = "compute" if t_flops >= t_bytes else "memory"
    if t_comm > t_chip:
        bound = "communication"
    r.update(
        flops_per_chip=flops_chip,
        bytes_per_chip=moved,
        roofline_s=t,
        serial_s=serial,
        compute_s=t_chip,
        comm_s=t_comm,
        bound=bound,
        tokens_per_s=fn.tokens / t,
        samples_per_s=fn.samples / t,
        mfu=fn.flops / (n_chips * chip.peak_flops * t),
        mfu_serial=fn.flops / (n_chips * chip.peak_flops * serial),
    )
    if comm is not None:
        r["comm"] = comm
    return r


def _size(x) -> str:
    """Bytes for a table cell: GiB with two decimals, MiB or KiB below 1 GiB (tiny models)."""
    if x is None:
        return "-"
    for unit, scale in (("G", GiB), ("M", 2**20), ("K", 2**10)):
        if abs(x) >= scale or unit == "K":
            return f"{x / scale:.2f}{unit}" if unit == "G" else f"{x / scale:.1f}{unit}"
    return str(x)


def table(rows: list[dict]) -> str:
    """The report as two plain-text tables: memory per chip, and speed at the roofline."""
    mem_cols = ("params", "opt_state", "frozen", "batch", "resident", "temp", "output", "total")
    head = ["function"] + list(mem_cols) + ["HBM", "headroom", "fits"]
    lines = [head]
    for r in rows:
        vals = [r["function"]]
        for c in mem_cols:
            vals.append(_size(r.get(f"{c}_bytes")))
        vals += [_size(r["hbm_bytes"]), _size(r["headroom_bytes"]), "yes" if r["fits"] else "NO"]
        lines.append(vals)
    out = [_format(lines, "memory per chip (G = GiB, M = MiB, K = KiB)")]
    head = ["function", "TFLOP/call", "compute ms", "comm ms", "bound ms", "serial ms", "bound"]
    speed = [head + ["tokens/s", "samples/s", "MFU", "MFU serial"]]
    for r in rows:
        if "roofline_s" not in r:
            why = "over HBM" if r["compiled"] else "not compiled: arguments exceed HBM"
            speed.append([r["function"], f"{r['model_flops'] / 1e12:.3g}", why] + [""] * 8)
            continue
        comm = f"{r['comm_s'] * 1e3:.3g}" if "comm" in r else "?"
        speed.append(
            [
                r["function"],
                f"{r['model_flops'] / 1e12:.3g}",
                f"{r['compute_s'] * 1e3:.3g}",
                comm,
                f"{r['roofline_s'] * 1e3:.3g}",
                f"{r['serial_s'] * 1e3:.3g}",
                r["bound"],
                f"{r['tokens_per_s']:,.0f}",
                f"{r['samples_per_s']:,.1f}",
                f"{r['mfu']:.0%}",
                f"{r['mfu_serial']:.0%}",
            ]
        )
    title = (
        "roofline per chip (compute: max of FLOPs and HBM bytes at peak; comm: collectives at "
        "the links' bandwidth; bound: the two overlapped, serial: added; upper bounds on speed)"
    )
    out.append(_format(speed, title))
    return "\n\n".join(out)


def _format(lines, title: str) -> str:
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    fmt = lambda line: "  ".join(
        str(v).ljust(w) if i == 0 else str(v).rjust(w)
        for i, (v, w) in enumerate(zip(line, widths, strict=True))
    )
    return "\n".join([title, fmt(lines[0]), *map(fmt, lines[1:])])


def iteration(rows: list[dict], chip: Chip, n_chips: int) -> dict | None:
    """The bound on one RL iteration (one rsft round): the rows with `calls` > 0 run one after
    another, so its time is the sum of calls x roofline; its samples are the first such row's
    (the rollout's rows) times its calls. None when no row is in an iteration or one of them has
    no roofline (it did not fit)."""
    its = [r for r in rows if r.get("calls")]
    if not its or not all("roofline_s" in r for r in its):
        return None
    t = sum(r["calls"] * r["roofline_s"] for r in its)
    serial = sum(r["calls"] * r["serial_s"] for r in its)
    flops = sum(r["calls"] * r["model_flops"] for r in its)
    return {
        "functions": {r["function"]: r["calls"] for r in its},
        "roofline_s": t,
        "serial_s": serial,
        "samples_per_s": its[0]["calls"] * its[0]["samples"] / t,
        "mfu": flops / (n_chips * chip.peak_flops * t),
        "mfu_serial": flops / (n_chips * chip.peak_flops * serial),
    }


def first_misfit(rows: list[dict]) -> dict | None:
    """The function needing the most HBM among those that do not fit, or None."""
    bad = [r for r in rows if not r["fits"]]
    return max(bad, key=lambda r: r["total_bytes"]) if bad else None
