"""The whole InstructGPT pipeline on the bundled task world, one command, one report.

  world -> pretrain -> SFT -> collect comparisons -> RM -> PPO and PPO-ptx -> evaluate -> report

Every step writes into its own sub-directory of the run directory in the project's standard
formats (JSONL data, stage workdirs with checkpoints and metrics), so any intermediate can be
inspected or replaced, and every step is resumable: the training stages resume from their
checkpoints; collection and evaluation write their outputs atomically and are skipped when the
output exists. Start a killed pipeline again with the same command and it carries on.

Each stage runs from the full stage config in `config.stages.<name>`, so any setting of any stage
can be overridden (`--config.stages.rm.train.steps=300`).

`config.reuse=DIR` takes the pretrained model, SFT model, comparisons and RM of a finished run in
DIR (linked, not copied) and runs only what follows, which is how a sweep over PPO settings
shares one SFT model and RM (experiments/sweeps/kl_overopt.py). `config.skip="ppo_ptx"` leaves a
step out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

import jax
import numpy as np

from rlhf_jax import data, generate, preemption, sharding, world
from rlhf_jax.stages import lm, ppo, rm

MODELS = ("pretrained", "sft", "ppo", "ppo_ptx")
STEPS = ("pretrain", "sft", "collect", "rm", "ppo", "ppo_ptx", "evaluate")
# What `config.reuse` takes from a finished run: step -> the files and directories it produced.
REUSABLE = {
    "pretrain": ("pretrain",),
    "sft": ("sft",),
    "collect": ("comparisons.jsonl", "collect_samples.jsonl"),
    "rm": ("rm",),
}


def write_json(path: str, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def sample(
    workdir: str,
    prompts_path: str,
    out: str,
    *,
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    greedy: bool = False,
) -> list[dict]:
    """Samples `n` completions per prompt with `python -m rlhf_jax.generate` (skipped if `out`
    already exists) and returns its records."""
    if not os.path.exists(out):
        args = argparse.Namespace(
            checkpoint=workdir,
            prompts=prompts_path,
            out=out,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            greedy=greedy,
            batch_size=256,
            seed=seed,
            num_samples=n,
            step=None,
            template=None,
        )
        generate.run(args)
    with open(out) as f:
        return [json.loads(line) for line in f]


def collect_comparisons(config, run_dir: str, paths: dict) -> str:
    """K samples per RM prompt from the SFT policy, ranked by the simulated labeler."""
    out = os.path.join(run_dir, "comparisons.jsonl")
    if os.path.exists(out):
        return out
    c = config.collect
    recs = sample(
        os.path.join(run_dir, "sft"),
        paths["rm_prompts"],
        os.path.join(run_dir, "collect_samples.jsonl"),
        n=c.k,
        temperature=c.temperature,
        max_new_tokens=c.max_new_tokens,
        seed=config.seed,
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
    labeler = world.Labeler(noise=c.labeler_noise, seed=config.seed, ties=c.labeler_ties)
    comps = world.label_comparisons(samples, labeler)
    world.write_jsonl(out, comps)
    return out


def heldout_loss(workdir: str, text_path: str, seq_len: int, mesh, rules) -> float:
    """Mean next-token loss of a stage's model on held-out pretraining text."""
    graphdef, params, _, tok, _ = generate.load_model(workdir, mesh, rules)
    docs = data.read_documents(text_path)
    ex = data.pack_documents(
        data.tokenize_documents(docs, tok),
        seq_len,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
    )
    dp = sharding.data_parallel_size(mesh, rules)
    batches = data.eval_batches(ex, batch_size=dp * max(1, 32 // dp))
    fn = jax.jit(lambda p, b: lm.eval_step(p, b, graphdef=graphdef, mesh=mesh, rules=rules))
    sums = jax.device_get([fn(params, sharding.put_batch(b, mesh, rules)) for b in batches])
    total, count = np.sum(sums, axis=0)
    return float(total / max(count, 1.0))


def evaluate(config, run_dir: str, paths: dict, mesh, rules, timings: dict) -> str:
    """Gold score (the labeler's noiseless utility), RM score and held-out pretraining loss of
    every model on held-out prompts -> `eval.json`."""
    out = os.path.join(run_dir, "eval.json")
    if os.path.exists(out):
        return out
    c = config.evaluate
    workdirs = {"pretrained": "pretrain", "sft": "sft", "ppo": "ppo", "ppo_ptx": "ppo_ptx"}
    rm_dir = os.path.join(run_dir, "rm")
    results = {}
    for name, sub in workdirs.items():
        wd = os.path.join(run_dir, sub)
        if not os.path.isdir(os.path.join(wd, "checkpoints")):
            continue
        recs = sample(
            wd,
            paths["eval_prompts"],
            os.path.join(run_dir, f"eval_{name}.jsonl"),
            n=1,
            temperature=c.temperature,
            greedy=c.temperature == 0,
            max_new_tokens=c.max_new_tokens,
            seed=config.seed + 1,
        )
        gold = np.array([world.gold_score(r["prompt"], r["response"], r["finished"]) for r in recs])
        entry = {
            "gold_score": float(gold.mean()),
            "gold_score_std": float(gold.std()),
            "heldout_pretrain_loss": heldout_loss(wd, paths["heldout"], c.seq_len, mesh, rules),
            "response_length": float(np.mean([r["tokens"] for r in recs])),
            "finished_fraction": float(np.mean([r["finished"] for r in recs])),
            "samples": [
                {"prompt": r["prompt"], "response": r["response"], "gold": float(g)}
                for r, g in list(zip(recs, gold, strict=True))[: c.samples]
            ],
        }
        if os.path.isdir(os.path.join(rm_dir, "checkpoints")):
            entry["rm_score"] = rm_mean_score(rm_dir, recs, mesh, rules)
        results[name] = entry
    meta = {
        "seed": config.seed,
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "timings": timings,
        "elapsed_seconds": sum(timings.values()),
        "command": "python -m launch.run --config experiments/pipeline.py ...",
    }
    write_json(out, {"models": results, "meta": meta})
    return out


def rm_mean_score(rm_dir, recs, mesh, rules) -> float:
    from rlhf_jax import reward

    graphdef, params, _, tok, meta = generate.load_model(rm_dir, mesh, rules)
    cfg = meta.get("config", {})
    scores = reward.score_texts(
        graphdef,
        params,
        tok,
        [(r["prompt"], r["response"]) for r in recs],
        template=cfg["data"]["prompt_template"],
        seq_len=cfg["train"]["seq_len"],
        mesh=mesh,
        rules=rules,
        bias=float(meta.get("reward_bias", 0.0)),
    )
    return float(np.mean(scores))


def link_reused(config, workdir: str, timings: dict):
    """Links the first four steps' outputs from the finished run `config.reuse` into `workdir`."""
    base = os.path.abspath(config.reuse)
    base_timings = os.path.join(base, "timings.json")
    if not os.path.exists(base_timings):
        raise FileNotFoundError(f"config.reuse={config.reuse!r} has no timings.json: not a run")
    with open(base_timings) as f:
        done = json.load(f)
    with open(os.path.join(base, "config.json")) as f:
        base_seed = json.load(f).get("seed")
    if base_seed != config.seed:
        raise ValueError(
            f"config.reuse={config.reuse!r} ran with seed {base_seed}, this run has seed "
            f"{config.seed}; the world and its prompts would differ"
        )
    for name, outputs in REUSABLE.items():
        if name in timings:
            continue
        if name not in done:
            raise ValueError(f"config.reuse={config.reuse!r} has not finished step {name!r}")
        for out in outputs:
            dest = os.path.join(workdir, out)
            with contextlib.suppress(FileExistsError):  # every process links; first one wins
                os.symlink(os.path.join(base, out), dest)
        timings[name] = 0.0  # reused: no time spent here


def run(config, mesh, workdir: str):
    """Runs (or resumes) every step of the pipeline into `workdir`."""
    rules = sharding.normalize_rules(config.sharding.rules)
    os.makedirs(workdir, exist_ok=True)
    timings_path = os.path.join(workdir, "timings.json")
    timings = {}
    if os.path.exists(timings_path):
        with open(timings_path) as f:
            timings = json.load(f)

    skip = {x.strip() for x in config.skip.split(",") if x.strip()}
    if skip - set(STEPS):
        raise ValueError(f"config.skip: unknown steps {sorted(skip - set(STEPS))}; one of {STEPS}")
    if config.reuse:
        link_reused(config, workdir, timings)

    def step(name, fn):
        if name in skip:
            print(f"[pipeline] {name}: skipped (config.skip)", flush=True)
            return
        if name in timings:
            print(f"[pipeline] {name}: done ({timings[name]:.0f}s), skipping", flush=True)
            return
        preemption.check(f"pipeline before {name}")
        print(f"[pipeline] {name} ...", flush=True)
        t0 = time.time()
        fn()
        timings[name] = round(time.time() - t0, 1)
        if jax.process_index() == 0:
            write_json(timings_path, timings)

    w = config.world
    paths = world.write_world(
        os.path.join(workdir, "world"), dict(w.sizes), config.seed, quality=w.quality
    )
    s = config.stages

    def stage(name, cfg, module, **over):
        for key, value in over.items():
            node = cfg
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        cfg.seed = config.seed
        module.run(cfg, mesh, os.path.join(workdir, name))

    step("pretrain", lambda: stage("pretrain", s.pretrain, lm, **{"data.train": paths["pretrain"]}))
    step(
        "sft",
        lambda: stage(
            "sft",
            s.sft,
            lm,
            **{"data.train": paths["demos"], "init_from": os.path.join(workdir, "pretrain")},
        ),
    )
    step("collect", lambda: collect_comparisons(config, workdir, paths))
    step(
        "rm",
        lambda: stage(
            "rm",
            s.rm,
            rm,
            **{
                "data.train": os.path.join(workdir, "comparisons.jsonl"),
                "init_from": os.path.join(workdir, "sft"),
                "rm.norm_data": paths["demos"],
            },
        ),
    )
    for name, gamma in (("ppo", 0.0), ("ppo_ptx", config.ptx_coef)):
        step(
            name,
            lambda name=name, gamma=gamma: stage(
                name,
                s.ppo.copy_and_resolve_references(),
                ppo,
                **{
                    "data.train": paths["ppo_prompts"],
                    "data.ptx": paths["pretrain"],
                    "init_from": os.path.join(workdir, "sft"),
                    "ppo.reward_from": os.path.join(workdir, "rm"),
                    "ppo.ptx_coef": gamma,
                },
            ),
        )
    step("evaluate", lambda: evaluate(config, workdir, paths, mesh, rules, timings))
    if jax.process_index() == 0:
        from rlhf_jax import report

        path = report.build_report(workdir)
        total = sum(timings.values())
        print(f"[pipeline] done in {total / 60:.1f} min; report: {path}", flush=True)
