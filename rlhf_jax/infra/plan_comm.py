"""Communication in a compiled program: its collectives, every loop trip counted, and their time.

The planner (infra/plan.py) bounds a function by its FLOPs and HBM bytes; on a slice the chips
also wait on each other. This module reads the program as the TPU compiler has it right after SPMD
partitioning (`plan.compile_stats` has the compiler dump that pass), where FSDP's all-gathers,
the gradients' reductions and tensor parallelism's activation collectives are explicit and every
loop is still a plain `while`; the TPU passes after it split collectives into async pieces and
move them across loop boundaries, which a text reading cannot follow. It returns, per chip, the
bytes each collective moves over the interconnect and the time that takes at the topology's
link bandwidth.

- **What counts**: all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute,
  synchronous or async (`-start`; the `-done` half moves nothing), wherever they sit. An
  all-reduce whose result is only sliced to this chip's shard (`dynamic-slice`, what the
  partitioner emits for FSDP's gradients) is counted as the reduce-scatter the TPU passes turn
  it into.
- **Loop trips**: a `while` body counts once per trip. The trip count is read from the loop's
  condition when the condition is that one comparison (`ROOT compare(i, constant(N)),
  direction=LT`, the form jax's `scan` and `fori_loop` take with a counter from 0). A loop whose
  bound is not a constant (the sampler's decode loop, which stops when every row has ended; the
  engine's, whose condition also ands a step budget of 2^30 with "rows left") counts
  `dynamic_trips` times, given by the caller (the decode steps of a full-length rollout), else
  once. A `conditional` counts its costliest branch. Inside a loop without a constant bound,
  further such loops and conditionals count once per run of that outer loop, not per trip: the
  engine's prefill (a `cond` around a `while` of prefill calls in its decode loop) runs once per
  wave of rows, not at every decode step.
- **Bytes moved per chip**, ring algorithms over a group of n chips holding B bytes each:
  all-gather (n - 1) / n of its output, reduce-scatter (n - 1) / n of its input (n x output),
  all-reduce 2 (n - 1) / n, all-to-all (n - 1) / n, collective-permute its whole buffer.
- **Time**: bytes / bandwidth, the bandwidth of the links the group spans: a group whose chips
  differ in d torus coordinates uses d dimensions' links in both directions (`Chip.ici_link_bw`
  x d); a group spanning slices goes over the data-center network at `Chip.dcn_bw` per chip.
  Latency, contention between concurrent collectives, and a torus without wraparound (half the
  ring bandwidth) are not modelled, so this is a lower bound on the time, as the roofline is.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2}
_BYTES.update({"bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8})
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s*\(.*\{\s*$")


@dataclasses.dataclass
class Collective:
    kind: str
    bytes: float  # the op's result per chip (all-gather: gathered; reduce-scatter: the shard)
    group: list  # the logical device ids of one group (every group has the same shape)
    times: float = 1.0  # executions per call of the program (loop trips)

    @property
    def moved(self) -> float:
        """Bytes one chip sends over the links, per execution (module docstring)."""
        n = max(len(self.group), 1)
        if self.kind == "collective-permute":
            return self.bytes
        if self.kind == "all-reduce":
            return 2 * self.bytes * (n - 1) / n
        if self.kind == "reduce-scatter":
            return self.bytes * (n - 1)  # the input is n x the output shard counted here
        return self.bytes * (n - 1) / n


def _array_bytes(text: str) -> list[float]:
    out = []
    for dtype, dims in _ARRAY.findall(text):
        size = _BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
        if size is None:
            continue
        out.append(size * math.prod(int(d) for d in dims.split(",") if d))
    return out


def _split_shape(rest: str) -> tuple[str, str]:
    """'(f32[2], s32[]) all-reduce(...)...' -> (shape text, the text after it)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def _groups(attrs: str, n_devices: int) -> list:
    """The first replica group of a collective, as logical device ids, in any of XLA's forms."""
    m = re.search(r"source_target_pairs=\{\{(\d+),(\d+)\}", attrs)
    if m:
        return [int(m.group(1)), int(m.group(2))]
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        chosen = re.findall(r"'(\w+)'", m.group(2))
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        index = tuple(slice(None) if a in chosen else 0 for a in names)
        return [int(i) for i in np.ravel(ids[index])]
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        shape = [int(x) for x in m.group(1).split(",")]
        ids = np.arange(math.prod(shape)).reshape([int(x) for x in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return [int(i) for i in ids.reshape(shape[0], -1)[0]]
    m = re.search(r"replica_groups=\{\{([\d,]+)\}", attrs)
    if m:
        return [int(i) for i in m.group(1).split(",")]
    return list(range(n_devices))  # `replica_groups={}`: every device


def parse(hlo: str) -> dict:
    """{computation: [(name, shape text, opcode, attributes)]} and the entry's name."""
    comps, roots, entry, current = {}, {}, None, None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            name = m.group(1)
            current = comps.setdefault(name, [])
            if line.startswith("ENTRY"):
                entry = name
            continue
        m = _INSTR.match(line) if current is not None else None
        if m:
            shape, tail = _split_shape(m.group(2))
            opcode = tail.split("(", 1)[0].strip()
            current.append((m.group(1), shape, opcode, tail))
            if line.lstrip().startswith("ROOT"):
                roots[name] = m.group(1)
    return {"computations": comps, "entry": entry, "roots": roots}


def _trip_count(cond: list, root: str | None) -> int | None:
    """N of a loop condition whose root is `compare(i, constant(N)), direction=LT`, else None
    (a condition that combines the counter with other tests has no fixed trip count)."""
    consts = {}
    for name, _, opcode, tail in cond:
        m = re.match(r"constant\((-?\d+)\)", tail) if opcode == "constant" else None
        if m:
            consts[name] = int(m.group(1))
    for name, _, opcode, tail in cond:
        if name == root and opcode == "compare" and "direction=LT" in tail:
            operands = re.findall(r"%([\w.\-]+)", tail.split(")", 1)[0])
            if len(operands) == 2 and operands[1] in consts:
                return consts[operands[1]]
    return None


def _sliced(instrs: list, name: str) -> float | None:
    """Bytes of the shard a `dynamic-slice` takes of all-reduce `name`, if that is its one use."""
    users = [
        (shape, op) for _, shape, op, tail in instrs if re.search(rf"%{re.escape(name)}\b", tail)
    ]
    if len(users) == 1 and users[0][1] == "dynamic-slice":
        return sum(_array_bytes(users[0][0]))
    return None


def collectives(hlo: str, n_devices: int, dynamic_trips: int = 1) -> list[Collective]:
    """Every collective of the program `hlo` (HLO text after SPMD partitioning), with how many
    times one call runs it (module docstring)."""
    module = parse(hlo)
    comps = module["computations"]
    out: list[Collective] = []

    def walk(name: str, times: float, seen: tuple, once: float | None = None):
        # once: inside a loop without a constant bound, the count of one run of that loop
        if name not in comps or name in seen:
            return
        for instr, shape, opcode, tail in comps[name]:
            base = opcode.removesuffix("-start")
            if base in KINDS and not opcode.endswith("-done"):
                arrays = _array_bytes(shape)
                if opcode.endswith("-start"):  # (operand(s), result(s), context scalars...)
                    arrays = [a for a in arrays if a > 4] or arrays
                    half = arrays[len(arrays) // 2 :] if base == "all-gather" else arrays[:1]
                    size = sum(half)
                else:
                    size = sum(arrays)
                if base == "all-reduce":
                    shard = _sliced(comps[name], instr)
                    if shard is not None:
                        base, size = "reduce-scatter", shard
                out.append(Collective(base, size, _groups(tail, n_devices), times))
            if opcode == "while":
                cond = re.search(r"condition=%([\w.\-]+)", tail)
                body = re.search(r"body=%([\w.\-]+)", tail)
                c = cond.group(1) if cond else None
                trips = _trip_count(comps.get(c, []), module["roots"].get(c)) if c else None
                if body and trips is not None:
                    walk(body.group(1), times * trips, seen + (name,), once)
                elif body and once is None:  # the outermost loop without a constant bound
                    walk(body.group(1), times * dynamic_trips, seen + (name,), times)
                elif body:  # nested in one: once per run of the outer loop
                    walk(body.group(1), once, seen + (name,), once)
                continue
            if opcode == "conditional":
                branches = re.findall(r"%([\w.\-]+)", tail.split("branch_computations=", 1)[-1])
                best, best_bytes = None, -1.0
                for b in branches:
                    if b in comps:
                        sub = collectives_of(comps, b)
                        if sub > best_bytes:
                            best, best_bytes = b, sub
                if best:
                    walk(best, times if once is None else once, seen + (name,), once)
                continue
            for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", tail):
                walk(callee, times, seen + (name,), once)

    walk(module["entry"], 1.0, ())
    return out


def collectives_of(comps: dict, name: str, seen: tuple = ()) -> float:
    """Buffer bytes of the collectives in computation `name` and what it calls, each once (a
    branch's weight: the engine's prefill branch holds its collectives in nested loops)."""
    total = 0.0
    if name in seen:
        return total
    for _, shape, opcode, tail in comps.get(name, []):
        if opcode.removesuffix("-start") in KINDS:
            total += sum(_array_bytes(shape))
        callees = re.findall(r"(?:calls|to_apply|body)=%([\w.\-]+)", tail)
        if opcode == "conditional":
            callees += re.findall(r"%([\w.\-]+)", tail.split("branch_computations=", 1)[-1])
        for callee in callees:
            total += collectives_of(comps, callee, seen + (name,))
    return total


def link_bandwidth(group: list, devices: list, chip) -> tuple[float | None, str]:
    """(bytes/s one chip sends at, "ici" or "dcn") for a collective over `group` (logical ids
    into `devices`, the program's device assignment)."""
    devs = [devices[i] for i in group if i < len(devices)]
    slices = {getattr(d, "slice_index", 0) for d in devs}
    if len(slices) > 1:
        return chip.dcn_bw, "dcn"
    coords = [tuple(getattr(d, "coords", ())) for d in devs]
    dims = sum(len({c[k] for c in coords}) > 1 for k in range(len(coords[0]))) if coords else 0
    return chip.ici_link_bw * max(dims, 1), "ici"


def summary(colls: list[Collective], devices: list, chip) -> dict:
    """Per chip: bytes moved and seconds, by kind and by network, for one call."""
    by_kind = {k: 0.0 for k in KINDS}
    out = {"ici_bytes": 0.0, "dcn_bytes": 0.0, "comm_s": 0.0, "dcn_unknown": False}
    for c in colls:
        moved = c.moved * c.times
        bw, net = link_bandwidth(c.group, devices, chip)
        by_kind[c.kind] += moved
        out[f"{net}_bytes"] += moved
        if bw is None:  # no sourced DCN figure for this chip
            out["dcn_unknown"] = True
        elif moved:
            out["comm_s"] += moved / bw
    out["by_kind"] = {k: v for k, v in by_kind.items() if v}
    out["count"] = sum(c.times for c in colls)
    return out
