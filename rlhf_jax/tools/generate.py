"""The generate command: sample completions of a JSONL prompt file from a stage checkpoint.

  python -m rlhf_jax.tools.generate --checkpoint WORKDIR --prompts prompts.jsonl --out out.jsonl \
      [--max-new-tokens 128] [--temperature 1.0] [--top-k 0] [--top-p 1.0] [--greedy] \
      [--batch-size 32] [--seed 0] [--num-samples 1] [--step N] [--template STR] \
      [--engine static|paged]

The command around `rlhf_jax/sampling/completions.py` (prompt formatting, batching, per-row PRNG
streams and the output format are documented there). One JSON line per completion:

  {"prompt", "response", "tokens": response length incl. EOS, "finished": ended with EOS,
   "sample": sample index, "logprob": summed log-probability under the sampling distribution
   (temperature-scaled, renormalised over the top-k / top-p set)}

The output is written to a temp file and renamed at the end, so a killed run leaves no partial
file. Bad input ends with one `error: ...` line on stderr and exit code 2. Several processes:
`python -m launch.local --processes 2 --devices_per_process 4 --module rlhf_jax.tools.generate --
--checkpoint ...` (or the cluster's own launcher) runs it over every device; process 0 writes.
"""

from __future__ import annotations

import argparse
import os

import jax

from rlhf_jax.infra import cli, distributed
from rlhf_jax.sampling import completions, sampler


def _check_args(args):
    if not os.path.isfile(args.prompts):
        raise FileNotFoundError(f"prompts file {args.prompts} does not exist")
    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"checkpoint directory {args.checkpoint} does not exist")
    for name in ("max_new_tokens", "batch_size", "num_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    sampler.sampling_mode(args.temperature, args.top_k, args.top_p, args.greedy)


def run(args) -> dict:
    """Generates completions as `args` say; returns the summary numbers."""
    from rlhf_jax.infra import mesh as mesh_lib

    _check_args(args)
    # Every device of every process (one process unless started as several).
    mesh = mesh_lib.build_mesh(mesh_lib.config(), jax.devices())
    kw = vars(args).copy()
    for name in ("coordinator_address", "num_processes", "process_id"):
        kw.pop(name, None)
    kw["rollout"] = dict(engine=kw.pop("engine"))
    return completions.write_completions(mesh=mesh, **kw)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rlhf_jax.tools.generate",
        description="Sample completions of a JSONL prompt file from a stage checkpoint.",
    )
    p.add_argument("--checkpoint", required=True, help="stage workdir (or its checkpoints/)")
    p.add_argument("--prompts", required=True, help='JSONL, {"prompt"} or {"messages"} rows')
    p.add_argument("--out", required=True, help="output JSONL file")
    add_sampling_flags(p, batch_size=32)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    distributed.add_flags(p)
    return p.parse_args(argv)


def add_sampling_flags(p: argparse.ArgumentParser, batch_size: int) -> None:
    """The sampling settings every sampling tool takes (generate, best_of_k)."""
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables nucleus sampling")
    p.add_argument(
        "--batch-size", type=int, default=batch_size, help="rows (prompt x sample) per batch"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine",
        choices=("static", "paged"),
        default="static",
        help="generator: the static sampler or the paged rollout engine (sampling/rollout.py)",
    )
    p.add_argument(
        "--template", default=None, help="format string with {prompt} (default: the policy's)"
    )


def main(argv=None):
    return cli.run_tool(run, parse_args(argv))


if __name__ == "__main__":
    main()
