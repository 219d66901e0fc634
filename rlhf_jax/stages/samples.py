"""Sampled completions for a fixed set of held-out prompts, logged at every eval.

Researchers judge a fine-tune by reading it; the loss alone hides degenerate outputs. The prompts
are tokenized once, left-padded to one shape (so the sampler compiles once), and sampled with
per-prompt PRNG streams fixed across evals, so successive tables differ only by the model.
"""

from __future__ import annotations

import jax

from rlhf_jax.data import sft_data
from rlhf_jax.infra import sharding
from rlhf_jax.sampling import load, rollout


class EvalSampler:
    """`sampler(params, step) -> str`, a plain-text table of prompt / sample / reference."""

    def __init__(self, graphdef, model_cfg, tok, config, mesh, demos: list[dict]):
        self.tok, self.demos, self.mesh = tok, demos, mesh
        self.rules = sharding.normalize_rules(config.sharding.rules)
        sc = config.sft
        self.knobs = dict(temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p)
        template = config.data.prompt_template
        ids = [sft_data.prompt_ids(tok, template, d["prompt"]) for d in demos]
        dp = sharding.data_parallel_size(mesh, self.rules)
        # Rows rounded up to the data-parallel size with copies whose outputs are never read.
        ids = ids + [ids[-1]] * (-len(ids) % dp)
        self.tokens, self.mask = load.left_pad(ids, max(map(len, ids)), tok.pad_id)
        room = model_cfg.max_len - self.tokens.shape[1] if model_cfg.family == "gpt2" else None
        new = sc.max_new_tokens if room is None else max(1, min(sc.max_new_tokens, room))
        self.sample = rollout.make(
            graphdef,
            config.get("rollout"),
            max_new_tokens=new,
            eos_id=tok.eos_ids,
            pad_id=tok.pad_id,
            mesh=mesh,
            rules=self.rules,
        )
        root = jax.random.key(config.seed)
        self.keys = jax.random.split(root, self.tokens.shape[0])

    def __call__(self, params, step: int) -> str:
        # Every process holds all sample prompts: placed as one global batch, gathered back.
        batch = sharding.put_global(
            {"t": self.tokens, "m": self.mask, "k": self.keys}, self.mesh, self.rules
        )
        out = sharding.to_host(
            self.sample(params, batch["t"], batch["m"], batch["k"], **self.knobs)
        )
        rows = range(len(self.demos))  # not the padding rows
        texts = [
            self.tok.decode([int(x) for x in out["response"][i][: int(out["lengths"][i])]])
            for i in rows
        ]
        return format_samples(step, self.demos, texts, [bool(out["finished"][i]) for i in rows])


def format_samples(step: int, demos: list[dict], texts: list[str], finished: list[bool]) -> str:
    """The samples text: a `step N` line, then prompt / sample / reference lines per demo
    (infra/tracking.py reads this layout back into a wandb.Table's columns)."""
    lines = [f"step {step}"]
    for d, text, done in zip(demos, texts, finished, strict=True):
        end = "" if done else " [no EOS]"
        lines.append(
            f"prompt: {d['prompt']!r}\n  sample: {text!r}{end}\n  reference: {d['response']!r}"
        )
    return "\n".join(lines)
