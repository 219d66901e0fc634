"""The planner's search: candidate configurations of one stage on TPU slices, ranked without
compiling, the best confirmed by the compiler (`python -m launch.aot_search` is the command).

A candidate is the stage's config with overrides along the search axes:
- `mesh`: how the slice's chips split into (data, fsdp, tensor); tensor parallelism only where it
  divides the kv heads and stays within 8 chips (a host's worth of ICI neighbours).
- `remat`: `model.remat` none | dots | full.
- `grad_accum`: `train.grad_accum` 1, 2, 4, ... where the stage's train step accumulates (LM, SFT,
  RM, DPO and its variants, KTO) and the per-shard rows divide.
- `frozen_dtype`: `ppo.frozen_dtype` float32 | bfloat16 for PPO (its reference and reward models
  held frozen in that dtype); not with LoRA, whose reference is its own bf16 base.
- `lora`: full parameters or LoRA at a rank (`--lora R`: rank R on q/k/v/o and the MLP, the base
  in bfloat16), only when asked for: it changes the method, not just how it runs.

Ranking, per candidate and without compiling (everything here is arithmetic on the stage's
abstract `Function`s, rlhf_jax/stages/aot_inputs.py, built in well under a second):
- **Memory** (exact for what it counts): per-chip bytes of every function's arguments and of what
  stays resident, `plan.chip_bytes` of the same sharded shapes the compiler gets. A candidate
  whose arguments alone exceed the chip's HBM is dropped. Activations and other temporaries are
  not estimated: the compile of a ranked candidate decides whether they fit.
- **Time**: per function, max(compute, communication), summed over an iteration's calls (an RL
  iteration, an rsft round) or the train step. Compute: model FLOPs x the function's
  hardware factor (remat) over the slice's peak. Communication on the ICI at the bandwidth of the
  links the mesh axis spans (`plan_comm.link_bandwidth`): FSDP all-gathers the weights in each
  pass (forward, backward, and the forward again under remat) of every microbatch, or every
  decode step of a rollout, and reduce-scatters float32 gradients once per microbatch; data
  parallelism all-reduces them once per step; tensor parallelism all-reduces two activations per
  layer and pass. HBM traffic, latency and overlap inside the compiled program are not modelled,
  so the ranking is by this estimate, and the compiled rows say what fits.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from rlhf_jax.infra import cli, plan, plan_comm

REMATS = ("none", "dots", "full")
FROZEN_DTYPES = ("float32", "bfloat16")
ACCUM_STAGES = ("pretrain", "sft", "rm", "dpo", "kto")
AXES = ("mesh", "remat", "grad_accum", "frozen_dtype", "lora")


@dataclasses.dataclass
class Candidate:
    topology: str
    overrides: dict  # dotted config key -> value

    def label(self) -> str:
        o = self.overrides
        parts = [f"mesh {o['mesh.ici.data']}x{o['mesh.ici.fsdp']}x{o['mesh.ici.tensor']}"]
        for key, name in (("model.remat", "remat"), ("train.grad_accum", "accum"),
                          ("ppo.frozen_dtype", "frozen"), ("lora.rank", "lora")):  # fmt: skip
            if key in o:
                parts.append(f"{name} {o[key]}")
        return ", ".join(parts)


def meshes(n_chips: int, kv_heads: int, max_tensor: int = 8) -> list[tuple[int, int, int]]:
    """Every (data, fsdp, tensor) with data x fsdp x tensor = n_chips, tensor dividing the kv
    heads and at most `max_tensor`."""
    out = []
    for tensor in range(1, min(n_chips, max_tensor) + 1):
        if n_chips % tensor or kv_heads % tensor:
            continue
        rest = n_chips // tensor
        for fsdp in range(1, rest + 1):
            if rest % fsdp == 0:
                out.append((rest // fsdp, fsdp, tensor))
    return out


def candidates(config, topology: str, axes=AXES, lora_rank: int = 0) -> list[Candidate]:
    """The grid of candidates of `config` on `topology` along `axes` (module docstring)."""
    from rlhf_jax.stages import aot_inputs  # the stages import the infra, not the reverse

    _, shape = plan.parse_topology(topology)
    n = math.prod(shape)
    m = config.model
    kv = aot_inputs.model_config_of(config).n_kv_heads
    stage = config.stage
    choices = {}
    if "mesh" in axes:
        choices["mesh"] = meshes(n, kv)
    else:
        ici = config.mesh.ici
        choices["mesh"] = [(ici.data if ici.data > 0 else n // (ici.fsdp * ici.tensor),
                            ici.fsdp, ici.tensor)]  # fmt: skip
    choices["model.remat"] = list(REMATS) if "remat" in axes else [m.remat]
    if "grad_accum" in axes and stage in ACCUM_STAGES:
        choices["train.grad_accum"] = [2**i for i in range(6)]
    if "frozen_dtype" in axes and stage == "ppo":
        choices["ppo.frozen_dtype"] = list(FROZEN_DTYPES)
    if "lora" in axes and lora_rank:
        choices["lora.rank"] = [0, lora_rank]
    out = []
    keys = list(choices)
    for values in itertools.product(*(choices[k] for k in keys)):
        o = dict(zip(keys, values, strict=True))
        d, f, t = o.pop("mesh")
        accum = o.get("train.grad_accum", 1)
        if stage in ACCUM_STAGES and config.train.batch_size % (d * f * accum):
            continue  # the step's rows do not split over the shards and microbatches
        if o.get("lora.rank"):
            if o.get("ppo.frozen_dtype", FROZEN_DTYPES[0]) != FROZEN_DTYPES[0]:
                continue  # LoRA's reference is its bf16 base: the frozen dtype changes nothing
            o.pop("ppo.frozen_dtype", None)
            o["lora.base_dtype"] = "bfloat16"
        out.append(Candidate(topology, {"mesh.ici.data": d, "mesh.ici.fsdp": f,
                                        "mesh.ici.tensor": t, **o}))  # fmt: skip
    return out


def apply(config, overrides: dict):
    """A copy of `config` with a candidate's dotted-key overrides."""
    return cli.with_overrides(config, overrides)


def axis_bandwidth(mesh, axis: str, chip) -> float:
    """Bytes/s one chip sends at in a collective over mesh `axis` (its first group)."""
    names = list(mesh.axis_names)
    index = tuple(slice(None) if a == axis else 0 for a in names)
    devs = list(mesh.devices[index].flat)
    if len(devs) < 2:
        return float("inf")
    bw, _ = plan_comm.link_bandwidth(list(range(len(devs))), devs, chip)
    return bw or chip.ici_link_bw


def microbatches(config, fn) -> int:
    """Gradient passes one call of `fn` makes: train.grad_accum for an accumulating train step,
    PPO's and GRPO's minibatches over their epochs for the update, else 1."""
    if fn.name == "train_step" and config.stage in ACCUM_STAGES:
        return config.train.grad_accum
    if fn.name == "update" and config.stage in ("ppo", "grpo"):
        s = config[config.stage]
        rows = s.rollout_batch if config.stage == "ppo" else s.prompts * s.group_size
        return max(1, s.epochs * rows // s.minibatch)
    return 1


def estimate(config, fns, mesh, chip) -> dict:
    """The candidate's ranking figures (module docstring): exact argument and resident bytes per
    chip, and the estimated seconds of a step (or RL iteration) with each function's compute and
    communication."""
    n = mesh.devices.size
    shape = dict(mesh.shape)
    d, f, t = shape.get("data", 1), shape.get("fsdp", 1), shape.get("tensor", 1)
    bw = {a: axis_bandwidth(mesh, a, chip) for a in ("data", "fsdp", "tensor")}
    from rlhf_jax.stages import aot_inputs

    cfg = aot_inputs.model_config_of(config)
    layers, width = cfg.n_layers, cfg.d_model
    act = 2 if cfg.dtype == "bfloat16" else 4
    rows, total_s, worst = [], 0.0, 0
    for fn in fns:
        mem = plan.chip_bytes(fn.args) + plan.chip_bytes(fn.resident)
        worst = max(worst, mem)
        weights = plan.chip_bytes(fn.parts.get("params")) + plan.chip_bytes(fn.parts.get("frozen"))
        train = bool(plan.chip_bytes(fn.parts.get("opt_state")))
        micro = microbatches(config, fn)
        passes = (3 if config.model.remat != "none" else 2) if train else 1
        trips = micro * passes if train else max(fn.loop_trips, 1)
        comm = weights * (f - 1) * trips / bw["fsdp"]
        if train:
            grads = (
                plan.chip_bytes(fn.parts.get("params"))
                * 4
                / max(_itemsize(fn.parts.get("params")), 1)
            )
            comm += grads * (f - 1) * micro / bw["fsdp"]
            comm += 2 * grads * (d - 1) / d / bw["data"]
        if t > 1:
            tokens_chip = fn.tokens / (d * f)
            tp_passes = passes if train else 1
            comm += (4 * layers * tp_passes * tokens_chip * width * act * (t - 1) / t) / bw[
                "tensor"
            ]
        compute = fn.flops * fn.hw_factor / (n * chip.peak_flops)
        secs = max(compute, comm)
        rows.append({"function": fn.name, "arg_bytes": mem, "compute_s": compute, "comm_s": comm,
                     "est_s": secs, "calls": fn.calls})  # fmt: skip
        total_s += secs * (fn.calls or (1 if fn.name == "train_step" else 0))
    if not total_s:  # no function in an iteration and no train step: the slowest one
        total_s = max(r["est_s"] for r in rows)
    return {"arg_bytes": worst, "est_s": total_s, "functions": rows}


def _itemsize(tree) -> int:
    import jax

    leaves = jax.tree.leaves(tree)
    return leaves[0].dtype.itemsize if leaves else 4


LADDER_KEYS = ("model.remat", "train.grad_accum")  # along a family: less memory, no faster


def families(ranked: list[tuple]) -> list[list[tuple]]:
    """Candidates grouped into families that differ only in remat and gradient accumulation,
    each family a ladder from its fastest member (remat none, fewest microbatches) down to its
    leanest, families ordered by their fastest member's estimate and, among equal estimates, by
    the least argument bytes per chip (the most room left for activations) first.

    `ranked` holds (estimate dict, Candidate, ...) tuples; the order of the search (module
    docstring of launch/aot_search.py): a family's first member that fits is its best, since
    members further down are no faster."""
    groups: dict[tuple, list] = {}
    for item in ranked:
        cand = item[1]
        key = tuple((k, v) for k, v in cand.overrides.items() if k not in LADDER_KEYS)
        groups.setdefault(key, []).append(item)
    rung = lambda item: (
        item[0]["est_s"],
        REMATS.index(item[1].overrides.get("model.remat", "none")),
        item[1].overrides.get("train.grad_accum", 1),
    )
    ladders = [sorted(g, key=rung) for g in groups.values()]
    return sorted(ladders, key=lambda g: (g[0][0]["est_s"], g[0][0]["arg_bytes"]))


def compiled_bound(rows: list[dict], chip, n_chips: int) -> float | None:
    """The planner's roofline bound of a compiled candidate: its RL iteration (or rsft round),
    else its train step, else its slowest function; None when a function did not fit."""
    if not rows or not all(r.get("fits") and "roofline_s" in r for r in rows):
        return None
    it = plan.iteration(rows, chip, n_chips)
    if it is not None:
        return it["roofline_s"]
    step = [r["roofline_s"] for r in rows if r["function"] == "train_step"]
    return step[0] if step else max(r["roofline_s"] for r in rows)
