"""The whole InstructGPT pipeline on the bundled task world, one command, one report.

  world -> pretrain -> SFT -> collect comparisons -> RM -> every policy method of the method
        table (rlhf_jax/methods.py: PPO, PPO-ptx, best-of-K fine-tuning, DPO, SimPO, KTO,
        GRPO-ptx)
        [-> rounds 2..N: collect from the current policy -> new RM -> continue PPO / PPO-ptx;
            online DPO on comparisons of its own round r-1 policy]
        -> evaluate (+ best-of-K sampling) -> report

Every round-1 method starts from SFT and keeps SFT as its KL reference (those that have one).
The table's `data` says how the pipeline feeds a method: "prompts" methods (PPO, PPO-ptx,
best-of-K fine-tuning, GRPO-ptx) get the PPO prompts and the round's RM (with its normalisation
bias), "comparisons" methods (DPO, SimPO, KTO) the round's labelled comparisons and no RM; a
method with a pretraining term gets the world's text and `config.ptx_coef` (PPO: 0).

Every step writes into its own sub-directory of the run directory in the project's standard
formats (JSONL data, stage workdirs with checkpoints and metrics), so any intermediate can be
inspected or replaced, and every step is resumable: the training stages resume from their
checkpoints; collection and evaluation write their outputs atomically and are skipped when the
output exists. Start a killed pipeline again with the same command and it carries on.

Each stage runs from the full stage config in `config.stages.<name>`, so any setting of any stage
can be overridden (`--config.stages.rm.train.steps=300`).

Iterated rounds (`config.rounds=N`, InstructGPT's steps 2 and 3 repeated): round r >= 2 labels
fresh samples of the current policy (`config.iterate.policy`, the previous round's PPO-ptx by
default) on the RM prompts, trains a new RM on them (plus the earlier rounds' comparisons when
`iterate.accumulate`) starting from the previous RM or from SFT (`iterate.rm_init`), and
continues every method of `config.iterate.methods` (the table's rows with `rounds`; default
PPO, PPO-ptx and DPO) from its previous-round policy, the KL still measured against SFT: an
RM-fed method on the new RM, a comparison-fed one (online DPO) on comparisons collected afresh
from its OWN previous-round policy and labelled by the same labeler
(`round_<r>/<method>_collect/`). Round r lives in `round_<r>/`. The other methods run in round 1
only.

`config.init_from=hf:DIR` starts from a Hugging Face model instead of pretraining one: the pretrain
step imports it into `pretrain/` (models/hf_import.py), so SFT, the evaluation's "pretrained" row
and the ptx reference read it like a trained one; the world's text is encoded with its tokenizer.

`config.reuse=DIR` takes the pretrained model, SFT model, comparisons and RM of a finished run in
DIR (linked, not copied) and runs only what follows, which is how a sweep over PPO settings
shares one SFT model and RM (experiments/sweeps/kl_overopt.py).
`config.skip="ppo_ptx,rsft,dpo,simpo,kto,grpo"` leaves steps out (in every round).
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax

from rlhf_jax import methods
from rlhf_jax.data import lm_data
from rlhf_jax.infra import cli, preemption, sharding, tracking
from rlhf_jax.models import hf_import, hf_init
from rlhf_jax.stages import lm, rm
from rlhf_jax.stages import pipeline_eval as ev
from rlhf_jax.task import world_data

STEPS = ("pretrain", "sft", "collect", "rm", *methods.POLICY_METHODS, "evaluate")
# What `config.reuse` takes from a finished run: step -> the files and directories it produced.
REUSABLE = {
    "pretrain": ("pretrain",),
    "sft": ("sft",),
    "collect": ("comparisons.jsonl", "collect_samples.jsonl"),
    "rm": ("rm",),
}
# Methods fed by the reward model that iterate: the ones whose samples may train a round's RM.
RM_ITERATED = tuple(m.key for m in methods.METHODS if m.rounds and m.data == "prompts")


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


def stage_config(config, cfg, *, pretraining: bool, **over):
    """A stage's config as the pipeline runs it: `cfg` (a `stages.<name>` section) with the
    pipeline's overrides `over` ("data.train", "init_from", ...), its seed and generator
    (`config.rollout`: one for the whole run) and, for every stage after pretraining, the
    pipeline's `lora` section when its rank is set (a stage whose own `lora.rank` is set keeps
    its own): `--config.lora.rank=16` trains SFT, the RM and every method with adapters."""
    cfg = cli.with_overrides(cfg, over)
    cfg.seed = config.seed
    cfg.rollout.update(config.rollout)  # one generator for the whole run (rollout.py)
    if config.lora.rank and not pretraining and not cfg.lora.rank:
        cfg.lora.update(config.lora)
    return cfg


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
    iterated = [x.strip() for x in config.iterate.methods.split(",") if x.strip()]
    can = [m.key for m in methods.METHODS if m.rounds]
    if set(iterated) - set(can):
        raise ValueError(
            f"config.iterate.methods: {sorted(set(iterated) - set(can))} cannot iterate; "
            f"the methods that can: {can}"
        )
    iterated = [k for k in iterated if k not in skip] if config.rounds > 1 else []
    policy = config.iterate.policy
    if config.rounds > 1 and (policy not in RM_ITERATED or policy not in iterated):
        raise ValueError(
            f"config.iterate.policy={policy!r} must be an iterated method that runs, one of "
            f"{[k for k in iterated if k in RM_ITERATED]}"
        )
    if config.iterate.rm_init not in ("previous", "sft"):
        raise ValueError(f"config.iterate.rm_init: {config.iterate.rm_init!r}; previous | sft")
    if config.reuse:
        link_reused(config, workdir, timings)

    def step(name, fn, kind=None):
        """Runs `fn` once; `kind` (default: name) is what config.skip names, e.g. rm for rm_r2."""
        if (kind or name) in skip:
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
            lm_data.write_json(timings_path, timings)

    w = config.world
    paths = world_data.write_world(
        os.path.join(workdir, "world"), dict(w.sizes), config.seed, quality=w.quality
    )
    s = config.stages
    at = lambda *p: os.path.join(workdir, *p)  # noqa: E731

    def stage(sub, cfg, module, **over):
        cfg = stage_config(config, cfg, pretraining=sub == "pretrain", **over)
        tracking.nest(cfg, config, workdir, at(sub))  # wandb: `<run>/<sub>`, grouped by run
        module.run(cfg, mesh, at(sub))

    if config.init_from:  # a Hugging Face model as the pretrained policy: imported, not trained
        hf_path = config.init_from
        if not hf_init.is_hf_path(hf_path):
            raise ValueError(f"config.init_from={hf_path!r}: the pipeline takes hf:DIR here")
        scan = s.pretrain.model.scan_layers
        step("pretrain", lambda: hf_import.import_to_workdir(
            hf_path, at("pretrain"), mesh, rules, scan_layers=scan))  # fmt: skip
    else:
        pretrain_over = {"data.train": paths["pretrain"]}
        step("pretrain", lambda: stage("pretrain", s.pretrain, lm, **pretrain_over))
    sft_over = {"data.train": paths["demos"], "init_from": at("pretrain")}
    step("sft", lambda: stage("sft", s.sft, lm, **sft_over))
    step(
        "collect",
        lambda: ev.collect_comparisons(
            config, at("sft"), workdir, paths["rm_prompts"], config.seed, mesh
        ),
    )
    rm_over = {"data.train": at("comparisons.jsonl"), "init_from": at("sft")}
    step("rm", lambda: stage("rm", s.rm, rm, **rm_over, **{"rm.norm_data": paths["demos"]}))

    def policy_step(m, name, sub, init_from, rm_dir, comparisons):
        """Runs method `m` (a row of rlhf_jax/methods.py) fed as its `data` says."""
        keys, cfg = m.keys, s[m.stage_config]
        over = {"init_from": init_from}
        if m.data == "prompts":
            over |= {"data.train": paths["ppo_prompts"], f"{keys}.reward_from": rm_dir}
        else:
            over["data.train"] = comparisons
        if m.reference:
            over[f"{keys}.reference_from"] = at("sft")
        if m.ptx is not None:
            gamma = config.ptx_coef if m.ptx == "pipeline" else float(m.ptx)
            over |= {"data.ptx": paths["pretrain"], f"{keys}.ptx_coef": gamma}
        module = methods.stage_module(cfg.stage)
        step(name, lambda: stage(sub, cfg, module, **over), m.key)

    def label(m):
        if m.ptx == "pipeline" and config.ptx_coef == 0:
            return m.label.removesuffix("-ptx")
        return m.label

    for key in methods.POLICY_METHODS:
        m = methods.BY_KEY[key]
        policy_step(m, key, key, at("sft"), at("rm"), at("comparisons.jsonl"))
    models = [
        dict(key="pretrained", label="Pretrained", method="pretrained", round=0, sub="pretrain"),
        dict(key="sft", label="SFT", method="sft", round=0, sub="sft"),
    ]
    for key in methods.POLICY_METHODS:
        m, sub = methods.BY_KEY[key], key
        final = getattr(methods.stage_module(s[m.stage_config].stage), "final_policy", None)
        if final is not None:  # best-of-K fine-tuning iterates inside its stage: its last policy
            sub = os.path.relpath(final(at(key)), workdir) if key in timings else ""
        models.append(dict(key=key, label=label(m), method=key, round=1, sub=sub))
    rounds = [dict(round=1, rm_dir="rm", comparisons="comparisons.jsonl")]
    current = {key: key for key in iterated}  # each method's latest policy (sub-directory)
    for r in range(2, config.rounds + 1):
        prev, rd = rounds[-1], f"round_{r}"
        src = at(current[config.iterate.policy])  # the policy whose samples train the new RM
        step(
            f"collect_r{r}",
            lambda rd=rd, src=src, r=r: ev.collect_comparisons(
                config, src, at(rd), paths["rm_prompts"], config.seed + 1000 * r, mesh
            ),
            "collect",
        )
        comps = [at(rd, "comparisons.jsonl")]
        if config.iterate.accumulate:
            comps += [at(x["comparisons"]) for x in rounds]
        rm_init = at(prev["rm_dir"]) if config.iterate.rm_init == "previous" else at("sft")
        over = {"data.train": ",".join(comps), "init_from": rm_init, "rm.norm_data": paths["demos"]}
        step(f"rm_r{r}", lambda rd=rd, over=over: stage(f"{rd}/rm", s.rm, rm, **over), "rm")
        for key in iterated:
            m, name, sub = methods.BY_KEY[key], f"{key}_r{r}", f"{rd}/{key}"
            own = ""
            if m.data == "comparisons":
                # Online: comparisons of its own previous-round policy, labelled afresh.
                out, seed = at(rd, f"{key}_collect"), config.seed + 1000 * r + 1
                step(
                    f"collect_{key}_r{r}",
                    lambda out=out, src=at(current[key]), seed=seed: ev.collect_comparisons(
                        config, src, out, paths["rm_prompts"], seed, mesh
                    ),
                    "collect",
                )
                own = os.path.join(out, "comparisons.jsonl")
            policy_step(m, name, sub, at(current[key]), at(rd, "rm"), own)
            current[key] = sub
            models.append(dict(key=name, label=f"{label(m)}, round {r}", method=key, round=r,
                               sub=sub))  # fmt: skip
        rounds.append(dict(round=r, rm_dir=f"{rd}/rm", comparisons=f"{rd}/comparisons.jsonl"))
    for m in models:
        m["workdir"] = at(m.pop("sub")) if m["sub"] else ""

    def evaluate():
        meta = {"timings": timings, "rounds": [round_meta(workdir, x) for x in rounds]}
        if config.lora.rank:  # the report says every model after pretraining is adapters
            meta["lora"] = config.lora.to_dict()
        ev.evaluate(config, workdir, paths, models, mesh, rules, meta)

    # Evaluation is done only while it covers every trained model: a rerun with more rounds
    # evaluates the new ones (and keeps the earlier entries).
    evaluated = ev.read_models(at("eval.json"))
    if any(ev.has_checkpoint(m["workdir"]) and m["key"] not in evaluated for m in models):
        timings.pop("evaluate", None)
    step("evaluate", evaluate)
    if jax.process_index() == 0:
        from rlhf_jax.task import report

        path = report.build_report(workdir)
        track_report(config, workdir)
        total = sum(timings.values())
        print(f"[pipeline] done in {total / 60:.1f} min; report: {path}", flush=True)


def track_report(config, workdir: str):
    """The report's plots (wandb.Image) and eval.json's results (a wandb.Table, and numbers in
    the run summary) in the pipeline's own wandb run, when config.log.wandb is on."""
    from rlhf_jax.task import report_plots, report_read

    tracker = tracking.start(config, workdir, parent=True)
    if tracker is None:
        return
    with tracker:
        row = {}
        for name in (*report_plots.TRAINING_PLOTS, report_plots.GOLD_KL, report_plots.ROUNDS):
            path = os.path.join(workdir, name)
            key = f"report/{name.removeprefix('report_').removesuffix('.png')}"
            if os.path.exists(path):  # the report removes the plots it has no data for
                row[key] = tracker.image(path)
        models, _ = report_read.read_eval(os.path.join(workdir, "eval.json"))
        if models:
            nums = [
                k for k in report_read.NUMBERS if any(m[k] is not None for m in models.values())
            ]
            rows = [[key, m["label"], *(m[k] for k in nums)] for key, m in models.items()]
            row["report/results"] = tracker.table(["model", "label", *nums], rows)
            summary = {f"eval/{key}/{k}": m[k] for key, m in models.items() for k in nums}
            tracker.run.summary.update({k: v for k, v in summary.items() if v is not None})
        tracker.log(None, row)


def round_meta(workdir: str, r: dict) -> dict:
    """A round's RM held-out accuracy (its last eval) and number of new comparisons."""
    from rlhf_jax.infra import metrics

    acc, n = None, None
    path = os.path.join(workdir, r["rm_dir"], "metrics.jsonl")
    if os.path.exists(path):
        rows = metrics.read_metrics(path)
        accs = [row["eval/accuracy"] for row in rows if "eval/accuracy" in row]
        acc = accs[-1] if accs else None
    comps = os.path.join(workdir, r["comparisons"])
    if os.path.exists(comps):
        with open(comps) as f:
            n = sum(1 for _ in f)
    return {"round": r["round"], "rm_dir": r["rm_dir"], "rm_accuracy": acc, "comparisons": n}
