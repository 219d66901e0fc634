"""The rollout switch: which generator a stage, the pipeline or a tool samples with.

This module owns the one place `config.rollout` is read (experiments/common.py documents its
keys): `make` returns the static sampler's function (`sampler.make_sampler`, the reference) or
the rollout engine's (`engine.make_engine`: continuous batching over a paged KV cache); both take
`sample(params, prompts, prompt_mask, row_keys, *, temperature, top_k, top_p, greedy)` and return
the same keys and tokens (the engine adds `generated` and its statistics). `generate` is the
memoised counterpart of `sampler.generate` / `engine.generate`.

A rollout config is a mapping with the keys of `config.rollout` (engine, slots, page_size,
pages); None, or a mapping without a key, means that key's default (the static sampler).
"""

from __future__ import annotations

from rlhf_jax.sampling import engine, sampler

ENGINES = ("static", "paged")
DEFAULTS = dict(engine="static", slots=0, page_size=16, pages=0)


def resolve(rollout_cfg) -> dict:
    """The rollout config as a plain dict with every key (None -> the defaults)."""
    out = dict(DEFAULTS)
    if rollout_cfg is not None:
        out.update({k: rollout_cfg[k] for k in DEFAULTS if k in rollout_cfg})
    if out["engine"] not in ENGINES:
        raise ValueError(
            f"unknown config.rollout.engine: {out['engine']!r}; expected one of {ENGINES}"
        )
    return out


def engine_options(rollout_cfg) -> dict:
    """`engine.make_engine`'s options from a rollout config (0 -> the engine's default)."""
    r = resolve(rollout_cfg)
    return dict(
        num_slots=r["slots"] or None, page_size=r["page_size"], num_pages=r["pages"] or None
    )


def make(graphdef, rollout_cfg, *, max_new_tokens, eos_id, pad_id, mesh=None, rules=None):
    """Builds the generation function `config.rollout` names.

    Args:
      graphdef, max_new_tokens, eos_id, pad_id, mesh, rules: as `sampler.make_sampler`.
      rollout_cfg: `config.rollout` (a mapping; None: the static sampler).

    Returns:
      `sample(params, prompts, prompt_mask, row_keys, *, temperature=1.0, top_k=0, top_p=1.0,
      greedy=False) -> dict`, `sampler.make_sampler`'s result (tokens [B, P + T], response,
      response_mask, logprobs [B, T], lengths, finished [B], steps).
    """
    kw = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, mesh=mesh, rules=rules)
    name = resolve(rollout_cfg)["engine"]
    if name == "static":
        return sampler.make_sampler(graphdef, **kw)
    elif name == "paged":
        return engine.make_engine(graphdef, **kw, **engine_options(rollout_cfg))
    raise AssertionError(name)  # resolve() refused it


def generate(graphdef, params, prompts, prompt_mask, row_keys, *, rollout_cfg=None, **kw) -> dict:
    """`sampler.generate` (static) or `engine.generate` (paged), as `rollout_cfg` names; `kw` are
    their shared arguments (max_new_tokens, eos_id, pad_id, temperature, top_k, top_p, greedy,
    mesh, rules)."""
    name = resolve(rollout_cfg)["engine"]
    if name == "static":
        return sampler.generate(graphdef, params, prompts, prompt_mask, row_keys, **kw)
    elif name == "paged":
        opts = engine_options(rollout_cfg)
        return engine.generate(graphdef, params, prompts, prompt_mask, row_keys, **kw, **opts)
    raise AssertionError(name)
