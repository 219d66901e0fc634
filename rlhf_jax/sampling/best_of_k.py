"""Best-of-K: sample K responses per prompt from a policy, keep the one the reward model likes best.

The usual inference-time baseline for RLHF, the sampling half of rejection-sampling fine-tuning
(stages/rsft.py) and the `best_of_k` tool (rlhf_jax/tools/best_of_k.py). Sampling is generate's:
the same prompt formatting, padding and per-row PRNG streams (rlhf_jax/sampling/load.py), so
candidate s of prompt i is exactly what `python -m rlhf_jax.tools.generate --num-samples K --seed S`
writes for that row. Scores are the RM's, with its stored normalisation bias, read at the last
token of what the policy produced, as PPO scores its rollouts: [bos] + the RM's prompt template +
response, + [eos] only when the candidate finished (a response cut at the length limit is scored
where it was cut, never given an EOS it did not emit). The chosen response is the argmax of the K
scores; a tie goes to the lowest sample index. Every process gets every record: outputs are
gathered on purpose (sharding.to_host), never fetched from a process-spanning array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rlhf_jax.infra import checkpoint, sharding
from rlhf_jax.sampling import load, reward, sampler
from rlhf_jax.sampling import rollout as rollout_lib


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
    rollout=None,
) -> list[list[dict]]:
    """K completions of every prompt, sampled as `generate` samples them.

    Args:
      policy_dir: a stage workdir with an LM head.
      prompts: raw prompt texts.
      k: completions per prompt.
      temperature, top_k, top_p: sampling knobs (see `sampler.sampling_mode`).
      max_new_tokens: T, the response length limit.
      seed: the root of the per-row PRNG streams.
      mesh, rules: where the policy is placed; rows are sharded over `act_batch`.
      template: the prompt format; None: the checkpoint config's `data.prompt_template`.
      batch_size: rows (prompt x sample) per compiled call.
      index_offset: prompt i draws from stream index_offset + i (a caller sampling a long prompt
        stream in chunks gives each chunk its own streams).
      rollout: the generator, a `config.rollout` mapping (rollout.py); None: the static sampler.

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
    rollout_lib.resolve(rollout)  # a bad engine name fails before the model loads
    knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    sampler.sampling_mode(greedy=False, **knobs)  # bad knobs fail before the model loads
    graphdef, params, cfg, tok, meta = load.load_model(policy_dir, mesh, rules)
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
    ids = load.encode_prompts(list(prompts), lines, "prompts", tok, template, room)

    # The prompt width and batch shape completions.write_completions picks, so the rows come out
    # the same.
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
        tokens, mask = load.left_pad(batch_ids, width, tok.pad_id)
        idx = np.array([index_offset + i for i, _ in chunk] + [0] * (batch - len(chunk)))
        smp = np.array([s for _, s in chunk] + [0] * (batch - len(chunk)))
        # Every process holds the whole batch: placed globally (multi-process safe).
        dev = sharding.put_global(
            {"tokens": tokens, "mask": mask, "keys": load.row_keys(seed, idx, smp)}, mesh, rules
        )
        keys = dev["keys"]
        out = rollout_lib.generate(
            graphdef,
            params,
            dev["tokens"],
            dev["mask"],
            keys,
            rollout_cfg=rollout,
            max_new_tokens=max_new_tokens,
            eos_id=tok.eos_ids,
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


def load_scorer(rm_dir: str, mesh, rules=None, batch_size: int = 32):
    """`score(pairs, finished=None) -> float64 [N]`: the RM in `rm_dir` on (prompt, response)
    pairs, plus its normalisation bias, each read as the RM was trained (its own template and
    seq_len) at the last token of the response, its EOS when `finished[i]` (None: all
    finished). It is `reward.score_texts`, the score tool's path, with the RM's own settings."""
    rules = sharding.normalize_rules(rules if rules is not None else sharding.DEFAULT_RULES)
    graphdef, params, cfg, tok, meta = load.load_model(rm_dir, mesh, rules)
    if cfg.head != "scalar":
        raise ValueError(f"reward model {rm_dir} has a {cfg.head!r} head; expected a scalar head")
    config = meta.get("config", {})
    template = config.get("data", {}).get("prompt_template") or "{prompt}"
    seq_len = config.get("train", {}).get("seq_len") or cfg.max_len
    bias = float(meta.get("reward_bias", 0.0))

    def score(pairs: Sequence[tuple[str, str]], finished: Sequence[bool] | None = None):
        pairs = list(pairs)
        finished = [True] * len(pairs) if finished is None else list(finished)
        return reward.score_texts(
            graphdef, params, tok, pairs, template=template, seq_len=seq_len, mesh=mesh,
            rules=rules, batch_size=batch_size, bias=bias, finished=finished,
        )  # fmt: skip

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
    rollout=None,
) -> list[dict]:
    """Samples K responses per prompt from `policy_dir` and keeps the one `rm_dir` scores best.

    Args:
      policy_dir: the policy's stage workdir (LM head).
      rm_dir: the reward model's stage workdir (scalar head; its stored bias is added).
      prompts, k, temperature, top_k, top_p, max_new_tokens, seed, template, batch_size,
        index_offset, rollout: as `sample_candidates`.
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
        rollout=rollout,
    )
    score = load_scorer(rm_dir, mesh, rules)
    cands = [c for g in groups for c in g]
    flat = score([(c["prompt"], c["response"]) for c in cands], [c["finished"] for c in cands])
    return select(groups, flat.reshape(len(groups), k))
