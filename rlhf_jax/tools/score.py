"""Score `{"prompt", "response"}` JSONL with a reward-model checkpoint, to see what it rewards.

  python -m rlhf_jax.tools.score --checkpoint runs/rm_tiny --data samples.jsonl --out scored.jsonl

Each line of the output is the input object plus `"score"`: the RM's read-out at the last token
of [bos] + template(prompt) + response + [eos] (the template stored with the RM's config), plus
the RM's normalisation bias unless `--no-bias`. A line with `"finished": false` (the output of
`python -m rlhf_jax.tools.generate` for a response cut at `--max-new-tokens`) gets no [eos]: it is
scored where it was cut, as PPO and best-of-K score their samples (sampling/reward.encode_scored);
a line without `"finished"` is a finished response. The output of generate can be scored
directly. The output file is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import tqdm

from rlhf_jax.infra import cli, distributed


def run(args) -> dict:
    import jax

    from rlhf_jax.data import lm_data, sft_data
    from rlhf_jax.infra import mesh as mesh_lib
    from rlhf_jax.infra import sharding
    from rlhf_jax.sampling import reward
    from rlhf_jax.sampling.load import load_model

    mesh = mesh_lib.build_mesh(mesh_lib.config(), jax.devices())
    rules = sharding.DEFAULT_RULES
    graphdef, params, model_cfg, tok, meta = load_model(args.checkpoint, mesh, rules)
    if model_cfg.head != "scalar":
        raise ValueError(
            f"checkpoint {args.checkpoint!r} is not a reward model (its model has "
            f"head={model_cfg.head!r})"
        )
    cfg = meta.get("config") or {}
    template = (cfg.get("data") or {}).get("prompt_template", sft_data.PROMPT_TEMPLATE)
    seq_len = args.seq_len or (cfg.get("train") or {}).get("seq_len", model_cfg.max_len)
    bias = 0.0 if args.no_bias else float(meta.get("reward_bias", 0.0))
    rows = lm_data.read_jsonl(args.data, sft_data.DEMO_FIELDS)
    for i, r in enumerate(rows):
        if not isinstance(r.get("finished", True), bool):
            raise ValueError(
                f'{args.data}: record {i + 1}: field "finished" must be true or false, '
                f"got {r['finished']!r}"
            )
    t0 = time.time()
    with tqdm.tqdm(total=len(rows), desc="score", unit="seq", disable=jax.process_index()) as bar:
        scores = reward.score_texts(
            graphdef,
            params,
            tok,
            [(r["prompt"], r["response"]) for r in rows],
            template=template,
            seq_len=seq_len,
            mesh=mesh,
            rules=rules,
            batch_size=args.batch_size,
            bias=bias,
            progress=bar.update,
            finished=[r.get("finished", True) for r in rows],
        )
    if jax.process_index() == 0:
        out_dir = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(out_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            for r, s in zip(rows, scores, strict=True):
                f.write(json.dumps({**r, "score": float(s)}) + "\n")
        os.replace(tmp, args.out)
    summary = {
        "n": len(rows),
        "mean": float(np.mean(scores)) if len(rows) else 0.0,
        "std": float(np.std(scores)) if len(rows) else 0.0,
        "bias": bias,
        "seconds": round(time.time() - t0, 2),
    }
    if jax.process_index() == 0:
        print(json.dumps(summary), flush=True)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m rlhf_jax.tools.score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="reward-model stage workdir")
    p.add_argument("--data", required=True, help='JSONL of {"prompt", "response"}')
    p.add_argument("--out", required=True, help="output JSONL (input lines plus a score)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=0, help="0: the RM's training seq_len")
    p.add_argument("--no-bias", action="store_true", help="raw scores, without normalisation")
    distributed.add_flags(p)
    return cli.run_tool(run, p.parse_args(argv))


if __name__ == "__main__":
    main()
