"""Benchmarks of the RLHF steps: reward-model training and one PPO-ptx iteration.

  python -m rlhf_jax.tools.bench rm --size small --batch 32 --k 4 --seq-len 512
  python -m rlhf_jax.tools.bench ppo --size small --batch 64 --prompt-len 256 --new-tokens 256

Random-init models and random tokens (no checkpoints, no tokenizer), the real jitted steps.
`ppo` times rollout / score / update of full iterations (policy, reference, value and reward
models; `--value-size` sets the value and reward models' size, e.g. a 1.3b policy with a medium
RM), with EOS disabled so every response has `--new-tokens` tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import transformer as model_lib


def _cfg(args, size, **kw):
    base = model_config.PRESETS[size].get("max_len", 1024)
    need = getattr(args, "prompt_len", 0) + getattr(args, "new_tokens", 0)
    need = max(need, getattr(args, "seq_len", 0))
    return model_config.preset(
        size,
        family=args.family or None,
        dtype=args.dtype,
        scan_layers=args.scan_layers,
        max_len=max(base, need),
        **kw,
    )


def bench_rm(args, environment, make_mesh) -> dict:
    from rlhf_jax.stages import rm

    cfg = _cfg(args, args.size, head="scalar")
    mesh = make_mesh(args.fsdp, args.tensor)
    rules = sharding.DEFAULT_RULES
    tx = state_lib.make_optimizer(state_lib.OptimConfig(total_steps=10_000))
    graphdef, state, shardings = state_lib.create_train_state(cfg, tx, mesh, rules, seed=0)
    step = jax.jit(
        functools.partial(
            rm.train_step,
            graphdef=graphdef,
            tx=tx,
            batching="per_prompt",
            margin=0.0,
            mesh=mesh,
            rules=rules,
        ),
        in_shardings=(shardings, None),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    rng = np.random.default_rng(0)
    b, k, n = args.batch, args.k, args.seq_len
    host = {
        "tokens": rng.integers(4, cfg.vocab_size, (b, k, n), dtype=np.int32),
        "mask": np.ones((b, k, n), bool),
        "ranks": np.tile(np.arange(k, dtype=np.int32), (b, 1)),
        "kmask": np.ones((b, k), np.float32),
    }
    batch = sharding.put_batch(host, mesh, rules)
    times, compile_s = _time(lambda s: step(s, batch), state, args.steps, args.warmup)
    med = statistics.median(times)
    return {
        "bench": "rm",
        "size": args.size,
        "batch_prompts": b,
        "k": k,
        "seq_len": n,
        "median_step_ms": round(med * 1e3, 2),
        "comparisons_per_sec": round(b / med, 1),
        "pairs_per_sec": round(b * k * (k - 1) / 2 / med, 1),
        "tokens_per_sec": round(b * k * n / med),
        "compile_s": round(compile_s, 1),
        **environment(),
        "command": "python -m rlhf_jax.tools.bench " + " ".join(sys.argv[1:]),
    }


def _time(fn, state, steps, warmup):
    t0 = time.perf_counter()
    state, m = fn(state)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = fn(state)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = fn(state)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return times, compile_s


def _experiment_config(spec: str, size: str):
    """`FILE[:ARG]` -> that experiment file's `get_config(ARG or "size=SIZE")`.

    Read by path, as `launch.run` does, so the library never imports `experiments/`.
    """
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location("bench_experiment", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or f"size={size}")


def bench_ppo(args, environment, make_mesh) -> dict:
    from rlhf_jax.stages import ppo, ppo_steps

    policy_cfg = _cfg(args, args.size)
    value_cfg = dataclasses.replace(_cfg(args, args.value_size or args.size), head="scalar")
    cfgs = {"policy": policy_cfg, "ref": policy_cfg, "value": value_cfg, "reward": value_cfg}
    mesh = make_mesh(args.fsdp, args.tensor)
    rules = sharding.normalize_rules(sharding.DEFAULT_RULES)
    config = _experiment_config(args.config, args.size)
    config.ppo.update(
        rollout_batch=args.batch,
        minibatch=args.minibatch,
        epochs=args.epochs,
        prompt_len=args.prompt_len,
        max_new_tokens=args.new_tokens,
        ptx_batch=args.minibatch,
        ptx_seq_len=args.prompt_len + args.new_tokens,
    )
    ppo_cfg = ppo_steps.ppo_config_from(config, eos_id=-1)  # no EOS: every response is full length
    graphdefs = {k: model_lib.abstract(v)[0] for k, v in cfgs.items()}
    init = {
        k: state_lib.init_params(v, i, state_lib.param_shardings(v, mesh, rules)[2])
        for i, (k, v) in enumerate(cfgs.items())
    }
    tx = ppo_steps.make_tx(ppo_cfg, 1000)
    shardings, _, _ = ppo.train_state_shardings(cfgs, tx, mesh, rules)
    params = {"policy": init["policy"], "value": init["value"]}
    opt = jax.jit(lambda p: {k: tx[k].init(p[k]) for k in p}, out_shardings=shardings["opt_state"])(
        params
    )
    step0 = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])  # committed: no recompile
    state = {"step": step0, "params": params, "opt_state": opt}

    class _Tok:  # the sampler needs only these ids
        eos_id, eos_ids, pad_id = -1, (-1,), 0

    it = ppo.Iteration(config, _Tok, cfgs, graphdefs, tx, shardings, mesh, rules, ppo_cfg)
    rng = np.random.default_rng(0)
    b, p = args.batch, args.prompt_len
    host = {
        "tokens": rng.integers(4, policy_cfg.vocab_size, (b, p), dtype=np.int32),
        "mask": np.ones((b, p), bool),
        "sample": np.arange(b, dtype=np.int32),  # the rows' PRNG ids
    }
    n_up = ppo_cfg.epochs * ppo_cfg.updates_per_epoch
    toks = rng.integers(4, policy_cfg.vocab_size, (args.minibatch, n_up, p + args.new_tokens + 1))
    ptx = sharding.put_batch(
        {
            "inputs": toks[..., :-1].astype(np.int32),
            "targets": toks[..., 1:].astype(np.int32),
            "mask": np.ones(toks[..., 1:].shape, np.float32),
        },
        mesh,
        rules,
    )
    frozen = {
        "ref": init["ref"],
        "reward": init["reward"],
        "kl_coef": jnp.float32(0.02),
        "reward_bias": jnp.float32(0.0),
        "ext_scores": jnp.zeros((b,), jnp.float32),
    }
    splits = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        roll = it.rollout(state["params"], sharding.put_batch(host, mesh, rules), i, 0)
        jax.block_until_ready(roll)
        t1 = time.perf_counter()
        batch, _ = it.score(state["params"], frozen, roll)
        jax.block_until_ready(batch)
        t2 = time.perf_counter()
        state, m = it.update(state, batch, ptx, jax.random.key(i))
        jax.block_until_ready(m)
        t3 = time.perf_counter()
        splits.append((t1 - t0, t2 - t1, t3 - t2))
    compile_s = sum(splits[0])
    timed = splits[args.warmup :]
    roll_s, score_s, upd_s = (statistics.median(x) for x in zip(*timed, strict=True))
    total = roll_s + score_s + upd_s
    return {
        "bench": "ppo",
        "size": args.size,
        "value_size": args.value_size or args.size,
        "batch": b,
        "prompt_len": p,
        "new_tokens": args.new_tokens,
        "epochs": args.epochs,
        "minibatch": args.minibatch,
        "iteration_s": round(total, 3),
        "rollout_s": round(roll_s, 3),
        "score_s": round(score_s, 3),
        "update_s": round(upd_s, 3),
        "rollout_fraction": round(roll_s / total, 3),
        "samples_per_sec": round(b / total, 2),
        "first_iteration_s": round(compile_s, 1),
        **environment(),
        "command": "python -m rlhf_jax.tools.bench " + " ".join(sys.argv[1:]),
    }


def add_parsers(sub, sizes):
    r = sub.add_parser("rm", help="reward-model train-step throughput (per_prompt, K-way)")
    p = sub.add_parser("ppo", help="one PPO-ptx iteration: rollout / score / update split")
    for x in (r, p):
        x.add_argument("--size", default="small", choices=sizes)
        x.add_argument("--family", default="", choices=["", "gpt2", "llama"])
        x.add_argument("--dtype", default="bfloat16")
        x.add_argument("--scan-layers", action="store_true")
        x.add_argument("--fsdp", type=int, default=1)
        x.add_argument("--tensor", type=int, default=1)
        x.add_argument("--steps", type=int, default=5)
        x.add_argument("--warmup", type=int, default=1)
        x.add_argument("--out", default="", help="append the JSON result line to this file")
    r.add_argument("--batch", type=int, default=32, help="prompts per step")
    r.add_argument("--k", type=int, default=4, help="responses per prompt")
    r.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--value-size", default="", choices=["", *sizes])
    p.add_argument(
        "--config",
        default="experiments/ppo_ptx.py",
        help="experiment file[:arg] whose ppo settings the benchmark starts from",
    )
    p.add_argument("--batch", type=int, default=64, help="prompts per iteration")
    p.add_argument("--minibatch", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
