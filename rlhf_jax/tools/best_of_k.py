"""Best-of-K: sample K responses per prompt from a policy, keep the one the reward model likes best.

  python -m rlhf_jax.tools.best_of_k --policy SFT_WORKDIR --reward RM_WORKDIR \
      --prompts prompts.jsonl --k 8 --out best.jsonl \
      [--temperature 1.0] [--max-new-tokens 128] [--seed 0] [--engine static|paged]

The usual inference-time baseline for RLHF (and the sampling half of rejection-sampling
fine-tuning, stages/rsft.py). Sampling is `generate`'s: the same prompt formatting, padding and
per-row PRNG streams, row (prompt i, sample s) drawing from fold_in(fold_in(key(seed), i), s),
so candidate s of prompt i is exactly what `python -m rlhf_jax.tools.generate --num-samples K
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
Bad input is one `error: ...` line, exit code 2. Several processes as generate (through
`launch.local --module rlhf_jax.tools.best_of_k` or a cluster launcher): process 0 writes. The
sampling and scoring are `rlhf_jax/sampling/best_of_k.py`'s.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from rlhf_jax.data import lm_data
from rlhf_jax.infra import cli, distributed
from rlhf_jax.sampling import best_of_k, load
from rlhf_jax.tools import generate


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
    from rlhf_jax.infra import mesh as mesh_lib

    _check_args(args)
    prompts, _ = load.read_prompts(args.prompts)  # bad lines fail before the model loads
    mesh = mesh_lib.build_mesh(mesh_lib.config(), jax.devices())
    start = time.time()
    recs = best_of_k.best_of_k(
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
        rollout=dict(engine=args.engine),
    )
    if jax.process_index() == 0:  # every process holds every record (gathered on purpose)
        lm_data.write_jsonl(args.out, recs)
    best = np.array([r["score"] for r in recs])
    every = np.array([c["score"] for r in recs for c in r["candidates"]])
    summary = {
        "prompts": len(recs),
        "k": args.k,
        "best_score": float(best.mean()),
        "candidate_score": float(every.mean()),
        "seconds": time.time() - start,
    }
    if jax.process_index() == 0:
        print(
            f"wrote best-of-{args.k} for {len(recs)} prompts to {args.out}: mean RM score "
            f"{summary['best_score']:.3f} chosen vs {summary['candidate_score']:.3f} over all "
            f"candidates ({summary['seconds']:.1f}s incl. compile)",
            flush=True,
        )
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rlhf_jax.tools.best_of_k",
        description="Best-of-K sampling: K samples per prompt, the reward model picks one.",
    )
    p.add_argument("--policy", required=True, help="policy stage workdir (LM head)")
    p.add_argument("--reward", required=True, help="reward-model stage workdir")
    p.add_argument("--prompts", required=True, help='JSONL file, {"prompt": "..."} per line')
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--k", type=int, default=8, help="samples per prompt")
    generate.add_sampling_flags(p, batch_size=64)
    distributed.add_flags(p)
    return p.parse_args(argv)


def main(argv=None):
    return cli.run_tool(run, parse_args(argv))


if __name__ == "__main__":
    main()
