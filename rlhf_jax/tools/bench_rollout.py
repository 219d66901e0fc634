"""Rollout benchmark: the static sampler and the engine side by side on the same rows.

  python -m rlhf_jax.tools.bench rollout --size mini --rows 256 --slots 32 --prompt-len 16 \\
      --new-tokens 128

One process, one model, the same prompts and row keys through `sampler.make_sampler` (batches
of --slots rows, each decoding until its slowest row ends) and `engine.make_engine` (--slots
decode slots over the whole queue), for two response-length sets: `long_tail` (a fraction --tail
of the rows runs to the token limit, the others stop after 1 + a geometric number of tokens of
mean --short-mean - 1: skewed, as a pretrained model's and an SFT model's answers are) and
`short` (every row --short-len tokens: the static batch's best case). Prints one JSON line: per
set and sampler samples/s, new tokens/s, the useful fraction of slot-steps (sampled tokens over
slots x decode steps; a row's first token comes from its prefill call in both samplers, so rows
of equal length L score L / (L - 1)), peak KV bytes (static: the batch's dense cache, B x (P + T)
tokens; engine: the most pages in use at once x page bytes), and the engine's speedup next to the
one the useful fractions predict.

Forced lengths: the model is a random-init LLaMA-family model (untied head) whose attention and
MLP output projections are zeroed and whose head maps each token's normed embedding to the next
token id's, so a row whose prompt ends in token a continues a+1, a+2, ... up to the stop id V-1:
its length is set by its last prompt token, under greedy decoding or sampling at T=1 alike (the
logit gap is ~D). Every matmul still runs at full size, so the timing is the model's.
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import numpy as np

from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import paged
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.sampling import engine, sampler


def forced_length_params(params, cfg):
    """Params whose continuation of a prompt ending in token a is a+1, a+2, ..., V-1 (module
    docstring): attention and MLP outputs zeroed, lm_head[:, v] = the normed embedding of v-1."""
    p = jax.tree.map(np.array, jax.device_get(params))
    for block in p["blocks"].values():
        block["attn"]["o"][...] = 0
        block["mlp"]["down"][...] = 0
    emb = p["embed"].astype(np.float32)  # [V, D]
    normed = emb / np.sqrt(np.mean(emb**2, axis=-1, keepdims=True) + cfg.norm_eps)
    p["lm_head"] = np.roll(normed * p["final_norm"]["scale"], 1, axis=0).T.astype(
        p["lm_head"].dtype
    )  # [D, V]: column v is row v-1
    return p


def draw_lengths(args, rng) -> dict[str, np.ndarray]:
    """Response lengths per row of each set (T + 1: runs to the limit without a stop)."""
    n, t = args.rows, args.new_tokens
    short = 1 + rng.geometric(1.0 / args.short_mean, n) - 1
    tail = np.where(rng.random(n) < args.tail, t + 1, np.minimum(short, t))
    return {"long_tail": tail, "short": np.full(n, min(args.short_len, t))}


def prompts_for(lengths, args, vocab: int, rng):
    """Left-padded prompts of P/4..P tokens whose last token sets the response length."""
    n, p = len(lengths), args.prompt_len
    tokens = np.zeros((n, p), np.int32)
    mask = np.zeros((n, p), bool)
    for i, length in enumerate(lengths):
        k = int(rng.integers(max(1, p // 4), p + 1))
        tokens[i, p - k :] = rng.integers(1, vocab - 1, k)
        tokens[i, -1] = vocab - 1 - length  # continues to the stop id V-1 in `length` tokens
        mask[i, p - k :] = True
    return tokens, mask


def _timed(fns, repeats: int):
    """(last outputs, median seconds) of each function, compiled first, run interleaved so
    that a change in the machine's load falls on both."""
    outs = [jax.block_until_ready(fn()) for fn in fns]
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = jax.block_until_ready(fn())
            times[i].append(time.perf_counter() - t0)
    return outs, [statistics.median(t) for t in times]


def _compare(static, eng, params, rows, lengths, cfg, args) -> dict:
    """Times both samplers on one set of rows (prompts, mask, keys); checks equal tokens."""
    p_len, t_new, b = args.prompt_len, args.new_tokens, args.static_batch or args.slots
    prompts, mask, keys = rows
    knobs = {"greedy": True} if args.greedy else {"temperature": 1.0}
    batches = [slice(i, i + b) for i in range(0, args.rows, b)]
    run_static = lambda: [static(params, prompts[s], mask[s], keys[s], **knobs) for s in batches]
    run_engine = lambda: eng(params, prompts, mask, keys, **knobs)
    (outs, out), (static_s, engine_s) = _timed([run_static, run_engine], args.repeats)
    tokens = np.concatenate([np.asarray(o["tokens"]) for o in outs])
    if not np.array_equal(tokens, np.asarray(out["tokens"])):
        raise RuntimeError("the engine's tokens differ from the static sampler's")
    new = int(np.sum(np.minimum(lengths, t_new)))
    static_steps = sum(int(o["steps"]) - 1 for o in outs)  # decode steps: token 0 is prefill's

    def row(secs, useful, kv):
        return {
            "samples_per_s": round(args.rows / secs, 2),
            "new_tokens_per_s": round(new / secs, 1),
            "useful_fraction": round(useful, 4),
            "peak_kv_bytes": int(kv),
            "seconds": round(secs, 3),
        }

    token_bytes = paged.page_bytes(cfg, 1)  # keys and values of one token, every layer
    s_row = row(static_s, new / (b * static_steps), b * (p_len + t_new) * token_bytes)
    e_row = row(
        engine_s,  # its useful fraction is over its own slots (args.slots)
        int(out["useful_slot_steps"]) / int(out["slot_steps"]),
        int(out["peak_pages"]) * paged.page_bytes(cfg, args.page_size),
    )
    e_row.update(steps=int(out["steps"]), prefill_calls=int(out["prefill_calls"]),
                 preemptions=int(out["preemptions"]))  # fmt: skip
    return {
        "mean_length": round(new / args.rows, 2),
        "static": {**s_row, "steps": static_steps},
        "engine": e_row,
        "speedup": round(static_s / engine_s, 3),
        "predicted_speedup": round(e_row["useful_fraction"] / s_row["useful_fraction"], 3),
    }


def bench_rollout(args, environment, make_mesh) -> dict:
    p_len, t_new, b = args.prompt_len, args.new_tokens, args.slots
    overrides = dict(d_model=args.d_model or None, n_layers=args.layers or None)
    cfg = model_config.preset(
        args.size, family="llama", dtype=args.dtype, max_len=p_len + t_new, **overrides
    )
    if cfg.vocab_size < t_new + 3:
        raise ValueError(f"vocab {cfg.vocab_size} too small to force lengths up to {t_new}")
    for flag, n in (("--slots", b), ("--static-batch", args.static_batch or b)):
        if args.rows % n:
            raise ValueError(f"--rows {args.rows} is not a multiple of {flag} {n}")
    graphdef, _, shardings = state_lib.param_shardings(cfg, make_mesh(1, 1), sharding.DEFAULT_RULES)
    params = forced_length_params(state_lib.init_params(cfg, 0, shardings), cfg)
    params = jax.device_put(params, shardings)
    eos, rng = cfg.vocab_size - 1, np.random.default_rng(args.seed)
    static = sampler.make_sampler(graphdef, max_new_tokens=t_new, eos_id=eos, pad_id=0)
    eng = engine.make_engine(
        graphdef, max_new_tokens=t_new, eos_id=eos, pad_id=0, num_slots=b,
        page_size=args.page_size, num_pages=args.num_pages or None,
        prefill_chunk=None if args.prefill_chunk < 0 else args.prefill_chunk,
        prefill_rows=args.prefill_rows or None,
    )  # fmt: skip
    results = {}
    for name, lengths in draw_lengths(args, rng).items():
        prompts, mask = prompts_for(lengths, args, cfg.vocab_size, rng)
        keys = jax.random.split(jax.random.key(args.seed), args.rows)
        results[name] = _compare(static, eng, params, (prompts, mask, keys), lengths, cfg, args)
    sizes = eng.sizes(args.rows, p_len)
    return {
        "bench": "rollout",
        "size": args.size,
        "params_M": round(model_lib.param_count(params) / 1e6, 2),
        "d_model": cfg.d_model,
        "layers": cfg.n_layers,
        "dtype": args.dtype,
        "rows": args.rows,
        "slots": b,
        "static_batch": args.static_batch or b,
        "prompt_len": p_len,
        "new_tokens": t_new,
        "page_size": args.page_size,
        "num_pages": sizes.num_pages,
        "prefill_chunk": sizes.chunk,
        "prefill_rows": sizes.prefill_rows,
        "greedy": args.greedy,
        "results": results,
        **environment(),
        "command": "python -m rlhf_jax.tools.bench " + " ".join(sys.argv[1:]),
    }


def add_parser(sub, sizes):
    r = sub.add_parser("rollout", help="static sampler vs the engine on skewed and short lengths")
    r.add_argument("--size", default="mini", choices=sizes)
    r.add_argument("--d-model", type=int, default=0, help="0: the preset's")
    r.add_argument("--layers", type=int, default=0, help="0: the preset's")
    r.add_argument("--dtype", default="float32")
    r.add_argument("--rows", type=int, default=256, help="rows (samples) in the queue")
    r.add_argument("--slots", type=int, default=32, help="engine slots (and static batch)")
    r.add_argument("--static-batch", type=int, default=0, help="static batch size; 0: --slots")
    r.add_argument("--prompt-len", type=int, default=16)
    r.add_argument("--new-tokens", type=int, default=128)
    r.add_argument("--tail", type=float, default=0.25, help="long_tail: rows run to the limit")
    r.add_argument("--short-mean", type=float, default=8.0, help="long_tail: others' mean")
    r.add_argument("--short-len", type=int, default=16, help="short: every row's length")
    r.add_argument("--page-size", type=int, default=16)
    r.add_argument("--num-pages", type=int, default=0, help="0: every slot at full length")
    r.add_argument("--prefill-chunk", type=int, default=-1, help="-1: P; 0: token by token")
    r.add_argument("--prefill-rows", type=int, default=0, help="0: the engine's default")
    r.add_argument("--greedy", action="store_true", help="argmax instead of sampling at T=1")
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", default="", help="append the JSON result line to this file")
