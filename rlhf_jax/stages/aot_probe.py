"""Per-layer costs for a plan of scanned layers: the compiler's count at 2 and 4 layers, unrolled.

XLA's cost analysis counts a loop body once. For the loops whose trips are alike (microbatches,
PPO's epochs x minibatches, decode steps) the planner scales the count by model FLOPs over the
FLOPs it saw (infra/plan.row). A scanned model is a loop too, but its trips are not all of the
program: the optimizer update over every parameter, the embedding and the head sit outside it,
and scaling the whole count by the number of layers multiplied them by it (the 124M PPO-ptx
update planned at 2,025 ms scanned against 1,225 ms unrolled).

So a scanned plan (`model.scan_layers=True`) takes its FLOPs and bytes from probes: the same
functions built by the same planners with every model unrolled at 2 layers, then each model
group at 4 (aot_inputs.probe_layers; groups: the policy's shape, and a reward model of another
shape), compiled for the same mesh. Per group, half of (4 layers) - (2 layers) is one layer's
cost, and the plan's count is the 2-layer count plus (L - 2) of those per group: the
outside-the-loop part counted once, every layer counted. Memory still comes from the full
scanned compile.

Why 2 and 4, not 1 and 2: the compiler's bytes are not quite linear in the depth. GPT-2 124M's
eval step, unrolled at 1, 2, 3, 4 and 6 layers, reads 3.95, 4.48, 5.19, 5.74 and 7.15 GB: one
layer adds 0.53, 0.71, 0.55, then 0.70 GB, and the first layer is cheaper than the rest. From 1
and 2 layers the 12-layer count came out 16% under the unrolled compile's; a two-layer step past
the first layer averages the alternation (7% under on that step).

Layer kinds that alternate (a sliding-window pattern) are probed at the kinds of the first two
or four layers; the extrapolation treats every layer as their average.
"""

from __future__ import annotations

from rlhf_jax.infra import plan
from rlhf_jax.stages import aot, aot_inputs


def _counts(config, mesh, rm_size: str, layers: dict, names) -> dict:
    """{function: (compiler FLOPs, compiler bytes)} of the stage built at `layers` per group."""
    with aot_inputs.probe_layers(layers):
        fns = aot.functions(config, mesh, rm_size)
    out = {}
    for fn in fns:
        if fn.name in names:
            stats = plan.compile_stats(fn.lower())
            if stats["oom"]:  # fewer layers than the plan: only a huge head could do this
                raise ValueError(f"{fn.name}: the 1-2 layer cost probe does not fit HBM")
            out[fn.name] = (stats["compiler_flops"], stats["compiler_bytes"])
    return out


def layer_costs(config, mesh, rm_size: str, names, seen: dict) -> dict:
    """{function: {"compiler_flops", "compiler_bytes", "probes"}} at the plan's layer counts
    `seen` ({group: layers}, aot_inputs.layers_seen after the full build), for the functions
    in `names` (module docstring)."""
    groups = sorted(seen)
    two = dict.fromkeys(groups, 2)
    base = _counts(config, mesh, rm_size, two, names)
    est = {name: list(v) for name, v in base.items()}
    probes = 1
    # Groups of one layer count step together: one probe for all of them.
    for count in sorted(set(seen.values())):
        same = [g for g in groups if seen[g] == count]
        if count == 2:
            continue
        more = _counts(config, mesh, rm_size, {**two, **dict.fromkeys(same, 4)}, names)
        probes += 1
        for name, (f4, b4) in more.items():
            f2, b2 = base[name]
            est[name][0] += (count - 2) * (f4 - f2) / 2
            est[name][1] += (count - 2) * (b4 - b2) / 2
    return {
        name: {"compiler_flops": f, "compiler_bytes": b, "probes": probes}
        for name, (f, b) in est.items()
    }
