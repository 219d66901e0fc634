"""Throughput benchmarks, run with the project's own step functions.

  python -m rlhf_jax.bench train --size small --batch 12 --seq-len 1024 [--scan-layers]

`train` times the real jitted `train_step` of the LM stage on random tokens over all local devices
(data parallel unless --fsdp/--tensor say otherwise) and prints one JSON line: median step time,
tokens/s, MFU (6N + attention FLOPs per token over the chip's dense bf16 peak), compile time and
peak device memory, plus the device and versions. `--out FILE` appends the line to FILE.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from rlhf_jax import model as model_lib
from rlhf_jax import sharding
from rlhf_jax import state as state_lib
from rlhf_jax.stages import lm, setup


def environment() -> dict:
    """Device, versions and commit, recorded with every figure."""
    import flax
    import optax

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    dev = jax.devices()[0]
    return {
        "device": f"{jax.device_count()} x {dev.device_kind}",
        "platform": dev.platform,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "commit": commit,
    }


def peak_memory_gb() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def make_mesh(fsdp: int, tensor: int):
    from experiments import common
    from launch import mesh as mesh_lib

    return mesh_lib.build_mesh(common.mesh_config(fsdp=fsdp, tensor=tensor))


def bench_train(args) -> dict:
    cfg = model_lib.preset(
        args.size,
        family=args.family or None,
        dtype=args.dtype,
        scan_layers=args.scan_layers,
        remat=args.remat,
        attention=args.attention,
        max_len=max(args.seq_len, model_lib.PRESETS[args.size].get("max_len", 1024)),
    )
    mesh = make_mesh(args.fsdp, args.tensor)
    rules = sharding.DEFAULT_RULES
    tx = state_lib.make_optimizer(state_lib.OptimConfig(total_steps=10_000))
    graphdef, state, shardings = state_lib.create_train_state(cfg, tx, mesh, rules, seed=0)
    train, _ = lm.compile_steps(graphdef, tx, shardings, mesh, rules, args.grad_accum)

    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, size=(args.batch, args.seq_len + 1), dtype=np.int32)
    host = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "mask": np.ones((args.batch, args.seq_len), np.float32),
    }
    batch = sharding.put_batch(host, mesh, rules)

    t0 = time.perf_counter()
    state, m = train(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, m = train(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = train(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = args.batch * args.seq_len
    n_params = model_lib.param_count(state["params"])
    fpt = setup.flops_per_token(
        cfg, model_lib.param_count(state["params"], cfg, exclude_positions=True), args.seq_len
    )
    peak = setup.peak_flops(jax.devices()[0])
    return {
        "bench": "train",
        "size": args.size,
        "family": cfg.family,
        "params_M": round(n_params / 1e6, 2),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "grad_accum": args.grad_accum,
        "dtype": args.dtype,
        "scan_layers": args.scan_layers,
        "remat": args.remat,
        "attention": args.attention,
        "mesh": dict(mesh.shape),
        "median_step_ms": round(step_s * 1e3, 2),
        "tokens_per_sec": round(tokens / step_s),
        "mfu": None
        if peak is None
        else round(tokens / step_s * fpt / (peak * jax.device_count()), 4),
        "compile_s": round(compile_s, 1),
        "peak_mem_gb": peak_memory_gb(),
        "final_loss": float(m["train/loss"]),
        **environment(),
        "command": "python -m rlhf_jax.bench " + " ".join(sys.argv[1:]),
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rlhf_jax.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="LM train-step throughput")
    t.add_argument("--size", default="small", choices=list(model_lib.PRESETS))
    t.add_argument("--family", default="", choices=["", "gpt2", "llama"])
    t.add_argument("--batch", type=int, default=12)
    t.add_argument("--seq-len", type=int, default=1024)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--dtype", default="bfloat16")
    t.add_argument("--scan-layers", action="store_true")
    t.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    t.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"])
    t.add_argument("--fsdp", type=int, default=1)
    t.add_argument("--tensor", type=int, default=1)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--out", default="", help="append the JSON result line to this file")
    args = p.parse_args(argv)
    if args.cmd == "train":
        result = bench_train(args)
    else:
        raise ValueError(f"unknown benchmark: {args.cmd!r}; expected one of ('train',)")
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
