"""The generate command: sample completions of a JSONL prompt file from a stage checkpoint.

  python -m rlhf_jax.tools.generate --checkpoint WORKDIR --prompts prompts.jsonl --out out.jsonl \
      [--max-new-tokens 128] [--temperature 1.0] [--top-k 0] [--top-p 1.0] [--greedy] \
      [--batch-size 32] [--seed 0] [--num-samples 1] [--step N] [--template STR]

The command around `rlhf_jax/sampling/load.py` (a stage workdir -> sharded params, model config,
tokenizer) and the sampler. Each prompt line `{"prompt": "..."}` is formatted with `--template`,
else the checkpoint config's `data.prompt_template`, else used raw, and encoded as
[bos] + encode(text). Rows (prompt, sample) are batched over all devices (data parallel);
row i's PRNG stream is fold_in(fold_in(key(seed), prompt index), sample index), so outputs do
not depend on the batch size. A `{"messages": [...]}` line (a conversation ending with a user
turn) is rendered by the checkpoint's chat template instead (rlhf_jax/data/chat.py) and keeps its
`messages` field in place of `prompt` in the output. One JSON line per completion:

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
import json
import math
import os
import tempfile
import time

import jax
import numpy as np
import tqdm

from rlhf_jax.data import chat
from rlhf_jax.infra import cli, distributed, sharding
from rlhf_jax.sampling import load, sampler


class _Output:
    """The output file, written by process 0 only: to a temp file renamed at the end, so a killed
    run leaves no partial file. Other processes write to a sink."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = None

    def __enter__(self):
        if jax.process_index() != 0:
            self.f = open(os.devnull, "w")
            return self.f
        out_dir = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(out_dir, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".jsonl")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; outputs are for reading
        self.f = os.fdopen(fd, "w", encoding="utf-8")
        return self.f

    def __exit__(self, kind, value, tb):
        if self.tmp is None:
            self.f.close()
            return
        if kind is None:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        else:
            self.f.close()
            os.remove(self.tmp)


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
    distributed.initialize_from(args)
    prompts, lines = load.read_prompts(args.prompts)  # bad lines fail before the model loads
    # Every device of every process: each process reads the whole prompt file and places whole
    # batches (sharding.put_global); results are gathered on purpose (sharding.to_host).
    mesh = mesh_lib.build_mesh(mesh_lib.config(), jax.devices())
    rules = sharding.DEFAULT_RULES
    graphdef, params, cfg, tok, meta = load.load_model(args.checkpoint, mesh, rules, args.step)
    if cfg.head != "lm":
        raise ValueError(
            f"checkpoint {args.checkpoint} has a {cfg.head!r} head (a reward or value model); "
            "generate needs a language model (pretrain, SFT or PPO policy)"
        )

    template = args.template
    if template is None:
        template = meta.get("config", {}).get("data", {}).get("prompt_template")
    t_new = args.max_new_tokens
    room = None
    if cfg.family == "gpt2":  # learned positions end at max_len; RoPE has no hard limit
        room = cfg.max_len - t_new
        if room < 1:
            raise ValueError(f"--max-new-tokens {t_new} leaves no room in max_len={cfg.max_len}")
    ids = load.encode_prompts(prompts, lines, args.prompts, tok, template, room)

    # One prompt width for the whole file (rounded up to a multiple of 8): one compile.
    width = 8 * math.ceil(max(map(len, ids)) / 8)
    width = min(width, room) if room is not None else width
    rows = [(i, s) for i in range(len(ids)) for s in range(args.num_samples)]
    dp = sharding.data_parallel_size(mesh, rules)
    batch = dp * math.ceil(min(args.batch_size, len(rows)) / dp)  # rows split evenly over devices
    sample = sampler.make_sampler(
        graphdef,
        max_new_tokens=t_new,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        mesh=mesh,
        rules=rules,
    )
    knobs = dict(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy
    )

    writer = _Output(args.out)
    n_tokens = n_finished = 0
    bar = tqdm.tqdm(
        total=len(rows),
        desc="generate",
        unit="row",
        dynamic_ncols=True,
        disable=jax.process_index() != 0,
    )
    start = time.time()
    try:
        with writer as f:

            def write(chunk, out):
                nonlocal n_tokens, n_finished
                out = sharding.to_host(out)
                for j, (i, s) in enumerate(chunk):
                    n = int(out["lengths"][j])
                    rec = {
                        **chat.prompt_record(prompts[i]),
                        "response": tok.decode(out["response"][j, :n]),
                        "tokens": n,
                        "finished": bool(out["finished"][j]),
                        "sample": s,
                        "logprob": float(out["logprobs"][j, :n].sum()),
                    }
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    n_tokens += n
                    n_finished += rec["finished"]
                bar.update(len(chunk))
                dt = max(time.time() - start, 1e-9)
                bar.set_postfix_str(
                    f"{bar.n / args.num_samples / dt:.1f} prompts/s, {n_tokens / dt:.0f} tok/s"
                )

            pending = None
            for lo in range(0, len(rows), batch):
                chunk = rows[lo : lo + batch]
                # Dummy rows (a lone bos) fill the last batch; their outputs are dropped.
                batch_ids = [ids[i] for i, _ in chunk] + [[tok.bos_id]] * (batch - len(chunk))
                tokens, mask = load.left_pad(batch_ids, width, tok.pad_id)
                idx = np.array([i for i, _ in chunk] + [0] * (batch - len(chunk)))
                smp = np.array([s for _, s in chunk] + [0] * (batch - len(chunk)))
                host = {"tokens": tokens, "mask": mask, "keys": load.row_keys(args.seed, idx, smp)}
                dev = sharding.put_global(host, mesh, rules)
                keys = dev["keys"]
                out = sample(params, dev["tokens"], dev["mask"], keys, **knobs)
                if pending is not None:  # fetch the previous batch while this one runs
                    write(*pending)
                pending = (chunk, out)
            write(*pending)
    finally:
        bar.close()
    elapsed = time.time() - start
    summary = {
        "completions": len(rows),
        "prompts": len(prompts),
        "mean_tokens": n_tokens / len(rows),
        "finished": n_finished / len(rows),
        "tokens_per_sec": n_tokens / elapsed,
        "seconds": elapsed,
    }
    if jax.process_index() == 0:
        print(
            f"wrote {len(rows)} completions of {len(prompts)} prompts to {args.out}: mean length "
            f"{summary['mean_tokens']:.1f} tokens, {summary['finished']:.0%} ended with EOS, "
            f"{summary['tokens_per_sec']:.0f} new tokens/s ({elapsed:.1f}s incl. compile)",
            flush=True,
        )
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rlhf_jax.tools.generate",
        description="Sample completions of a JSONL prompt file from a stage checkpoint.",
    )
    p.add_argument("--checkpoint", required=True, help="stage workdir (or its checkpoints/)")
    p.add_argument("--prompts", required=True, help='JSONL, {"prompt"} or {"messages"} rows')
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--top-p", type=float, default=1.0, help="1 disables nucleus sampling")
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--batch-size", type=int, default=32, help="rows (prompt x sample) per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument(
        "--template", default=None, help="format string with {prompt} (default: the config's)"
    )
    distributed.add_flags(p)
    return p.parse_args(argv)


def main(argv=None):
    return cli.run_or_exit(run, parse_args(argv))


if __name__ == "__main__":
    main()
