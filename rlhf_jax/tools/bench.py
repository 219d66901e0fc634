"""Throughput benchmarks, run with the project's own step functions.

  python -m rlhf_jax.tools.bench train --size small --batch 12 --seq-len 1024 [--scan-layers]
  python -m rlhf_jax.tools.bench decode --size small --batch 64 --prompt-len 64 --new-tokens 256
  python -m rlhf_jax.tools.bench rm --size small --batch 32 --k 4 --seq-len 512
  python -m rlhf_jax.tools.bench ppo --size small --batch 64 --prompt-len 256 --new-tokens 256
  python -m rlhf_jax.tools.bench rollout --size mini --rows 256 --slots 32 --new-tokens 128
  python -m rlhf_jax.tools.bench sft --size mini --seq-len 256 --batch 16 --epochs 2

`train` times the real jitted `train_step` of the LM stage on random tokens over all local devices
(data parallel unless --fsdp/--tensor say otherwise) and prints one JSON line: median step time,
tokens/s, MFU (6N + attention FLOPs per token over the chip's dense bf16 peak), compile time and
peak device memory, plus the device and versions. `--out FILE` appends the line to FILE.
`decode` times the on-device sampler (new tokens/s, ms per step, fraction of the HBM bandwidth
bound); `rm` and `ppo` are in bench_rlhf.py, `rollout` (the static sampler and the rollout
engine side by side on skewed and short response lengths) in bench_rollout.py, `sft` and `dpo` (SFT
and DPO steps on padded vs packed rows of the same data) in bench_packing.py.
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
import jax.numpy as jnp
import numpy as np

from rlhf_jax.infra import plan, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.stages import lm, setup
from rlhf_jax.tools import bench_packing, bench_rlhf, bench_rollout


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
    from rlhf_jax.infra import mesh as mesh_lib

    return mesh_lib.build_mesh(mesh_lib.config(fsdp=fsdp, tensor=tensor))


def bench_train(args) -> dict:
    cfg = model_config.preset(
        args.size,
        family=args.family or None,
        dtype=args.dtype,
        scan_layers=args.scan_layers,
        remat=args.remat,
        attention=args.attention,
        max_len=max(args.seq_len, model_config.PRESETS[args.size].get("max_len", 1024)),
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
    peak = plan.peak_flops(jax.devices()[0])
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
        "command": "python -m rlhf_jax.tools.bench " + " ".join(sys.argv[1:]),
    }


def bench_decode(args) -> dict:
    """Times `sampler.make_sampler`'s prefill + while-loop decode on a random-init model.

    EOS is disabled (eos_id=-1 never matches), so every row decodes all --new-tokens. Rows are
    data parallel over all local devices. Prefill is timed alone with the same cache size; the
    decode step time is (total - prefill) / (new_tokens - 1), since prefill also yields the
    first token. `bw_fraction` is the bytes one device must read per decode step (all params in
    the compute dtype, plus its share of the KV cache at its average filled length P + T/2) over
    the step time, as a fraction of the chip's peak HBM bandwidth (None when unknown, e.g. CPU).
    """
    from rlhf_jax.sampling import sampler

    p_len, t_new = args.prompt_len, args.new_tokens
    cfg = model_config.preset(
        args.size,
        family=args.family or None,
        n_kv_heads=args.kv_heads or None,
        dtype=args.dtype,
        scan_layers=args.scan_layers,
        attention=args.attention,
        max_len=max(p_len + t_new, model_config.PRESETS[args.size].get("max_len", 1024)),
    )
    mesh = make_mesh(1, 1)
    rules = sharding.DEFAULT_RULES
    graphdef, _, shardings = state_lib.param_shardings(cfg, mesh, rules)
    params = state_lib.init_params(cfg, 0, shardings)
    rng = np.random.default_rng(0)
    prompts = rng.integers(4, cfg.vocab_size, size=(args.batch, p_len), dtype=np.int32)
    batch = sharding.put_batch(
        {"prompts": prompts, "mask": np.ones_like(prompts, bool)}, mesh, rules
    )
    keys = jax.device_put(
        jax.random.split(jax.random.key(0), args.batch), sharding.batch_sharding(mesh, rules, 1)
    )
    generate = sampler.make_sampler(
        graphdef, max_new_tokens=t_new, eos_id=-1, pad_id=0, mesh=mesh, rules=rules
    )

    def prefill(params, prompts, mask):
        with sharding.use_rules(mesh, rules):
            model = state_lib.merge(graphdef, params)
            return sampler.prefill(model, prompts, mask, p_len + t_new)[:2]

    prefill = jax.jit(prefill)
    knobs = {"greedy": True} if args.greedy else {"temperature": 1.0}
    run_all = lambda: generate(params, batch["prompts"], batch["mask"], keys, **knobs)
    run_prefill = lambda: prefill(params, batch["prompts"], batch["mask"])

    def timed(fn) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - t0

    compile_s = timed(run_all)
    timed(run_prefill)  # compile
    steps = int(run_all()["steps"])
    if steps != t_new:
        raise RuntimeError(f"decoded {steps} steps, expected {t_new}: EOS should be disabled")
    total_s = statistics.median(timed(run_all) for _ in range(args.repeats))
    prefill_s = statistics.median(timed(run_prefill) for _ in range(args.repeats))
    step_s = max(total_s - prefill_s, 0.0) / max(t_new - 1, 1)

    itemsize = jnp.dtype(cfg.dtype).itemsize
    n_params = model_lib.param_count(params)
    kv_bytes = 2 * cfg.n_layers * args.batch * (p_len + t_new / 2)
    kv_bytes *= cfg.n_kv_heads * cfg.head_dim * itemsize
    bytes_per_step = n_params * itemsize + kv_bytes / jax.device_count()  # per device
    peak_bw = plan.peak_hbm_bw(jax.devices()[0])
    return {
        "bench": "decode",
        "size": args.size,
        "family": cfg.family,
        "params_M": round(n_params / 1e6, 2),
        "batch": args.batch,
        "prompt_len": p_len,
        "new_tokens": t_new,
        "dtype": args.dtype,
        "scan_layers": args.scan_layers,
        "greedy": args.greedy,
        "mesh": dict(mesh.shape),
        "new_tokens_per_sec": round(args.batch * t_new / total_s, 1),
        "decode_ms_per_step": round(step_s * 1e3, 3),
        "prefill_ms": round(prefill_s * 1e3, 2),
        "total_ms": round(total_s * 1e3, 2),
        "compile_s": round(compile_s, 1),
        "bytes_per_step_MB": round(bytes_per_step / 1e6, 2),
        "bw_fraction": None
        if peak_bw is None or step_s == 0
        else round(bytes_per_step / step_s / peak_bw, 4),
        "peak_mem_gb": peak_memory_gb(),
        **environment(),
        "command": "python -m rlhf_jax.tools.bench " + " ".join(sys.argv[1:]),
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rlhf_jax.tools.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="LM train-step throughput")
    t.add_argument("--size", default="small", choices=list(model_config.PRESETS))
    t.add_argument("--family", default="", choices=["", "gpt2", "llama"])
    t.add_argument("--batch", type=int, default=12)
    t.add_argument("--seq-len", type=int, default=1024)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--dtype", default="bfloat16")
    t.add_argument("--scan-layers", action="store_true")
    t.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    t.add_argument("--attention", default="auto", choices=["auto", "xla", "splash", "cudnn"])
    t.add_argument("--fsdp", type=int, default=1)
    t.add_argument("--tensor", type=int, default=1)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--out", default="", help="append the JSON result line to this file")
    d = sub.add_parser("decode", help="sampling throughput: prefill + on-device decode loop")
    d.add_argument("--size", default="small", choices=list(model_config.PRESETS))
    d.add_argument("--family", default="", choices=["", "gpt2", "llama"])
    d.add_argument("--kv-heads", type=int, default=0, help="0: the preset's (no grouping)")
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--prompt-len", type=int, default=64)
    d.add_argument("--new-tokens", type=int, default=256)
    d.add_argument("--dtype", default="bfloat16")
    d.add_argument("--scan-layers", action="store_true")
    d.add_argument("--attention", default="auto", choices=["auto", "xla", "splash", "cudnn"])
    d.add_argument("--greedy", action="store_true", help="argmax instead of sampling at T=1")
    d.add_argument("--repeats", type=int, default=5)
    d.add_argument("--out", default="", help="append the JSON result line to this file")
    bench_rlhf.add_parsers(sub, list(model_config.PRESETS))
    bench_rollout.add_parser(sub, list(model_config.PRESETS))
    bench_packing.add_parser(sub, list(model_config.PRESETS))
    args = p.parse_args(argv)
    if args.cmd == "train":
        result = bench_train(args)
    elif args.cmd == "decode":
        result = bench_decode(args)
    elif args.cmd == "rm":
        result = bench_rlhf.bench_rm(args, environment, make_mesh)
    elif args.cmd == "ppo":
        result = bench_rlhf.bench_ppo(args, environment, make_mesh)
    elif args.cmd == "rollout":
        result = bench_rollout.bench_rollout(args, environment, make_mesh)
    elif args.cmd == "sft":
        result = bench_packing.bench_sft(args, environment, make_mesh)
    elif args.cmd == "dpo":
        result = bench_packing.bench_dpo(args, environment, make_mesh)
    else:
        raise ValueError(
            f"unknown benchmark: {args.cmd!r}; expected train, decode, rm, ppo, rollout, sft or dpo"
        )
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
