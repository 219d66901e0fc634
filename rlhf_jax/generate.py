"""The generate command: sample completions of a JSONL prompt file from a stage checkpoint.

  python -m rlhf_jax.generate --checkpoint WORKDIR --prompts prompts.jsonl --out out.jsonl \
      [--max-new-tokens 128] [--temperature 1.0] [--top-k 0] [--top-p 1.0] [--greedy] \
      [--batch-size 32] [--seed 0] [--num-samples 1] [--step N] [--template STR]

Owns `load_model` (a stage workdir -> sharded params, model config, tokenizer, meta; later stages
reuse it) and the command. Each prompt line `{"prompt": "..."}` is formatted with `--template`,
else the checkpoint config's `data.prompt_template`, else used raw, and encoded as
[bos] + encode(text). Rows (prompt, sample) are batched over all local devices (data parallel);
row i's PRNG stream is fold_in(fold_in(key(seed), prompt index), sample index), so outputs do
not depend on the batch size. A `{"messages": [...]}` line (a conversation ending with a user
turn) is rendered by the checkpoint's chat template instead (rlhf_jax/chat.py) and keeps its
`messages` field in place of `prompt` in the output. One JSON line per completion:

  {"prompt", "response", "tokens": response length incl. EOS, "finished": ended with EOS,
   "sample": sample index, "logprob": summed log-probability under the sampling distribution
   (temperature-scaled, renormalised over the top-k / top-p set)}

The output is written to a temp file and renamed at the end, so a killed run leaves no partial
file. Bad input ends with one `error: ...` line on stderr and exit code 2. Single process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time

import jax
import numpy as np
import tqdm

from rlhf_jax import chat, checkpoint, cli, data_demos, sampling, sharding
from rlhf_jax import model as model_lib
from rlhf_jax import state as state_lib
from rlhf_jax import tokenizer as tok_lib


def load_model(workdir: str, mesh, rules=None, step: int | None = None):
    """Loads a stage checkpoint's params straight into their sharded layout on `mesh`.

    Args:
      workdir: a stage workdir (holding `checkpoints/`) or its checkpoints directory.
      mesh: the mesh to place params on.
      rules: logical sharding rules; default `sharding.DEFAULT_RULES`.
      step: the checkpoint step; None means the latest.

    Returns:
      (graphdef, params pure dict, ModelConfig, Tokenizer, meta dict).

    Raises:
      FileNotFoundError: no checkpoint (or tokenizer file) there.
      ValueError: the checkpoint has no model config or does not match it.
    """
    rules = rules if rules is not None else sharding.DEFAULT_RULES
    meta = checkpoint.read_meta(workdir, step)
    if not meta or "model" not in meta:
        raise ValueError(f"checkpoint in {workdir} has no model config in its meta")
    fields = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
    unknown = sorted(set(meta["model"]) - fields)
    if unknown:
        raise ValueError(f"checkpoint in {workdir} has unknown model config keys {unknown}")
    model_cfg = model_lib.ModelConfig(**meta["model"])
    template = chat.from_config(meta.get("config"))  # how this lineage renders messages rows
    tok = tok_lib.Tokenizer.load(_tokenizer_path(workdir, meta), chat_template=template)
    tok.check_model_vocab(model_cfg.vocab_size)
    graphdef, abstract, shardings = state_lib.param_shardings(model_cfg, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    params = checkpoint.restore_params(workdir, abstract, step=step)
    return graphdef, params, model_cfg, tok, meta


def _tokenizer_path(workdir: str, meta: dict) -> str:
    """The checkpoint's tokenizer: meta names it relative to the stage workdir (or absolutely)."""
    path = meta.get("tokenizer") or "tokenizer.model"
    if os.path.isabs(path):
        return path
    stage_dir = workdir
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # given `<workdir>/checkpoints`
        stage_dir = os.path.dirname(os.path.abspath(workdir))
    return os.path.join(stage_dir, path)


def read_prompts(path: str) -> tuple[list, list[int]]:
    """(prompts, their line numbers) of a JSONL file of `{"prompt"}` or `{"messages"}` rows."""
    prompts, lines = data_demos.read_prompt_lines(path)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts, lines


def encode_prompts(
    prompts: list[str], lines: list[int], path: str, tok, template: str | None, room: int | None
) -> list[list[int]]:
    """Formats and encodes prompts as [bos] + encode(template with the prompt).

    Args:
      prompts: the raw prompt texts.
      lines: their line numbers in `path`, for errors.
      path: the prompts file, for errors.
      tok: the tokenizer.
      template: a format string with `{prompt}`, or None for the raw prompt.
      room: the most prompt tokens the model can take (None: no limit).

    Returns:
      Token ids per prompt.
    """
    # The exact prefix SFT trained responses to follow (one definition: data_demos.prompt_ids).
    ids = [data_demos.prompt_ids(tok, template or "{prompt}", p) for p in prompts]
    for line, x in zip(lines, ids, strict=True):
        if room is not None and len(x) > room:
            raise ValueError(
                f"{path}:{line}: prompt is {len(x)} tokens but the model has room for {room} "
                f"(max_len minus --max-new-tokens)"
            )
    return ids


@jax.jit
def row_keys(seed, prompt_index, sample_index):
    """[N] typed PRNG keys fold_in(fold_in(key(seed), prompt_index), sample_index)."""
    root = jax.random.key(seed)
    fold = lambda i, s: jax.random.fold_in(jax.random.fold_in(root, i), s)
    return jax.vmap(fold)(prompt_index, sample_index)


def left_pad(ids: list[list[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens [N, width] int32, mask [N, width] bool), padded on the left."""
    tokens = np.full((len(ids), width), pad_id, np.int32)
    mask = np.zeros((len(ids), width), bool)
    for i, x in enumerate(ids):
        tokens[i, width - len(x) :] = x
        mask[i, width - len(x) :] = True
    return tokens, mask


def _check_args(args):
    if not os.path.isfile(args.prompts):
        raise FileNotFoundError(f"prompts file {args.prompts} does not exist")
    if not os.path.isdir(args.checkpoint):
        raise FileNotFoundError(f"checkpoint directory {args.checkpoint} does not exist")
    for name in ("max_new_tokens", "batch_size", "num_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    sampling.sampling_mode(args.temperature, args.top_k, args.top_p, args.greedy)


def run(args) -> dict:
    """Generates completions as `args` say; returns the summary numbers."""
    from experiments import common
    from launch import mesh as mesh_lib

    _check_args(args)
    prompts, lines = read_prompts(args.prompts)  # bad lines fail before the model loads
    mesh = mesh_lib.build_mesh(common.mesh_config(), jax.local_devices())
    rules = sharding.DEFAULT_RULES
    graphdef, params, cfg, tok, meta = load_model(args.checkpoint, mesh, rules, args.step)
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
    ids = encode_prompts(prompts, lines, args.prompts, tok, template, room)

    # One prompt width for the whole file (rounded up to a multiple of 8): one compile.
    width = 8 * math.ceil(max(map(len, ids)) / 8)
    width = min(width, room) if room is not None else width
    rows = [(i, s) for i in range(len(ids)) for s in range(args.num_samples)]
    dp = sharding.data_parallel_size(mesh, rules)
    batch = dp * math.ceil(min(args.batch_size, len(rows)) / dp)  # rows split evenly over devices
    sample = sampling.make_sampler(
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

    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".jsonl")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; an output is meant to be read
    n_tokens = n_finished = 0
    bar = tqdm.tqdm(total=len(rows), desc="generate", unit="row", dynamic_ncols=True)
    start = time.time()
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:

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
                tokens, mask = left_pad(batch_ids, width, tok.pad_id)
                idx = np.array([i for i, _ in chunk] + [0] * (batch - len(chunk)))
                smp = np.array([s for _, s in chunk] + [0] * (batch - len(chunk)))
                host = {"tokens": tokens, "mask": mask, "keys": row_keys(args.seed, idx, smp)}
                dev = sharding.put_global(host, mesh, rules)
                keys = dev["keys"]
                out = sample(params, dev["tokens"], dev["mask"], keys, **knobs)
                if pending is not None:  # fetch the previous batch while this one runs
                    write(*pending)
                pending = (chunk, out)
            write(*pending)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
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
    print(
        f"wrote {len(rows)} completions of {len(prompts)} prompts to {args.out}: mean length "
        f"{summary['mean_tokens']:.1f} tokens, {summary['finished']:.0%} ended with EOS, "
        f"{summary['tokens_per_sec']:.0f} new tokens/s ({elapsed:.1f}s incl. compile)",
        flush=True,
    )
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rlhf_jax.generate",
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
    return p.parse_args(argv)


def main(argv=None):
    return cli.run_or_exit(run, parse_args(argv))


if __name__ == "__main__":
    main()
