"""The whole pipeline through the real entry point with the smallest settings: every stage's
output exists and the report is produced; a second run resumes and skips finished steps. The same
pipeline as 2 processes x 4 devices is compared with this run in test_multiprocess_stages.py."""

import json
import os

import pytest
from tiny_pipeline import ROOT, launch

from rlhf_jax.infra import checkpoint

pytestmark = pytest.mark.xdist_group("pipeline")  # one worker builds the session's pipeline run


@pytest.mark.slow
def test_pipeline_end_to_end(pipeline_run):
    tmp_path = pipeline_run
    for sub in ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "rsft/round_1/policy"):
        assert os.path.isdir(tmp_path / sub / "checkpoints"), sub
        assert os.path.getsize(tmp_path / sub / "metrics.jsonl") > 0, sub
    for sub in ("rm", "ppo", "ppo_ptx"):  # round 2: a new RM, PPO continued from round 1
        assert os.path.isdir(tmp_path / "round_2" / sub / "checkpoints"), sub
    r2 = checkpoint.read_meta(str(tmp_path / "round_2" / "ppo_ptx"))["config"]
    assert r2["init_from"] == str(tmp_path / "ppo_ptx")
    assert r2["ppo"]["reference_from"] == str(tmp_path / "sft")
    assert r2["ppo"]["reward_from"] == str(tmp_path / "round_2" / "rm")
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
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert list(ev["models"]) == [
        *("pretrained", "sft", "best_of_k", "ppo", "ppo_ptx", "rsft", "ppo_r2", "ppo_ptx_r2")
    ]
    for m in ev["models"].values():
        assert -1.0 <= m["gold_score"] <= 1.0 and m["heldout_pretrain_loss"] > 0
    assert ev["models"]["sft"]["kl_from_sft"] == pytest.approx(0.0, abs=1e-4)
    assert [r["round"] for r in ev["meta"]["rounds"]] == [1, 2]
    report = (tmp_path / "report.md").read_text()
    assert "PPO-ptx" in report and (tmp_path / "report_ppo.png").exists()
    again = launch(tmp_path)  # everything is done: every step is skipped
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("skipping") == 12

    # A PPO-only run on top of the finished one: links its SFT model and RM, runs PPO only.
    ppo_only = tmp_path / "ppo_only"
    skip = "--config.skip=ppo_ptx,rsft"
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
