"""Best-of-K: sample K responses per prompt from a policy, keep the one the reward model likes best.

  python -m rlhf_jax.best_of_k --policy SFT_WORKDIR --reward RM_WORKDIR --prompts prompts.jsonl \
      --k 8 --out best.jsonl [--temperature 1.0] [--max-new-tokens 128] [--seed 0]

The usual inference-time baseline for RLHF (and the sampling half of rejection-sampling
fine-tuning, stages/rsft.py). Sampling is `generate`'s: the same prompt formatting, padding and
per-row PRNG streams, row (prompt i, sample s) drawing from fold_in(fold_in(key(seed), i), s),
so candidate s of prompt i is exactly what `python -m rlhf_jax.generate --num-samples K
--seed S` writes for that row. Scores are the RM's, with its stored normalisation bias, read at
the last token of what the policy produced, as PPO scores its rollouts: [bos] + the RM's prompt
template + response, + [eos] only when the candidate finished (a response cut at the length
limit is scored where it was cut, never given an EOS it did not emit). The chosen response is
the argmax of the K scores; a tie goes to the lowest sample index.

One JSON line per prompt, written to a temp file and renamed at the end:

  {"prompt", "response", "score", "tokens", "finished",
   "candidates": [{"response", "score", "finished", "tokens", "logprob"}, ...]}

"tokens" counts response tokens including EOS, "logprob" is the sampled tokens' summed
log-probability under the distribution that drew them (temperature, top-k, top-p applied).
Bad input is one `error: ...` line, exit code 2. Single process (as generate).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

from rlhf_jax import checkpoint, cli, data, data_demos, generate, reward, sampling, sharding


def sample_candidates(
    policy_dir: str,
    prompts: Sequence[str],
    k: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_new_tokens: int,
    seed: int,
    mesh,
    rules=None,
    template: str | None = None,
    batch_size: int = 64,
    index_offset: int = 0,
) -> list[list[dict]]:
    """K completions of every prompt, sampled as `generate` samples them.

    Args:
      policy_dir: a stage workdir with an LM head.
      prompts: raw prompt texts.
      k: completions per prompt.
      temperature, top_k, top_p: sampling knobs (see `sampling.sampling_mode`).
      max_new_tokens: T, the response length limit.
      seed: the root of the per-row PRNG streams.
      mesh, rules: where the policy is placed; rows are sharded over `act_batch`.
      template: the prompt format; None: the checkpoint config's `data.prompt_template`.
      batch_size: rows (prompt x sample) per compiled call.
      index_offset: prompt i draws from stream index_offset + i (a caller sampling a long prompt
        stream in chunks gives each chunk its own streams).

    Returns:
      Per prompt, K records {"prompt", "response", "tokens", "finished", "sample", "logprob",
      "ids"}; "ids" are the sampled response tokens (EOS included when finished).
    """
    if k < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(
            f"k, max_new_tokens and batch_size must be >= 1; got {k}, "
            f"{max_new_tokens}, {batch_size}"
        )
    if not prompts:
        raise ValueError("no prompts to sample")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(
            'best-of-K takes {"prompt": str} rows; conversation ({"messages"}) prompts are not '
            "supported yet"
        )
    rules = sharding.normalize_rules(rules if rules is not None else sharding.DEFAULT_RULES)
    knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    sampling.sampling_mode(greedy=False, **knobs)  # bad knobs fail before the model loads
    graphdef, params, cfg, tok, meta = generate.load_model(policy_dir, mesh, rules)
    if cfg.head != "lm":
        raise ValueError(f"policy {policy_dir} has a {cfg.head!r} head; sampling needs an LM")
    if template is None:
        template = meta.get("config", {}).get("data", {}).get("prompt_template")
    room = None
    if cfg.family == "gpt2":  # learned positions end at max_len
        room = cfg.max_len - max_new_tokens
        if room < 1:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room in max_len={cfg.max_len}"
            )
    lines = list(range(1, len(prompts) + 1))
    ids = generate.encode_prompts(list(prompts), lines, "prompts", tok, template, room)

    # The prompt width and batch shape generate.run picks, so the rows come out the same.
    width = 8 * math.ceil(max(map(len, ids)) / 8)
    width = min(width, room) if room is not None else width
    rows = [(i, s) for i in range(len(ids)) for s in range(k)]
    dp = sharding.data_parallel_size(mesh, rules)
    batch = dp * math.ceil(min(batch_size, len(rows)) / dp)
    groups: list[list[dict]] = [[] for _ in prompts]

    def collect(chunk, out):
        out = sharding.to_host(out)
        for j, (i, s) in enumerate(chunk):
            n = int(out["lengths"][j])
            resp = out["response"][j, :n]
            groups[i].append(
                {
                    "prompt": prompts[i],
                    "response": tok.decode(resp),
                    "tokens": n,
                    "finished": bool(out["finished"][j]),
                    "sample": s,
                    "logprob": float(out["logprobs"][j, :n].sum()),
                    "ids": [int(t) for t in resp],
                }
            )

    pending = None
    for lo in range(0, len(rows), batch):
        chunk = rows[lo : lo + batch]
        # Dummy rows (a lone bos) fill the last batch; their outputs are dropped.
        batch_ids = [ids[i] for i, _ in chunk] + [[tok.bos_id]] * (batch - len(chunk))
        tokens, mask = generate.left_pad(batch_ids, width, tok.pad_id)
        idx = np.array([index_offset + i for i, _ in chunk] + [0] * (batch - len(chunk)))
        smp = np.array([s for _, s in chunk] + [0] * (batch - len(chunk)))
        # Every process holds the whole batch: placed globally (multi-process safe).
        dev = sharding.put_global(
            {"tokens": tokens, "mask": mask, "keys": generate.row_keys(seed, idx, smp)}, mesh, rules
        )
        keys = dev["keys"]
        out = sampling.generate(
            graphdef,
            params,
            dev["tokens"],
            dev["mask"],
            keys,
            max_new_tokens=max_new_tokens,
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
            mesh=mesh,
            rules=rules,
            **knobs,
        )
        if pending is not None:  # fetch the previous batch while this one runs
            collect(*pending)
        pending = (chunk, out)
    collect(*pending)
    return groups


def encode_scored(
    pairs: Sequence[tuple[str, str]], finished: Sequence[bool], tok, template: str, seq_len: int
):
    """(tokens int32 [N, L], mask bool [N, L]), right-padded: [bos] + template(prompt) +
    response, + [eos] only where `finished`, cut at the right to L = seq_len."""
    tokens = np.full((len(pairs), seq_len), tok.pad_id, np.int32)
    mask = np.zeros((len(pairs), seq_len), bool)
    for i, ((prompt, response), done) in enumerate(zip(pairs, finished, strict=True)):
        ids = data_demos.prompt_ids(tok, template, prompt) + tok.encode(response)
        ids = (ids + ([tok.eos_id] if done else []))[:seq_len]
        tokens[i, : len(ids)], mask[i, : len(ids)] = ids, True
    return tokens, mask


def load_scorer(rm_dir: str, mesh, rules=None, batch_size: int = 32):
    """`score(pairs, finished=None) -> float64 [N]`: the RM in `rm_dir` on (prompt, response)
    pairs, plus its normalisation bias, each read as the RM was trained (its own template and
    seq_len) at the last token of the response, its EOS when `finished[i]` (None: all
    finished, i.e. `reward.score_texts`)."""
    rules = sharding.normalize_rules(rules if rules is not None else sharding.DEFAULT_RULES)
    graphdef, params, cfg, tok, meta = generate.load_model(rm_dir, mesh, rules)
    if cfg.head != "scalar":
        raise ValueError(f"reward model {rm_dir} has a {cfg.head!r} head; expected a scalar head")
    config = meta.get("config", {})
    template = config.get("data", {}).get("prompt_template") or "{prompt}"
    seq_len = config.get("train", {}).get("seq_len") or cfg.max_len
    bias = float(meta.get("reward_bias", 0.0))
    dp = sharding.data_parallel_size(mesh, rules)
    rows = max(dp, batch_size - batch_size % dp)

    def fn(params, tokens, mask):
        with sharding.use_rules(mesh, rules):
            return reward.sequence_scores(graphdef, params, tokens, mask, right_padded=True)

    jitted = jax.jit(fn)

    def score(pairs: Sequence[tuple[str, str]], finished: Sequence[bool] | None = None):
        pairs = list(pairs)
        finished = [True] * len(pairs) if finished is None else list(finished)
        out = []
        for lo in range(0, len(pairs), rows):
            chunk = slice(lo, lo + rows)
            tokens, mask = encode_scored(pairs[chunk], finished[chunk], tok, template, seq_len)
            n = len(tokens)
            if n < rows:  # fill the last batch with 1-token dummy rows (one compiled shape)
                tokens = np.concatenate([tokens, np.full((rows - n, seq_len), tok.pad_id)])
                mask = np.concatenate([mask, np.zeros((rows - n, seq_len), bool)])
                mask[n:, 0] = True
            batch = sharding.put_global({"t": tokens.astype(np.int32), "m": mask}, mesh, rules)
            got = sharding.to_host(jitted(params, batch["t"], batch["m"]))
            out.append(np.asarray(got, np.float64)[:n])
        return (np.concatenate(out) if out else np.zeros(0)) + bias

    return score


def select(groups: Sequence[Sequence[dict]], scores: Sequence[Sequence[float]]) -> list[dict]:
    """Best-of-K records: per prompt the argmax-score candidate (ties: lowest index) and all K.

    Args:
      groups: per prompt, its candidate records (from `sample_candidates`).
      scores: per prompt, the candidates' scores [K].

    Returns:
      {"prompt", "response", "score", "tokens", "finished", "best", "candidates": [{"response",
      "score", "finished", "tokens", "logprob"}, ...]} per prompt.
    """
    out = []
    for group, sc in zip(groups, scores, strict=True):
        sc = np.asarray(sc, np.float64)
        best = int(np.argmax(sc))  # the first maximum: ties go to the lowest index
        b = group[best]
        cands = [
            {
                "response": c["response"],
                "score": float(s),
                "finished": c["finished"],
                "tokens": c["tokens"],
                "logprob": c["logprob"],
            }
            for c, s in zip(group, sc, strict=True)
        ]
        out.append(
            {
                "prompt": b["prompt"],
                "response": b["response"],
                "score": float(sc[best]),
                "tokens": b["tokens"],
                "finished": b["finished"],
                "best": best,
                "candidates": cands,
            }
        )
    return out


def best_of_k(
    policy_dir: str,
    rm_dir: str,
    prompts: Sequence[str],
    k: int,
    *,
    temperature: float = 1.0,
    max_new_tokens: int,
    seed: int,
    mesh,
    rules=None,
    template: str | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 64,
    index_offset: int = 0,
) -> list[dict]:
    """Samples K responses per prompt from `policy_dir` and keeps the one `rm_dir` scores best.

    Args:
      policy_dir: the policy's stage workdir (LM head).
      rm_dir: the reward model's stage workdir (scalar head; its stored bias is added).
      prompts, k, temperature, top_k, top_p, max_new_tokens, seed, template, batch_size,
        index_offset: as `sample_candidates`.
      mesh, rules: where the models are placed (one at a time: the policy is freed before the
        RM loads).

    Returns:
      One record per prompt, as `select` returns.
    """
    meta = checkpoint.read_meta(rm_dir) or {}
    head = meta.get("model", {}).get("head")
    if head != "scalar":  # before the (long) sampling, not after it
        raise ValueError(f"reward model {rm_dir} has a {head!r} head; expected a scalar head")
    groups = sample_candidates(
        policy_dir,
        prompts,
        k,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        mesh=mesh,
        rules=rules,
        template=template,
        batch_size=batch_size,
        index_offset=index_offset,
    )
    score = load_scorer(rm_dir, mesh, rules)
    cands = [c for g in groups for c in g]
    flat = score([(c["prompt"], c["response"]) for c in cands], [c["finished"] for c in cands])
    return select(groups, flat.reshape(len(groups), k))


def _check_args(args):
    for name in ("prompts", "policy", "reward"):
        path = getattr(args, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--{name} {path} does not exist")
    if args.k < 1:
        raise ValueError("--k must be at least 1")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")


def run(args) -> dict:
    """Runs the command as `args` say; returns the summary numbers."""
    from experiments import common
    from launch import mesh as mesh_lib

    _check_args(args)
    prompts, _ = generate.read_prompts(args.prompts)  # bad lines fail before the model loads
    mesh = mesh_lib.build_mesh(common.mesh_config(), jax.local_devices())
    start = time.time()
    recs = best_of_k(
        args.policy,
        args.reward,
        prompts,
        args.k,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        mesh=mesh,
        template=args.template,
        batch_size=args.batch_size,
    )
    data.write_jsonl(args.out, recs)
    best = np.array([r["score"] for r in recs])
    every = np.array([c["score"] for r in recs for c in r["candidates"]])
    summary = {
        "prompts": len(recs),
        "k": args.k,
        "best_score": float(best.mean()),
        "candidate_score": float(every.mean()),
        "seconds": time.time() - start,
    }
    print(
        f"wrote best-of-{args.k} for {len(recs)} prompts to {args.out}: mean RM score "
        f"{summary['best_score']:.3f} chosen vs {summary['candidate_score']:.3f} over all "
        f"candidates ({summary['seconds']:.1f}s incl. compile)",
        flush=True,
    )
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rlhf_jax.best_of_k",
        description="Best-of-K sampling: K samples per prompt, the reward model picks one.",
    )
    p.add_argument("--policy", required=True, help="policy stage workdir (LM head)")
    p.add_argument("--reward", required=True, help="reward-model stage workdir")
    p.add_argument("--prompts", required=True, help='JSONL file, {"prompt": "..."} per line')
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables nucleus sampling")
    p.add_argument("--batch-size", type=int, default=64, help="rows (prompt x sample) per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--template", default=None, help="format string with {prompt} (default: the policy's)"
    )
    return p.parse_args(argv)


def main(argv=None):
    return cli.run_or_exit(run, parse_args(argv))


if __name__ == "__main__":
    main()
