"""The whole pipeline through the real entry point with the smallest settings: every stage's
output exists and the report is produced; a second run resumes and skips finished steps; the same
pipeline as 2 processes x 4 devices (`launch.local`) writes what the 1-process 8-device run wrote:
every logged number and sampled text of every stage (SFT on packed rows with eval samples, the RM
with its final normalisation, PPO and PPO-ptx with samples tables and held-out eval, best-of-K
fine-tuning, DPO on packed rows with its held-out comparisons and KL eval, GRPO-ptx with its
pretraining term and held-out eval), the collected comparisons, best-of-K and the evaluation
(tests/run_compare.py has the tolerances)."""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cpu_env import cpu_env
from run_compare import assert_same_records, assert_same_run, metrics, numbers, read_jsonl

from rlhf_jax import methods
from rlhf_jax.infra import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = [
    "--config.world.sizes.pretrain=600",
    "--config.world.sizes.heldout=40",
    "--config.world.sizes.demos=200",
    "--config.world.sizes.rm_prompts=48",
    "--config.world.sizes.ppo_prompts=64",
    "--config.world.sizes.eval_prompts=16",
    "--config.stages.pretrain.train.steps=10",
    "--config.stages.pretrain.train.batch_size=8",
    "--config.stages.pretrain.train.eval_every=10",
    "--config.stages.sft.train.epochs=0.0",
    "--config.stages.sft.train.steps=6",
    "--config.stages.sft.train.batch_size=8",
    "--config.stages.sft.sft.eval_samples=2",
    # SFT and DPO on packed rows (data/packing.py), so the twin compares their packed data and
    # steps across processes too (unpacked, they run in-process and in the README commands).
    "--config.stages.sft.data.packing=True",
    "--config.stages.dpo.data.packing=True",
    "--config.stages.rm.train.steps=4",
    "--config.stages.rm.train.batch_size=8",
    "--config.stages.ppo.train.steps=2",
    "--config.stages.ppo.ppo.rollout_batch=16",
    "--config.stages.ppo.ppo.minibatch=8",
    "--config.stages.ppo.ppo.epochs=1",
    "--config.stages.ppo.train.eval_every=2",
    "--config.stages.ppo.ppo.eval_prompts=16",
    "--config.stages.ppo.ppo.ptx_batch=8",
    "--config.stages.rsft.rsft.rounds=1",
    "--config.stages.rsft.rsft.prompts_per_round=8",
    "--config.stages.rsft.train.batch_size=8",
    "--config.stages.rsft.rsft.finished_only=False",  # tiny models rarely finish
    "--config.stages.dpo.train.steps=2",
    "--config.stages.dpo.train.batch_size=8",
    "--config.stages.dpo.train.log_every=1",
    "--config.stages.dpo.train.warmup_steps=0",  # step 2 off the exact ties of the reference
    "--config.stages.dpo.train.eval_every=2",
    "--config.stages.dpo.dpo.kl_prompts=8",
    "--config.stages.dpo.dpo.kl_max_new_tokens=8",
    *(
        f"--config.stages.{m}.train.{k}"
        for m in ("simpo", "kto")
        for k in ("steps=2", "batch_size=8", "log_every=1", "warmup_steps=0", "eval_every=2")
    ),
    "--config.stages.simpo.dpo.kl_prompts=8",
    "--config.stages.simpo.dpo.kl_max_new_tokens=8",
    "--config.stages.kto.kto.kl_prompts=8",
    "--config.stages.kto.kto.kl_max_new_tokens=8",
    "--config.stages.grpo.train.steps=2",
    "--config.stages.grpo.train.log_every=1",
    "--config.stages.grpo.train.eval_every=2",
    "--config.stages.grpo.grpo.prompts=4",
    "--config.stages.grpo.grpo.group_size=4",
    "--config.stages.grpo.grpo.minibatch=8",
    "--config.stages.grpo.grpo.max_new_tokens=8",
    "--config.stages.grpo.grpo.eval_prompts=4",
    "--config.stages.grpo.grpo.ptx_batch=8",
    "--config.evaluate.best_of_k=2",
    "--config.rounds=2",
    "--config.iterate.methods=ppo_ptx,dpo",  # plain PPO's round 2 is PPO-ptx's code at gamma 0
    "--config.collect.k=3",
    "--config.collect.max_new_tokens=12",
    "--config.evaluate.max_new_tokens=12",
]


def comps_text(run):
    return (run / "comparisons.jsonl").read_text()


def command(workdir, *extra, processes=1) -> list[str]:
    """The pipeline on 8 CPU devices: one process, or `processes` through launch.local."""
    entry = ["-m", "launch.run"]
    if processes > 1:
        entry = ["-m", "launch.local", "--processes", str(processes)]
        entry += ["--devices_per_process", str(8 // processes), "--"]
    return [
        sys.executable,
        *entry,
        "--config",
        "experiments/pipeline.py:size=tiny",
        "--workdir",
        os.path.relpath(workdir, ROOT),  # relative, as users type it (resolved at the entry)
        *SMALL,
        *extra,
    ]


def launch(workdir, *extra, processes=1):
    env = cpu_env(8 // processes)
    cmd = command(workdir, *extra, processes=processes)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


# The 2-process twin: one round, plain PPO and SimPO left out (see its test).
TWIN = ("--config.rounds=1", "--config.skip=ppo,simpo")


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    """The smallest whole pipeline as 1 process x 8 devices, and its twin as 2 processes x 4,
    started together through the real entry: neither waits for the other, so the file takes
    the longer run's time instead of the sum (they share the cores with the other workers)."""
    one, two = tmp_path_factory.mktemp("pipeline"), tmp_path_factory.mktemp("pipeline2")
    procs = []
    with contextlib.ExitStack() as stack:
        for workdir, extra, n in ((one, (), 1), (two, TWIN, 2)):
            log = stack.enter_context(open(workdir.parent / f"{workdir.name}.log", "w+"))
            cmd = command(workdir, *extra, processes=n)
            env = cpu_env(8 // n)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log, text=True)
            procs.append((proc, log))
        for proc, log in procs:
            try:
                proc.wait(timeout=1500)
            finally:
                proc.kill()
            log.seek(0)
            proc.output = log.read()
    return {"one": (one, procs[0][0]), "two": (two, procs[1][0])}


@pytest.fixture(scope="module")
def pipeline_run(pipeline_runs):
    """The smallest whole pipeline, 1 process x 8 devices, through the real entry."""
    workdir, proc = pipeline_runs["one"]
    assert proc.returncode == 0, proc.output[-4000:]
    return workdir


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the fixture runs both pipelines
def test_pipeline_end_to_end(pipeline_run):
    tmp_path = pipeline_run
    subs = ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "rsft/round_1/policy", "dpo", "simpo")
    for sub in (*subs, "kto", "grpo"):
        assert os.path.isdir(tmp_path / sub / "checkpoints"), sub
        assert os.path.getsize(tmp_path / sub / "metrics.jsonl") > 0, sub
    # Round 2: a new RM, PPO-ptx continued from round 1, DPO online on its own policy's samples;
    # plain PPO, not in `iterate.methods`, stays at round 1.
    for sub in ("rm", "ppo_ptx", "dpo"):
        assert os.path.isdir(tmp_path / "round_2" / sub / "checkpoints"), sub
    assert not os.path.exists(tmp_path / "round_2" / "ppo")
    r2 = checkpoint.read_meta(str(tmp_path / "round_2" / "ppo_ptx"))["config"]
    assert r2["init_from"] == str(tmp_path / "ppo_ptx")
    assert r2["ppo"]["reference_from"] == str(tmp_path / "sft")
    assert r2["ppo"]["reward_from"] == str(tmp_path / "round_2" / "rm")
    dpo = checkpoint.read_meta(str(tmp_path / "dpo"))["config"]
    assert dpo["init_from"] == dpo["dpo"]["reference_from"] == str(tmp_path / "sft")
    assert dpo["data"]["train"] == str(tmp_path / "comparisons.jsonl")
    grpo = checkpoint.read_meta(str(tmp_path / "grpo"))
    assert grpo["config"]["init_from"] == grpo["config"]["grpo"]["reference_from"]
    assert grpo["config"]["grpo"]["reward_from"] == str(tmp_path / "rm")  # round 1's RM
    assert grpo["config"]["grpo"]["ptx_coef"] == 1.0  # PPO-ptx's gamma
    rm_bias = json.loads((tmp_path / "rm" / "reward_norm.json").read_text())["reward_bias"]
    assert grpo["reward_bias"] == pytest.approx(rm_bias) and rm_bias != 0.0
    dpo2 = checkpoint.read_meta(str(tmp_path / "round_2" / "dpo"))["config"]
    assert dpo2["init_from"] == str(tmp_path / "dpo")
    assert dpo2["dpo"]["reference_from"] == str(tmp_path / "sft")
    own = tmp_path / "round_2" / "dpo_collect" / "comparisons.jsonl"
    assert dpo2["data"]["train"] == str(own) and own.read_text() != comps_text(tmp_path)
    simpo = checkpoint.read_meta(str(tmp_path / "simpo"))["config"]
    assert simpo["dpo"]["loss"] == "simpo" and simpo["dpo"]["reference_from"] == ""
    kto = checkpoint.read_meta(str(tmp_path / "kto"))["config"]
    assert kto["stage"] == "kto" and kto["kto"]["reference_from"] == str(tmp_path / "sft")
    assert kto["data"]["train"] == str(tmp_path / "comparisons.jsonl")
    for sub in ("simpo", "kto", "grpo"):  # round 1 only
        assert not os.path.exists(tmp_path / "round_2" / sub)
    rm2 = checkpoint.read_meta(str(tmp_path / "round_2" / "rm"))["config"]
    assert rm2["init_from"] == str(tmp_path / "rm")
    assert rm2["data"]["train"].split(",") == [
        str(tmp_path / "round_2" / "comparisons.jsonl"),
        str(tmp_path / "comparisons.jsonl"),
    ]
    for name in ("pretrain", "heldout", "demos", "rm_prompts", "ppo_prompts", "eval_prompts"):
        assert os.path.exists(tmp_path / "world" / f"{name}.jsonl")
    comps = (tmp_path / "comparisons.jsonl").read_text().splitlines()
    assert comps and all({"prompt", "responses", "ranking"} <= set(json.loads(c)) for c in comps)
    assert (2, "kto/z0") in metrics(tmp_path / "kto")
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert list(ev["models"]) == [
        *("pretrained", "sft", "best_of_k", "ppo", "ppo_ptx", "rsft", "dpo", "simpo", "kto"),
        *("grpo", "ppo_ptx_r2", "dpo_r2"),
    ]
    assert (
        ev["models"]["dpo_r2"]["label"] == "DPO, round 2" and ev["models"]["dpo_r2"]["round"] == 2
    )
    assert ev["models"]["grpo"]["label"] == "GRPO-ptx" and ev["models"]["dpo"]["round"] == 1
    for m in ev["models"].values():
        assert -1.0 <= m["gold_score"] <= 1.0 and m["heldout_pretrain_loss"] > 0
    assert ev["models"]["sft"]["kl_from_sft"] == pytest.approx(0.0, abs=1e-4)
    assert [r["round"] for r in ev["meta"]["rounds"]] == [1, 2]
    report = (tmp_path / "report.md").read_text()
    assert "PPO-ptx" in report and (tmp_path / "report_ppo.png").exists()
    for label in ("DPO", "SimPO", "KTO", "GRPO-ptx"):
        assert f"| {label} |" in report, label
    tax = next(line for line in report.splitlines() if line.startswith("**Alignment tax**"))
    assert ", DPO " in tax and ", GRPO-ptx " in tax and ", SimPO " in tax and ", KTO " in tax
    again = launch(tmp_path)  # everything is done: every step is skipped
    assert again.returncode == 0, again.stderr[-4000:]
    # pretrain, sft, collect, rm, 7 methods; collect_r2, rm_r2, ppo_ptx_r2, collect_dpo_r2,
    # dpo_r2; evaluate
    assert again.stdout.count("skipping") == 4 + len(methods.POLICY_METHODS) + 5 + 1

    # A PPO-only run on top of the finished one: links its SFT model and RM, runs PPO only.
    ppo_only = tmp_path / "ppo_only"
    skip = "--config.skip=" + ",".join(k for k in methods.POLICY_METHODS if k != "ppo")
    proc = launch(
        ppo_only, f"--config.reuse={os.path.relpath(tmp_path, ROOT)}", skip, "--config.rounds=1",
        "--config.evaluate.best_of_k=0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    for sub in ("pretrain", "sft", "rm", "comparisons.jsonl"):
        assert os.path.realpath(ppo_only / sub) == os.path.realpath(tmp_path / sub), sub
    assert os.path.isdir(ppo_only / "ppo" / "checkpoints")
    assert not os.path.exists(ppo_only / "ppo_ptx")
    ev = json.loads((ppo_only / "eval.json").read_text())
    assert list(ev["models"]) == ["pretrained", "sft", "ppo"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pipeline_two_processes_match_one(pipeline_run, pipeline_runs):
    """Every stage, collection, best-of-K and evaluation of the pipeline as 2 processes x 4.

    Plain PPO is left out: it is the PPO-ptx stage with gamma = 0 (test_ppo.py checks that the
    loss is then exactly PPO's), so PPO-ptx's 2-process run covers its code; SimPO likewise is
    the DPO stage with another loss."""
    one_run = pipeline_run
    tmp_path, proc = pipeline_runs["two"]
    assert proc.returncode == 0, proc.output[-4000:]
    subs = ("pretrain", "sft", "rm", "ppo_ptx", "rsft", "rsft/round_1/policy", "dpo", "kto", "grpo")
    for sub in subs:
        assert_same_run(one_run / sub, tmp_path / sub)
    assert [v for (_, k), v in metrics(tmp_path / "sft").items() if k == "eval/samples"]
    assert (2, "ppo/samples") in metrics(tmp_path / "ppo_ptx")
    dpo, grpo = metrics(tmp_path / "dpo"), metrics(tmp_path / "grpo")
    assert {(2, "eval/kl"), (2, "eval/accuracy"), (2, "dpo/accuracy")} <= dpo.keys()
    assert {(2, "eval/score"), (2, "grpo/ptx_loss"), (2, "grpo/first_ratio_max")} <= grpo.keys()
    norm = [json.loads((d / "rm" / "reward_norm.json").read_text()) for d in (one_run, tmp_path)]
    for k in ("reward_bias", "raw_std"):
        np.testing.assert_allclose(norm[1][k], norm[0][k], rtol=2e-4, atol=1e-6, err_msg=k)
    for name in ("candidates", "selected"):
        assert_same_records(
            read_jsonl(one_run / "rsft" / "round_1" / f"{name}.jsonl"),
            read_jsonl(tmp_path / "rsft" / "round_1" / f"{name}.jsonl"),
        )
    # The sampled comparisons (texts and labels) are exactly those of the 1-process run.
    assert (tmp_path / "comparisons.jsonl").read_text() == (
        one_run / "comparisons.jsonl"
    ).read_text()
    one = json.loads((one_run / "eval.json").read_text())["models"]
    two = json.loads((tmp_path / "eval.json").read_text())["models"]
    assert list(two) == ["pretrained", "sft", "best_of_k", "ppo_ptx", "rsft", "dpo", "kto", "grpo"]
    for name in two:
        a, b = numbers(one[name]), numbers(two[name])
        assert a.keys() == b.keys(), name
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=2e-4, atol=1e-5, err_msg=f"{name}{k}")
    assert (tmp_path / "report.md").exists()


def test_reuse_refuses_a_run_of_another_seed_or_unfinished(tmp_path):
    import ml_collections as mlc

    from rlhf_jax.stages import pipeline

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"seed": 0}))
    (base / "timings.json").write_text(json.dumps({"pretrain": 1.0, "sft": 1.0}))
    config = mlc.ConfigDict({"reuse": str(base), "seed": 5})
    with pytest.raises(ValueError, match="ran with seed 0, this run has seed 5"):
        pipeline.link_reused(config, str(tmp_path), {})
    config.seed = 0
    with pytest.raises(ValueError, match="has not finished step 'collect'"):
        pipeline.link_reused(config, str(tmp_path), {})
    assert os.path.realpath(tmp_path / "sft") == os.path.realpath(base / "sft")


def test_the_pipelines_lora_section_reaches_every_stage_after_pretraining():
    from experiments import pipeline as pipeline_exp
    from rlhf_jax.stages import pipeline

    config = pipeline_exp.get_config("size=tiny")
    config.lora.update(rank=16, base_dtype="bfloat16")
    for name in ("sft", "rm", "dpo", "ppo", "grpo", "rsft"):
        cfg = pipeline.stage_config(config, config.stages[name], pretraining=False, init_from="x")
        assert (cfg.lora.rank, cfg.lora.base_dtype, cfg.init_from) == (16, "bfloat16", "x"), name
    pre = pipeline.stage_config(config, config.stages.pretrain, pretraining=True)
    assert pre.lora.rank == 0
    config.stages.dpo.lora.rank = 4  # a stage's own section wins
    assert pipeline.stage_config(config, config.stages.dpo, pretraining=False).lora.rank == 4
    config.lora.rank = 0
    assert pipeline.stage_config(config, config.stages.sft, pretraining=False).lora.rank == 0
