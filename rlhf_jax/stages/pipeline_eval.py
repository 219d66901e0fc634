"""The pipeline's data collection and evaluation: sampling, labelling, gold score, KL, loss.

Split from pipeline.py (the orchestration) so that each reads on its own. Everything here works
on stage workdirs (any model a stage wrote) and writes JSONL/JSON in the project's formats.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from rlhf_jax.data import iterators, lm_data, sft_data
from rlhf_jax.infra import compiled, sharding
from rlhf_jax.sampling import completions, load
from rlhf_jax.stages import lm
from rlhf_jax.task import world, world_data


def sample(
    workdir: str,
    prompts_path: str,
    out: str,
    mesh,
    *,
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    greedy: bool = False,
    rollout=None,
) -> list[dict]:
    """Samples `n` completions per prompt as the generate tool does (skipped if `out` already
    exists) and returns its records; `rollout` is the generator (`config.rollout`)."""
    if not os.path.exists(out):
        completions.write_completions(
            workdir,
            prompts_path,
            out,
            mesh,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            greedy=greedy,
            batch_size=256,
            seed=seed,
            num_samples=n,
            rollout=rollout,
        )
    with open(out) as f:
        return [json.loads(line) for line in f]


def collect_comparisons(config, policy_dir: str, out_dir: str, prompts_path: str, seed: int, mesh):
    """K samples per RM prompt from `policy_dir`, ranked by the simulated labeler, into
    `out_dir/comparisons.jsonl` (the samples themselves in `out_dir/collect_samples.jsonl`)."""
    out = os.path.join(out_dir, "comparisons.jsonl")
    if os.path.exists(out):
        return out
    c = config.collect
    recs = sample(
        policy_dir,
        prompts_path,
        os.path.join(out_dir, "collect_samples.jsonl"),
        mesh,
        n=c.k,
        temperature=c.temperature,
        max_new_tokens=c.max_new_tokens,
        seed=seed,
        rollout=config.get("rollout"),
    )
    # generate writes the k samples of each prompt line consecutively; prompts may repeat.
    groups = [recs[i : i + c.k] for i in range(0, len(recs), c.k)]
    samples = [
        {
            "prompt": g[0]["prompt"],
            "responses": [r["response"] for r in g],
            "finished": [r["finished"] for r in g],
        }
        for g in groups
    ]
    labeler = world_data.Labeler(noise=c.labeler_noise, seed=seed, ties=c.labeler_ties)
    lm_data.write_jsonl(out, world_data.label_comparisons(samples, labeler))
    return out


def heldout_loss(workdir: str, text_path: str, seq_len: int, mesh, rules) -> float:
    """Mean next-token loss of a stage's model on held-out pretraining text."""
    graphdef, params, _, tok, _ = load.load_model(workdir, mesh, rules)
    docs = lm_data.read_documents(text_path)
    ex = lm_data.pack_documents(
        lm_data.tokenize_documents(docs, tok),
        seq_len,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )
    dp = sharding.data_parallel_size(mesh, rules)
    batches = iterators.eval_batches(ex, batch_size=dp * max(1, 32 // dp))
    # Every model of an evaluation shares the policy's graph: traced and compiled once.
    fn = compiled.jit(lm.eval_step, graphdef=graphdef, mesh=mesh, rules=rules)
    # Every process holds every batch: placed as global batches, the scalar sums read back.
    sums = sharding.to_host([fn(params, sharding.put_global(b, mesh, rules)) for b in batches])
    total, count = np.sum(sums, axis=0)
    return float(total / max(count, 1.0))


def rm_mean_score(rm_dir, recs, mesh, rules) -> float:
    """Mean RM score of sampled records, read as PPO reads it: at the EOS of a finished
    response, at the last token of an unfinished one (best_of_k.load_scorer)."""
    from rlhf_jax.sampling import best_of_k

    score = best_of_k.load_scorer(rm_dir, mesh, rules)
    pairs = [(r["prompt"], r["response"]) for r in recs]
    return float(np.mean(score(pairs, [bool(r["finished"]) for r in recs])))


def read_models(path: str) -> dict:
    """The model entries of an eval.json, {} if there is none yet."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)["models"]


def has_checkpoint(workdir: str) -> bool:
    return bool(workdir) and os.path.isdir(os.path.join(workdir, "checkpoints"))


def gold_entry(recs: list[dict], n_samples: int) -> dict:
    """Gold score statistics and a few samples of generate-style records."""
    gold = np.array([world.gold_score(r["prompt"], r["response"], r["finished"]) for r in recs])
    return {
        "gold_score": float(gold.mean()),
        "gold_score_std": float(gold.std()),
        "n": len(recs),
        "response_length": float(np.mean([r["tokens"] for r in recs])),
        "finished_fraction": float(np.mean([r["finished"] for r in recs])),
        "samples": [
            {"prompt": r["prompt"], "response": r["response"], "gold": float(g)}
            for r, g in list(zip(recs, gold, strict=True))[:n_samples]
        ],
    }


def evaluate(config, run_dir: str, paths: dict, models: list[dict], mesh, rules, extra_meta):
    """Gold score (the labeler's noiseless utility), RM score, KL from SFT and held-out
    pretraining loss of every model on held-out prompts -> `run_dir/eval.json`.

    Args:
      models: in display order, dicts {"key", "label", "method", "round", "workdir"}; a model
        whose workdir has no checkpoint is left out. The "sft" entry is the KL reference.
      extra_meta: merged into eval.json's meta (timings, rounds).
    """
    out = os.path.join(run_dir, "eval.json")
    old = read_models(out)  # models evaluated before (e.g. before more rounds ran) are kept
    has_rm = os.path.isdir(os.path.join(run_dir, "rm", "checkpoints"))
    sft_dir = next(m["workdir"] for m in models if m["key"] == "sft")
    results = {}
    # Each model is read once for its sampling, held-out loss, KL and RM score, and the SFT
    # reference and the RM once for all models (load.keep_loaded: the model, SFT and the RM).
    with load.keep_loaded(3):
        for m in models:
            if not has_checkpoint(m["workdir"]):
                continue
            results |= _evaluate_model(config, run_dir, paths, m, old, sft_dir, has_rm, mesh, rules)
    meta = {
        "seed": config.seed,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "command": "python -m launch.run --config experiments/pipeline.py ...",
        **extra_meta,
    }
    meta["elapsed_seconds"] = sum(meta.get("timings", {}).values())
    lm_data.write_json(out, {"models": results, "meta": meta})
    return out


def _evaluate_model(config, run_dir, paths, m, old, sft_dir, has_rm, mesh, rules) -> dict:
    """{key: entry} of one model (and best-of-K beside SFT); entries in `old` are kept."""
    from rlhf_jax.sampling import likelihood

    if m["key"] in old:
        kept = {m["key"]: old[m["key"]]}
        if m["key"] == "sft" and "best_of_k" in old:
            kept["best_of_k"] = old["best_of_k"]
        return kept
    c = config.evaluate
    recs = sample(
        m["workdir"],
        paths["eval_prompts"],
        os.path.join(run_dir, f"eval_{m['key']}.jsonl"),
        mesh,
        n=1,
        temperature=c.temperature,
        greedy=c.temperature == 0,
        max_new_tokens=c.max_new_tokens,
        seed=config.seed + 1,
        rollout=config.get("rollout"),
    )
    entry = {k: m[k] for k in ("label", "method", "round")} | gold_entry(recs, c.samples)
    entry["heldout_pretrain_loss"] = heldout_loss(
        m["workdir"], paths["heldout"], c.seq_len, mesh, rules
    )
    if m["method"] != "pretrained" and c.temperature > 0:
        # Both models scored at the temperature the records were sampled at: KL(pi_T ||
        # sft_T). At temperature 1 log-probs of tempered samples are no KL (can be < 0).
        kl = likelihood.kl_to_reference(
            recs, m["workdir"], sft_dir, mesh=mesh, rules=rules, temperature=c.temperature
        )
        entry["kl_from_sft"], entry["kl_sem"] = kl["kl"], kl["kl_sem"]
    elif m["method"] != "pretrained":  # greedy: a point mass, no sample estimate of a KL
        entry["kl_from_sft"], entry["kl_sem"] = None, None
    if has_rm:
        entry["rm_score"] = rm_mean_score(os.path.join(run_dir, "rm"), recs, mesh, rules)
    out = {m["key"]: entry}
    if m["key"] == "sft" and has_rm and c.best_of_k > 1:
        out["best_of_k"] = best_of_k_entry(config, run_dir, paths, entry, mesh, rules)
    return out


def best_of_k_entry(config, run_dir, paths, sft_entry, mesh, rules) -> dict:
    """The inference-time baseline: K samples from SFT per prompt, the RM picks one.

    Its KL from SFT is the analytic bound log K - (K-1)/K (Stiennon et al. 2020); its held-out
    pretraining loss is SFT's (the same weights).
    """
    from rlhf_jax.sampling import best_of_k

    c, k = config.evaluate, config.evaluate.best_of_k
    out = os.path.join(run_dir, "eval_best_of_k.jsonl")
    if not os.path.exists(out):
        recs = best_of_k.best_of_k(
            os.path.join(run_dir, "sft"),
            os.path.join(run_dir, "rm"),
            sft_data.read_prompts(paths["eval_prompts"]),
            k,
            temperature=c.temperature,
            max_new_tokens=c.max_new_tokens,
            seed=config.seed + 1,
            mesh=mesh,
            rules=rules,
            rollout=config.get("rollout"),
        )
        lm_data.write_jsonl(out, recs)
    with open(out) as f:
        recs = [json.loads(line) for line in f]
    entry = {"label": f"Best-of-{k} sampling (SFT + RM)", "method": "best_of_k", "round": 1}
    entry |= gold_entry(recs, c.samples)
    entry["heldout_pretrain_loss"] = sft_entry["heldout_pretrain_loss"]
    entry["kl_from_sft"] = math.log(k) - (k - 1) / k
    entry["kl_is_bound"] = True
    entry["rm_score"] = float(np.mean([r["score"] for r in recs]))
    return entry
