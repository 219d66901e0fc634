"""Tests for rlhf_jax.task.report (and report_plots): tables hold the eval.json numbers in its
order, plots are real PNGs, missing stages read "not run", iterated rounds, DPO and GRPO-ptx, and
old-shape eval.json all report, malformed files name file:line, aggregate statistics with the
alignment tax, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax.task import report, report_plots, report_read

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _model(gold, std, loss, rm=0.5, length=12.25, finished=0.875, **fields):
    return fields | {
        "gold_score": gold,
        "gold_score_std": std,
        "heldout_pretrain_loss": loss,
        "rm_score": rm,
        "response_length": length,
        "finished_fraction": finished,
        "samples": [
            {"prompt": f"p{i} a|b", "response": f"r{i}\nline2 <b>", "gold": gold} for i in range(5)
        ],
    }


def _write_eval(run, models, seed=0, **meta_fields):
    meta = meta_fields | {
        "seed": seed,
        "elapsed_seconds": 3723.0,
        "device": "cpu x8",
        "command": "python -m launch.pipeline --seed 0 | tee <log>",
        "timings": {"pretrain": 1800.0, "sft": 600.0},
    }
    with open(os.path.join(run, "eval.json"), "w") as f:
        json.dump({"models": models, "meta": meta}, f)


def _read_models(run):
    with open(os.path.join(run, "eval.json")) as f:
        return json.load(f)["models"]


def _new(gold, loss, kl, label, method, rnd, **fields):
    """A model entry of the iterated pipeline's eval.json: label, method, round, KL from SFT."""
    return _model(gold, 0.25, loss, kl_from_sft=kl, label=label, method=method, round=rnd, **fields)


def _new_models():
    return {
        "pretrained": _new(-0.5, 3.125, None, "Pretrained", "pretrained", 0),
        "sft": _new(0.25, 3.25, 0.0, "SFT", "sft", 0, n=64),
        "best_of_k": _new(
            0.5, 3.25, 0.7836, "Best-of-4 sampling (SFT + RM)", "best_of_k", 1, kl_is_bound=True
        ),  # fmt: skip
        "ppo": _new(0.75, 3.5, 2.125, "PPO", "ppo", 1, n=64),
        "ppo_ptx": _new(0.625, 3.3, 1.5, "PPO-ptx", "ppo_ptx", 1),
        "rsft": _new(0.375, 3.375, 0.5, "Best-of-K fine-tuning", "rsft", 1),
        "dpo": _new(0.5, 3.5, 1.0, "DPO", "dpo", 1, n=64),
        "grpo": _new(0.625, 3.125, 2.0, "GRPO-ptx", "grpo", 1),
        "ppo_r2": _new(1.0, 3.625, 3.0, "PPO, round 2", "ppo", 2),
        "ppo_ptx_r2": _new(0.875, 3.375, 2.5, "PPO-ptx, round 2", "ppo_ptx", 2),
    }


_ROUNDS = [
    {"round": 1, "rm_dir": "rm", "rm_accuracy": 0.85, "comparisons": 1095},
    {"round": 2, "rm_dir": "round_2/rm", "rm_accuracy": 0.8, "comparisons": 2100},
]


def _lm_rows(samples=False):
    rows = [{"step": 0, "time": 1.0, "eval/loss": 5.0}]
    for s in range(1, 21):
        rows.append({"step": s, "time": 1.0 + s, "train/loss": 5.0 - 0.1 * s, "train/lr": 1e-3})
    rows[7]["train/loss"] = None  # a non-finite value, written as null
    rows.append({"step": 20, "time": 30.0, "eval/loss": 3.5, "eval/perplexity": 33.1})
    if samples:
        rows.append({"step": 10, "time": 20.0, "eval/samples": "step 10\nold sample"})
        rows.append({"step": 20, "time": 31.0, "eval/samples": "step 20\nprompt: 'hi' ```x```"})
    return rows


def _ppo_rows(offset, ptx):
    rows = [{"step": 0, "time": 0.0, "eval/score": offset, "eval/kl_per_seq": 0.0}]
    for s in range(1, 31):
        m = {"ppo/score": offset + 0.05 * s, "ppo/kl_per_seq": 0.1 * s, "time/iteration": 0.5}
        if ptx:
            m["ppo/ptx_loss"] = 3.0
        rows.append({"step": s, "time": float(s), **m})
        if s % 10 == 0:
            rows.append({"step": s, "time": float(s), "eval/score": offset + 0.05 * s})
            rows.append({"step": s, "time": float(s), "ppo/samples": f"[+0.500] 'q{s}' -> 'a'"})
    return rows


def _fake_run(run, stages=report_read.STAGES[:5], models=report_read.MODELS):
    """A run of the first pipeline (no rsft, no rounds) with an old-shape eval.json."""
    os.makedirs(run, exist_ok=True)
    if "pretrain" in stages:
        _jsonl(os.path.join(run, "pretrain", "metrics.jsonl"), _lm_rows())
    if "sft" in stages:
        _jsonl(os.path.join(run, "sft", "metrics.jsonl"), _lm_rows(samples=True))
    if "rm" in stages:
        rm = [{"step": s, "time": 0.0, "rm/loss": 0.7, "rm/accuracy": 0.6} for s in (5, 10)]
        rm += [
            {"step": s, "eval/accuracy": 0.55 + s / 100, "eval/accuracy_k4": 0.6, "eval/loss": 0.6}
            for s in (0, 10)
        ]
        _jsonl(os.path.join(run, "rm", "metrics.jsonl"), rm)
    for name in ("ppo", "ppo_ptx"):
        if name in stages:
            _jsonl(os.path.join(run, name, "metrics.jsonl"), _ppo_rows(0.1, name == "ppo_ptx"))
    if "rsft" in stages:
        keys = ("rsft/selected_score", "rsft/candidate_score", "rsft/kept_fraction")
        rows = [dict(zip(keys, (0.5 + 0.25 * r, 0.25, 0.5), strict=True)) for r in (1, 2)]
        _jsonl(os.path.join(run, "rsft", "metrics.jsonl"), [{"step": r + 1, **m} for r, m in
                                                           enumerate(rows)])  # fmt: skip
    all_models = {
        "pretrained": _model(-0.5, 0.25, 3.125),
        "sft": _model(0.25, 0.125, 3.25),
        "ppo": _model(0.75, 0.2, 3.5),
        "ppo_ptx": _model(0.625, 0.15, 3.3),
    }
    _write_eval(run, {k: v for k, v in all_models.items() if k in models})
    return run


def _iterated_run(run):
    """A run with best-of-K, rsft, DPO, GRPO-ptx and a second round (round_2/{rm,ppo,ppo_ptx})."""
    _fake_run(run, stages=report_read.STAGES)
    dpo = [{"step": 0, "eval/accuracy": 0.5, "eval/kl": 0.0}]
    dpo += [{"step": 10, "dpo/loss": 0.625}, {"step": 10, "eval/accuracy": 0.75, "eval/kl": 1.5}]
    _jsonl(os.path.join(run, "dpo", "metrics.jsonl"), dpo)
    grpo = [{"step": s, "grpo/score": 0.25 * s, "grpo/kl_per_seq": s, "grpo/ptx_loss": 3.0}
            for s in (1, 2)]  # fmt: skip
    _jsonl(os.path.join(run, "grpo", "metrics.jsonl"), [*grpo, {"step": 2, "eval/score": 0.375}])
    rm = [{"step": s, "eval/accuracy": 0.5 + s / 40} for s in (0, 5)]
    _jsonl(os.path.join(run, "round_2", "rm", "metrics.jsonl"), rm)
    for name in ("ppo", "ppo_ptx"):
        rows = _ppo_rows(0.5, name == "ppo_ptx")
        _jsonl(os.path.join(run, "round_2", name, "metrics.jsonl"), rows)
    _write_eval(run, _new_models(), rounds=_ROUNDS)
    return run


def _section(md, title):
    """The text of a `## title` section up to the next `## ` heading."""
    return md.split(f"\n## {title}\n")[1].split("\n## ")[0].strip()


def _row(md, label):
    (line,) = [ln for ln in md.splitlines() if ln.startswith(f"| {label} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_full_report_tables_plots_and_samples(tmp_path):
    run = _fake_run(str(tmp_path / "run"))
    path = report.build_report(run)
    assert path == os.path.join(run, "report.md")
    md = Path(path).read_text()
    # header: seed, total time, device, command, stage timings
    assert "| 0 | 1h 02m 03s | cpu x8 | `python -m launch.pipeline --seed 0 \\| tee <log>` |" in md
    assert "| pretrain | 30m 00s | 48% |" in md and "| sft | 10m 00s | 16% |" in md
    # the pipeline's timings.json also times evaluation, which ends after eval.json is written
    with open(os.path.join(run, "timings.json"), "w") as f:
        json.dump({"pretrain": 1800.0, "sft": 600.0, "evaluate": 1500.0}, f)
    md = Path(report.build_report(run)).read_text()
    assert "| 0 | 1h 05m 00s | cpu x8 |" in md and "| evaluate | 25m 00s | 38% |" in md
    assert "LoRA" not in md  # full-parameter stages: nothing said
    lora = {"rank": 16, "alpha": 16.0, "targets": "q,k,v,o", "base_dtype": "bfloat16"}
    _write_eval(run, _read_models(run), lora=lora)
    md = Path(report.build_report(run)).read_text()
    assert (
        "Every stage after pretraining trained LoRA adapters: rank 16 on q,k,v,o, alpha 16.0, "
        "the base held in bfloat16" in md
    )
    # results (an old-shape eval.json: no label, method, round or KL): gold ± std, KL from SFT,
    # held-out loss, RM score, length, finished fraction
    assert _row(md, "Pretrained") == ["Pretrained", "-0.500 ± 0.250", "n/a", "3.125", "0.500",
                                      "12.2", "0.88"]  # fmt: skip
    assert _row(md, "PPO")[1:4] == ["0.750 ± 0.200", "n/a", "3.500"]
    assert _row(md, "PPO-ptx")[1:4] == ["0.625 ± 0.150", "n/a", "3.300"]
    assert "over SFT): PPO +0.250, PPO-ptx +0.050." in md
    # no KL, no rounds: no gold-vs-KL plot, no rounds section
    assert "### Gold score vs KL from SFT\n\nn/a: no RLHF model has a KL from SFT" in md
    assert "## Rounds" not in md and "round_2" not in md
    assert not os.path.exists(os.path.join(run, report.GOLD_KL_PLOT))
    assert not os.path.exists(os.path.join(run, report.ROUNDS_PLOT))
    # stage table: the last logged values, skipping the null
    training = md.split("## Training")[1]
    assert _row(training, "pretrain")[1:] == ["ran", "20", "train/loss 3, eval/loss 3.5"]
    assert "eval/accuracy 0.65" in _row(training, "rm")[3]
    # plots: valid PNGs, linked relatively
    for name in report.PLOTS:
        data = Path(run, name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        assert f"]({name})" in md
    assert f"moving average over {report_plots.SMOOTH_WINDOW} iterations" in md
    assert str(tmp_path) not in md
    # the LAST logged text samples; a fence the sample's backticks cannot close
    assert "SFT eval samples, step 20" in md and "old sample" not in md
    assert "````text\nstep 20\nprompt: 'hi' ```x```\n````" in md
    assert "PPO rollout samples ([score] prompt -> response), step 30" in md
    assert "'q30' -> 'a'" in md and "'q20'" not in md
    # eval.json samples: a few per model, escaped for table cells
    assert md.count("| p0 a\\|b | r0<br>line2 &lt;b&gt; |") == 4
    assert "| p3 a" not in md


def test_missing_stages_and_models_are_not_run(tmp_path):
    run = _fake_run(str(tmp_path / "run"))
    report.build_report(run)
    os.remove(os.path.join(run, "rm", "metrics.jsonl"))
    for name in ("ppo", "ppo_ptx"):
        os.remove(os.path.join(run, name, "metrics.jsonl"))
    _write_eval(run, {"sft": _model(0.25, 0.125, 3.25)})
    md = Path(report.build_report(run)).read_text()
    for stage in ("rm", "ppo", "ppo_ptx", "rsft", "dpo", "grpo"):
        assert _row(md, stage)[1] == "not run"
    assert _row(md, "PPO")[1] == "not run" and _row(md, "Pretrained")[1] == "not run"
    assert "over SFT): PPO n/a, PPO-ptx n/a." in md
    # stale plots of stages that are gone are removed, and the sections say so
    assert os.path.exists(os.path.join(run, "report_lm_loss.png"))
    assert not os.path.exists(os.path.join(run, "report_ppo.png"))
    assert "### PPO vs PPO-ptx\n\nnot run" in md
    assert "### PPO rollout samples ([score] prompt -> response)\n\nnot run" in md

    # no eval.json and a single stage: still a report
    os.remove(os.path.join(run, "eval.json"))
    md = Path(report.build_report(run)).read_text()
    assert "Evaluation not run (no eval.json)." in md
    assert "| not recorded | n/a | not recorded | not recorded |" in md


def test_malformed_files_name_file_and_line(tmp_path):
    run = _fake_run(str(tmp_path / "run"))
    path = os.path.join(run, "rm", "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"step": 11, "rm/loss": 0.5}\n{"step": 12, "rm/lo\n')
    with pytest.raises(ValueError, match=f"{path}:6: malformed metrics line"):
        report.build_report(run)
    _jsonl(path, [{"step": 1}, {"rm/loss": 1.0}])
    with pytest.raises(ValueError, match=f"{path}:2: .*integer step"):
        report.build_report(run)
    # an unterminated last line is a write in progress, not data
    _jsonl(path, [{"step": 1, "eval/accuracy": 0.5}])
    with open(path, "a") as f:
        f.write('{"step": 2, "eval/acc')
    assert [r["step"] for r in report_read.read_stage(path)] == [1]
    report.build_report(run)

    _jsonl(path, [{"step": 1}])
    eval_path = os.path.join(run, "eval.json")
    with open(eval_path, "w") as f:
        f.write('{"models": {\n  "sft": }')
    with pytest.raises(ValueError, match=f"{eval_path}:2: malformed JSON"):
        report.build_report(run)
    _write_eval(run, {"sft": {"gold_score": "good"}})
    with pytest.raises(ValueError, match="models.sft: gold_score is 'good'"):
        report.build_report(run)
    with pytest.raises(ValueError, match="not a directory"):
        report.build_report(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no stage metrics and no eval.json"):
        report.build_report(str(tmp_path))


def test_iterated_run_new_models_kl_and_rounds(tmp_path):
    run = _iterated_run(str(tmp_path / "run"))
    md = Path(report.build_report(run)).read_text()
    results = _section(md, "Results")
    # one row per model in eval.json order, labels from the file, a KL column (≤: a bound)
    table = [ln.split("|")[1].strip() for ln in results.splitlines() if ln.startswith("| ")]
    labels = [m["label"] for m in _new_models().values()]
    assert table == ["model", *labels]
    assert _row(results, "Best-of-4 sampling (SFT + RM)") == [
        "Best-of-4 sampling (SFT + RM)", "0.500 ± 0.250", "≤ 0.784", "3.250", "0.500", "12.2",
        "0.88"]  # fmt: skip
    assert _row(results, "SFT")[2] == "0.000" and _row(results, "Pretrained")[2] == "n/a"
    assert _row(results, "PPO, round 2")[1:4] == ["1.000 ± 0.250", "3.000", "3.625"]
    # the alignment tax of every RLHF model, in table order
    assert (
        "over SFT): Best-of-4 sampling (SFT + RM) +0.000, PPO +0.250, PPO-ptx +0.050, "
        "Best-of-K fine-tuning +0.125, DPO +0.250, GRPO-ptx -0.125, PPO, round 2 +0.375, "
        "PPO-ptx, round 2 +0.125."
    ) in md
    assert "![Gold score vs KL from SFT](report_gold_kl.png)" in results
    assert "log K - (K-1)/K" in results
    # DPO and GRPO-ptx are points of the gold-vs-KL plot, each in a colour of its own
    points = report_plots.gold_kl_points(report_read.read_eval(os.path.join(run, "eval.json"))[0])
    assert {p["label"]: (p["kl"], p["gold"]) for p in points}["DPO"] == (1.0, 0.5)
    assert {p["label"]: p["kl"] for p in points}["GRPO-ptx"] == 2.0
    colours = [c for c, _ in report_plots.METHOD_STYLES.values()]
    assert len(set(colours)) == len(colours)
    assert not set(colours) & {c for c, _ in report_plots._SPARE}
    # rounds: RM accuracy, comparisons and each method's gold score per round
    rounds = _section(md, "Rounds")
    assert rounds.splitlines()[0] == (
        "| round | RM held-out accuracy | comparisons | Best-of-K sampling gold | PPO gold "
        "| PPO-ptx gold | Best-of-K fine-tuning gold | DPO gold | GRPO-ptx gold |"
    )
    gold_r1 = ["0.500", "0.750", "0.625", "0.375", "0.500", "0.625"]
    assert _row(rounds, "1") == ["1", "0.850", "1095", *gold_r1]
    gold_r2 = ["not run", "1.000", "0.875", *["not run"] * 3]
    assert _row(rounds, "2") == ["2", "0.800", "2100", *gold_r2]
    for name in (report.GOLD_KL_PLOT, report.ROUNDS_PLOT, *report.PLOTS):
        data = Path(run, name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        assert f"]({name})" in md
    # training: rsft and round 2's stages, round 2's rollout samples, PPO line styles
    training = _section(md, "Training")
    rsft = "rsft/selected_score 1, rsft/candidate_score 0.25, rsft/kept_fraction 0.5"
    assert _row(training, "rsft")[1:] == ["ran", "2", rsft]
    dpo = "dpo/loss 0.625, eval/accuracy 0.75, eval/kl 1.5"
    assert _row(training, "dpo")[1:] == ["ran", "10", dpo]
    grpo = "grpo/score 0.5, eval/score 0.375, grpo/kl_per_seq 2, grpo/ptx_loss 3"
    assert _row(training, "grpo")[1:] == ["ran", "2", grpo]
    assert _row(training, "round_2/rm")[1:] == ["ran", "5", "eval/accuracy 0.625"]
    assert _row(training, "round_2/ppo_ptx")[1:3] == ["ran", "30"]
    assert "rounds 2, 3, 4: dashed" in training
    assert "### PPO-ptx, round 2 rollout samples ([score] prompt -> response), step 30" in md
    assert "### Best-of-K fine-tuning\n\n| prompt |" in md

    # one round recorded, no round_2 dir, round 1's RM accuracy from its metrics: a table, no plot
    models = _new_models()
    del models["ppo_r2"], models["ppo_ptx_r2"]
    _write_eval(run, models, rounds=[{"round": 1, "comparisons": 1095}])
    for name in ("rm", "ppo", "ppo_ptx"):
        os.remove(os.path.join(run, "round_2", name, "metrics.jsonl"))
        os.rmdir(os.path.join(run, "round_2", name))
    os.rmdir(os.path.join(run, "round_2"))
    md = Path(report.build_report(run)).read_text()
    rounds = _section(md, "Rounds")
    assert _row(rounds, "1") == ["1", "0.650", "1095", *gold_r1]
    assert "one round: no per-round plot" in rounds and "| 2 |" not in rounds
    assert not os.path.exists(os.path.join(run, report.ROUNDS_PLOT))
    assert "round_2" not in md
    # a round_2 dir alone (no meta.rounds) also makes the section; what is missing reads n/a
    _jsonl(os.path.join(run, "round_2", "rm", "metrics.jsonl"), [{"step": 0, "rm/loss": 0.6}])
    _write_eval(run, models)
    md = Path(report.build_report(run)).read_text()
    rounds = _section(md, "Rounds")
    assert _row(rounds, "2") == ["2", "n/a", "n/a", *["not run"] * 6]
    assert _row(_section(md, "Training"), "round_2/ppo")[1] == "not run"
    assert Path(run, report.ROUNDS_PLOT).read_bytes().startswith(PNG_MAGIC)


def test_new_fields_are_type_checked(tmp_path):
    run = _fake_run(str(tmp_path / "run"))
    _write_eval(run, {"sft": _model(0.25, 0.1, 3.0, round="one")})
    with pytest.raises(ValueError, match="models.sft: round is 'one'; expected int"):
        report.build_report(run)
    _write_eval(run, {"sft": _model(0.25, 0.1, 3.0, kl_from_sft="0")})
    with pytest.raises(ValueError, match="models.sft: kl_from_sft is '0'; expected a number"):
        report.build_report(run)
    _write_eval(run, {"sft": _model(0.25, 0.1, 3.0)}, rounds=[{"rm_accuracy": 0.5}])
    with pytest.raises(ValueError, match=r"meta.rounds\[0\]: round is None"):
        report.build_report(run)


def test_moving_average_matches_a_loop():
    y = np.array([1.0, 2.0, np.nan, 4.0, 8.0, np.nan, np.nan, np.nan, 3.0])
    w = 3
    want = []
    for i in range(len(y)):
        window = [v for v in y[max(0, i - w + 1) : i + 1] if np.isfinite(v)]
        want.append(np.mean(window) if window else np.nan)
    np.testing.assert_allclose(report_plots.moving_average(y, w), want)


def _seed_runs(tmp_path):
    runs = []
    for seed, (g, loss) in enumerate([(0.5, 3.0), (0.75, 3.25), (1.0, 3.75)]):
        run = str(tmp_path / f"seed{seed}")
        os.makedirs(run)
        models = {"sft": _model(0.1 * seed, 0.1, 3.0), "ppo": _model(g, 0.1, loss)}
        _write_eval(run, models, seed=seed)
        runs.append(run)
    return runs


def test_aggregate_mean_and_range(tmp_path):
    runs = _seed_runs(tmp_path)
    md = report.aggregate(runs)
    assert "mean [min, max]" in md.splitlines()[0]
    # the alignment tax: each run's PPO loss minus the same run's SFT loss
    assert _row(md, "PPO") == ["PPO", "3 of 3", "0.750 [0.500, 1.000]", "3.333 [3.000, 3.750]",
                               "+0.333 [+0.000, +0.750]", "n/a"]  # fmt: skip
    assert _row(md, "SFT") == ["SFT", "3 of 3", "0.100 [0.000, 0.200]", "3.000 [3.000, 3.000]",
                               "n/a", "n/a"]  # fmt: skip
    assert _row(md, "PPO-ptx") == ["PPO-ptx", "0 of 3", *["not run"] * 4]
    os.remove(os.path.join(runs[1], "eval.json"))
    with pytest.raises(ValueError, match="seed1.*eval.json: missing"):
        report.aggregate(runs)


def test_aggregate_new_models_and_kl(tmp_path):
    runs = []
    for seed in range(2):
        run = str(tmp_path / f"seed{seed}")
        os.makedirs(run)
        models = _new_models()
        models["ppo"]["kl_from_sft"] += seed
        if seed == 1:
            del models["ppo_ptx_r2"]
            models["ppo_r3"] = _new(1.25, 3.75, 4.0, "PPO, round 3", "ppo", 3)
        _write_eval(run, models, seed=seed, rounds=_ROUNDS)
        runs.append(run)
    md = report.aggregate(runs)
    assert "KL from SFT (nats/seq), mean [min, max]" in md.splitlines()[0]
    labels = [ln.split("|")[1].strip() for ln in md.splitlines()[2:]]
    assert labels == [m["label"] for m in _new_models().values()] + ["PPO, round 3"]
    assert _row(md, "PPO")[1:] == ["2 of 2", "0.750 [0.750, 0.750]", "3.500 [3.500, 3.500]",
                                   "+0.250 [+0.250, +0.250]", "2.625 [2.125, 3.125]"]  # fmt: skip
    assert _row(md, "GRPO-ptx")[4] == "-0.125 [-0.125, -0.125]"
    assert _row(md, "Best-of-4 sampling (SFT + RM)")[5] == "≤ 0.784 [0.784, 0.784]"
    assert _row(md, "Pretrained")[4:] == ["n/a", "n/a"]
    assert _row(md, "PPO-ptx, round 2")[1:3] == ["1 of 2", "0.875 [0.875, 0.875]"]
    assert _row(md, "PPO, round 3")[1] == "1 of 2"


def test_cli_builds_reports_prints_aggregate_and_reports_errors(tmp_path):
    runs = _seed_runs(tmp_path)

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "rlhf_jax.task.report", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )

    out = cli(*runs)
    assert out.returncode == 0, out.stderr
    assert "| PPO | 3 of 3 | 0.750 [0.500, 1.000] |" in out.stdout
    assert all(os.path.exists(os.path.join(r, "report.md")) for r in runs)
    out = cli(str(tmp_path / "missing"))
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
