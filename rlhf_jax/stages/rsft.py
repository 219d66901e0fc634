"""Rejection-sampling fine-tuning ("best-of-K fine-tuning"): the simple alternative to PPO that
the InstructGPT / ChatGPT discussion proposes as a baseline.

Each round r = 1..rsft.rounds:
  1. take the next `rsft.prompts_per_round` prompts of `data.train` (a seeded permutation,
     reshuffled when it wraps around);
  2. sample K responses to each from the current policy and score them with the RM
     (best_of_k.py); per prompt keep the highest-scoring one, among those that ended with EOS
     when `rsft.finished_only` (SFT appends an EOS to every demonstration, so a response cut at
     the length limit would teach the model to stop mid-sentence), and only if its score is at
     least `rsft.threshold` when `rsft.use_threshold`;
  3. fine-tune the current policy on the kept (prompt, response) pairs with the SFT objective
     (stages/lm.py, stage "sft", params only, fresh optimizer); the result is the next policy.

Layout of the workdir:
  round_{r}/candidates.jsonl   every candidate with its score (best_of_k's output format)
  round_{r}/selected.jsonl     the kept pairs as demonstrations {"prompt", "response", "score",
                               "k", "sample"}: exactly the SFT data of the round
  round_{r}/policy/            the round's SFT workdir (checkpoints, metrics, tokenizer)
  rounds.json                  per finished round: its stats and policy (relative path)
  metrics.jsonl, tb/           rsft/* metrics, one step per round

Resuming: a round listed in rounds.json is done and skipped. Otherwise its candidates and
selection are reused when on disk (both written atomically) and the SFT stage resumes from its
own checkpoints. Several processes run it like any stage: every process holds every record (the
sampler's outputs are gathered on purpose) and writes the same files atomically.
"""

from __future__ import annotations

import json
import os

import numpy as np

from rlhf_jax.data import lm_data, sft_data
from rlhf_jax.infra import checkpoint, metrics, preemption, tracking
from rlhf_jax.sampling import best_of_k
from rlhf_jax.stages import lm

ROUNDS_FILE = "rounds.json"


def round_prompts(prompts: list[str], r: int, n: int, seed: int) -> tuple[list[str], int]:
    """The prompts of round r (1-based) and the stream position of the first.

    Round r takes positions (r-1)*n .. r*n-1 of an endless stream that walks a seeded
    permutation of `prompts` and draws a new one each time it wraps around.
    """
    start = (r - 1) * n
    out, perms = [], {}
    for q in range(start, start + n):
        epoch, i = divmod(q, len(prompts))
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(len(prompts))
        out.append(prompts[perms[epoch][i]])
    return out, start


def choose(record: dict, *, finished_only: bool, use_threshold: bool, threshold: float):
    """Index of the candidate a round trains on, or None when the prompt is dropped.

    The argmax score among the eligible candidates (all, or those that finished); ties go to the
    lowest index.
    """
    scores = [
        c["score"] if c["finished"] or not finished_only else -np.inf for c in record["candidates"]
    ]
    best = int(np.argmax(scores))
    if not np.isfinite(scores[best]):
        return None
    if use_threshold and scores[best] < threshold:
        return None
    return best


def read_json(path: str, default):
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def final_policy(workdir: str) -> str:
    """The policy workdir of the last finished round of an rsft run (what to evaluate)."""
    done = read_json(os.path.join(workdir, ROUNDS_FILE), [])
    if not done:
        raise FileNotFoundError(f"rsft workdir {workdir} has no finished round")
    return os.path.join(workdir, done[-1]["policy"])


def sft_config(config, train_path: str, init_from: str):
    """The SFT stage's config for one round: this config with the round's data and start."""
    c = config.copy_and_resolve_references()
    c.stage = "sft"
    c.data.train = train_path
    c.init_from = init_from
    # Every kept pair is training data; held-out SFT evals only come from an explicit data.eval.
    c.data.eval_fraction = 0.0
    return c


def _check(config):
    rc = config.rsft
    if not config.init_from:
        raise ValueError("rsft needs config.init_from (the policy to start from, e.g. SFT)")
    if not rc.reward_from:
        raise ValueError("rsft needs config.rsft.reward_from (a reward-model workdir)")
    for name in ("k", "rounds", "prompts_per_round", "max_new_tokens"):
        if rc[name] < 1:
            raise ValueError(f"config.rsft.{name} must be at least 1, got {rc[name]}")
    for name, path in (("init_from", config.init_from), ("rsft.reward_from", rc.reward_from)):
        if not has_checkpoint(path):
            raise FileNotFoundError(f"config.{name}={path!r} holds no checkpoint")


def has_checkpoint(workdir: str) -> bool:
    try:
        checkpoint.read_meta(workdir)
    except FileNotFoundError:
        return False
    return True


def sample_round(config, rdir: str, policy: str, prompts: list[str], r: int, mesh) -> list[dict]:
    """Best-of-K records of round r: read from `candidates.jsonl`, else sampled and written."""
    path = os.path.join(rdir, "candidates.jsonl")
    if os.path.exists(path):
        return lm_data.read_jsonl(path, {"prompt": str, "candidates": list})
    rc = config.rsft
    batch, start = round_prompts(prompts, r, rc.prompts_per_round, config.seed)
    recs = best_of_k.best_of_k(
        policy,
        rc.reward_from,
        batch,
        rc.k,
        temperature=rc.temperature,
        max_new_tokens=rc.max_new_tokens,
        seed=config.seed,
        mesh=mesh,
        rules=config.sharding.rules,
        # Sample with the template the SFT step trains the selection under.
        template=config.data.prompt_template,
        index_offset=start,  # each stream position (not each prompt text) has its own PRNG
        rollout=config.get("rollout"),
    )
    lm_data.write_jsonl(path, recs)
    return recs


def select_round(config, rdir: str, recs: list[dict]) -> list[dict]:
    """The round's demonstrations, written to `selected.jsonl`.

    Once the round's SFT stage has a checkpoint the file is its data and is read back as it is;
    before that it is chosen afresh (cheap and deterministic), so a round that stopped for
    keeping too few responses picks up a changed threshold.
    """
    path = os.path.join(rdir, "selected.jsonl")
    # The checkpoint first: it exists only after the round's (collective) SFT, so every process
    # takes the same branch, while process 0 may already have written this file.
    if has_checkpoint(os.path.join(rdir, "policy")) and os.path.exists(path):
        return lm_data.read_jsonl(path, sft_data.DEMO_FIELDS)
    rc = config.rsft
    rows = []
    for rec in recs:
        i = choose(
            rec,
            finished_only=rc.finished_only,
            use_threshold=rc.use_threshold,
            threshold=rc.threshold,
        )
        if i is not None:
            c = rec["candidates"][i]
            rows.append(
                {
                    "prompt": rec["prompt"],
                    "response": c["response"],
                    "score": c["score"],
                    "k": len(rec["candidates"]),
                    "sample": i,
                    "tokens": c["tokens"],
                }
            )
    lm_data.write_jsonl(path, rows)
    return rows


def round_stats(recs: list[dict], rows: list[dict]) -> dict:
    cands = [c for rec in recs for c in rec["candidates"]]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
    return {
        "prompts": len(recs),
        "kept": len(rows),
        "kept_fraction": len(rows) / len(recs),
        "selected_score": mean([r["score"] for r in rows]),
        "best_score": mean([rec["score"] for rec in recs]),  # argmax over all K, before filters
        "candidate_score": mean([c["score"] for c in cands]),
        "selected_tokens": mean([r["tokens"] for r in rows]),
        "candidate_tokens": mean([c["tokens"] for c in cands]),
        "candidate_finished": mean([float(c["finished"]) for c in cands]),
    }


def _last_loss(workdir: str) -> float | None:
    path = os.path.join(workdir, metrics.METRICS_FILE)
    if not os.path.exists(path):
        return None
    losses = [r["train/loss"] for r in metrics.read_metrics(path) if "train/loss" in r]
    return losses[-1] if losses else None


def run(config, mesh, workdir: str) -> str:
    """Runs (or resumes) every round into `workdir`; returns the final policy's workdir."""
    _check(config)
    rc = config.rsft
    prompts = sft_data.read_prompts(config.data.train)
    if not prompts:
        raise ValueError(f"data.train={config.data.train!r} holds no prompts")
    os.makedirs(workdir, exist_ok=True)
    rounds_path = os.path.join(workdir, ROUNDS_FILE)
    done = read_json(rounds_path, [])[: rc.rounds]
    policy = os.path.join(workdir, done[-1]["policy"]) if done else config.init_from
    writer = metrics.MetricsWriter(
        workdir, total_steps=rc.rounds, start_step=len(done), desc="rsft", progress=False,
        tracker=tracking.start(config, workdir, parent=True),  # its rounds' SFT runs nest in it
    )  # fmt: skip
    try:
        for r in range(len(done) + 1, rc.rounds + 1):
            preemption.check(f"rsft before round {r}")
            rdir = os.path.join(workdir, f"round_{r}")
            os.makedirs(rdir, exist_ok=True)
            recs = sample_round(config, rdir, policy, prompts, r, mesh)
            rows = select_round(config, rdir, recs)
            stats = round_stats(recs, rows)
            writer.log(
                f"rsft round {r}: kept {stats['kept']}/{stats['prompts']} prompts; RM score "
                f"{stats['selected_score']:.3f} selected vs {stats['candidate_score']:.3f} "
                "over all candidates"
            )
            if stats["kept"] < config.train.batch_size:
                raise ValueError(
                    f"rsft round {r} kept {stats['kept']} of {stats['prompts']} prompts, fewer "
                    f"than one batch (train.batch_size={config.train.batch_size}); raise "
                    "rsft.prompts_per_round or lower rsft.threshold"
                )
            sub = os.path.join(rdir, "policy")
            cfg = sft_config(config, os.path.join(rdir, "selected.jsonl"), policy)
            tracking.nest(cfg, config, workdir, sub)
            lm.run(cfg, mesh, sub)
            policy = sub
            stats["sft_final_loss"] = _last_loss(sub)
            done.append({"round": r, "policy": os.path.relpath(sub, workdir), **stats})
            lm_data.write_json(rounds_path, done)
            writer.write(r, {f"rsft/{k}": v for k, v in stats.items() if v is not None})
    finally:
        writer.close()
    return policy
