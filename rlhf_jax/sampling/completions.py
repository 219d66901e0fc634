"""Completions of a JSONL prompt file from a stage checkpoint, written as JSONL: the generate tool's
work, which the pipeline's collection and evaluation also call in-process.

Each prompt line `{"prompt": "..."}` is formatted with `template`, else the checkpoint config's
`data.prompt_template`, else used raw, and encoded as [bos] + encode(text); a `{"messages": [...]}`
line (a conversation ending with a user turn) is rendered by the checkpoint's chat template
(rlhf_jax/data/chat.py) and keeps its `messages` field in place of `prompt` in the output. Rows
(prompt, sample) are batched over every device of `mesh` (data parallel); row i's PRNG stream is
fold_in(fold_in(key(seed), prompt index), sample index), so outputs do not depend on the batch size
or the number of processes. Each process reads the whole prompt file and places whole batches
(sharding.put_global); results are gathered on purpose (sharding.to_host); every process writes
the same file. One
JSON line per completion:

  {"prompt", "response", "tokens": response length incl. EOS, "finished": ended with EOS,
   "sample": sample index, "logprob": summed log-probability under the sampling distribution
   (temperature-scaled, renormalised over the top-k / top-p set)}

The output is written to a temp file and renamed at the end, so a killed run leaves no partial file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import jax
import numpy as np
import tqdm

from rlhf_jax.data import chat
from rlhf_jax.infra import sharding
from rlhf_jax.sampling import load
from rlhf_jax.sampling import rollout as rollout_lib


class _Output:
    """The output file: to a temp file renamed at the end, so a killed run leaves no partial file.

    Every process writes the same records (each holds all of them), so each can read the file
    back at once, on a shared file system or on its own disk.
    """

    def __init__(self, path: str):
        self.path = path
        self.tmp = None

    def __enter__(self):
        out_dir = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(out_dir, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".jsonl")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; outputs are for reading
        self.f = os.fdopen(fd, "w", encoding="utf-8")
        return self.f

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        else:
            self.f.close()
            os.remove(self.tmp)


def write_completions(
    checkpoint: str,
    prompts: str,
    out: str,
    mesh,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    batch_size: int = 32,
    seed: int = 0,
    num_samples: int = 1,
    step: int | None = None,
    template: str | None = None,
    rules=None,
    rollout=None,
) -> dict:
    """Samples `num_samples` completions per prompt of the file `prompts` into `out`.

    Args:
      checkpoint: a stage workdir with an LM head (pretrain, SFT or PPO policy).
      prompts: JSONL of `{"prompt"}` or `{"messages"}` rows.
      out: the output JSONL file.
      mesh: the mesh to shard params and batches on.
      max_new_tokens, temperature, top_k, top_p, greedy: the sampler's settings.
      batch_size: rows (prompt x sample) per batch, rounded up to the data-parallel size.
      seed, num_samples, step, template: as the generate tool's flags.
      rules: logical sharding rules; default `sharding.DEFAULT_RULES`.
      rollout: the generator, a `config.rollout` mapping (rollout.py); None: the static sampler.

    Returns:
      Summary numbers: completions, prompts, mean_tokens, finished, tokens_per_sec, seconds.
    """
    prompts_path = prompts
    prompts, lines = load.read_prompts(prompts_path)  # bad lines fail before the model loads
    rules = rules if rules is not None else sharding.DEFAULT_RULES
    rollout_lib.resolve(rollout)  # a bad engine name fails before the model loads
    graphdef, params, cfg, tok, meta = load.load_model(checkpoint, mesh, rules, step)
    if cfg.head != "lm":
        raise ValueError(
            f"checkpoint {checkpoint} has a {cfg.head!r} head (a reward or value model); "
            "generate needs a language model (pretrain, SFT or PPO policy)"
        )

    if template is None:
        template = meta.get("config", {}).get("data", {}).get("prompt_template")
    t_new = max_new_tokens
    room = None
    if cfg.family == "gpt2":  # learned positions end at max_len; RoPE has no hard limit
        room = cfg.max_len - t_new
        if room < 1:
            raise ValueError(
                f"max_new_tokens={t_new} leaves no room in the model's max_len={cfg.max_len}"
            )
    ids = load.encode_prompts(prompts, lines, prompts_path, tok, template, room)

    # One prompt width for the whole file (rounded up to a multiple of 8): one compile.
    width = 8 * math.ceil(max(map(len, ids)) / 8)
    width = min(width, room) if room is not None else width
    rows = [(i, s) for i in range(len(ids)) for s in range(num_samples)]
    dp = sharding.data_parallel_size(mesh, rules)
    batch = dp * math.ceil(min(batch_size, len(rows)) / dp)  # rows split evenly over devices
    sample = rollout_lib.make(
        graphdef,
        rollout,
        max_new_tokens=t_new,
        eos_id=tok.eos_ids,
        pad_id=tok.pad_id,
        mesh=mesh,
        rules=rules,
    )
    knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)

    writer = _Output(out)
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

            def write(chunk, got):
                nonlocal n_tokens, n_finished
                got = sharding.to_host(got)
                for j, (i, s) in enumerate(chunk):
                    n = int(got["lengths"][j])
                    rec = {
                        **chat.prompt_record(prompts[i]),
                        "response": tok.decode(got["response"][j, :n]),
                        "tokens": n,
                        "finished": bool(got["finished"][j]),
                        "sample": s,
                        "logprob": float(got["logprobs"][j, :n].sum()),
                    }
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    n_tokens += n
                    n_finished += rec["finished"]
                bar.update(len(chunk))
                dt = max(time.time() - start, 1e-9)
                bar.set_postfix_str(
                    f"{bar.n / num_samples / dt:.1f} prompts/s, {n_tokens / dt:.0f} tok/s"
                )

            pending = None
            for lo in range(0, len(rows), batch):
                chunk = rows[lo : lo + batch]
                # Dummy rows (a lone bos) fill the last batch; their outputs are dropped.
                batch_ids = [ids[i] for i, _ in chunk] + [[tok.bos_id]] * (batch - len(chunk))
                tokens, mask = load.left_pad(batch_ids, width, tok.pad_id)
                idx = np.array([i for i, _ in chunk] + [0] * (batch - len(chunk)))
                smp = np.array([s for _, s in chunk] + [0] * (batch - len(chunk)))
                host = {"tokens": tokens, "mask": mask, "keys": load.row_keys(seed, idx, smp)}
                dev = sharding.put_global(host, mesh, rules)
                keys = dev["keys"]
                got = sample(params, dev["tokens"], dev["mask"], keys, **knobs)
                if pending is not None:  # fetch the previous batch while this one runs
                    write(*pending)
                pending = (chunk, got)
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
            f"wrote {len(rows)} completions of {len(prompts)} prompts to {out}: mean length "
            f"{summary['mean_tokens']:.1f} tokens, {summary['finished']:.0%} ended with EOS, "
            f"{summary['tokens_per_sec']:.0f} new tokens/s ({elapsed:.1f}s incl. compile)",
            flush=True,
        )
    return summary
