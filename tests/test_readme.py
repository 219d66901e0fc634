"""The README's stage commands, verbatim, from the root of a copy of the repository.

Users type relative paths (`--workdir runs/sft_tiny --config.init_from=runs/pretrain_tiny`);
orbax refuses them, and the tests of each stage use absolute temporary directories, so only this
test sees what a user sees. The commands are read from README.md itself (a README edit that breaks
a command breaks this test) and shortened only with `--config.*` / size flags appended.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from cpu_env import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Appended to a README line to keep the run short; never replaces what the line says.
SHORTEN = {
    "experiments/pretrain.py": "--config.train.steps=8 --config.train.batch_size=4 "
    "--config.train.seq_len=32 --config.train.eval_every=8 --config.train.eval_batches=1",
    "experiments/sft.py": "--config.train.epochs=0.0 --config.train.steps=4 "
    "--config.train.batch_size=4 --config.train.eval_every=4 --config.train.eval_batches=1 "
    "--config.sft.eval_samples=2 --config.sft.max_new_tokens=8",
    "experiments/rm.py": "--config.train.steps=3 --config.train.batch_size=4",
    "experiments/ppo_ptx.py": "--config.train.steps=1 --config.ppo.rollout_batch=8 "
    "--config.ppo.minibatch=8 --config.ppo.epochs=1 --config.ppo.max_new_tokens=8 "
    "--config.train.eval_every=1 --config.ppo.eval_prompts=8 --config.ppo.ptx_batch=8",
    "experiments/rsft.py": "--config.rsft.rounds=1 --config.rsft.prompts_per_round=4 "
    "--config.rsft.k=2 --config.rsft.max_new_tokens=8 --config.rsft.finished_only=False "
    "--config.train.batch_size=4",
    "experiments/dpo.py": "--config.train.steps=2 --config.train.batch_size=4 "
    "--config.train.eval_every=2 --config.dpo.kl_prompts=4 --config.dpo.kl_max_new_tokens=8",
    "experiments/simpo.py": "--config.train.steps=2 --config.train.batch_size=4 "
    "--config.train.eval_every=2 --config.dpo.kl_prompts=4 --config.dpo.kl_max_new_tokens=8",
    "experiments/kto.py": "--config.train.steps=2 --config.train.batch_size=4 "
    "--config.train.eval_every=2 --config.kto.kl_prompts=4 --config.kto.kl_max_new_tokens=8",
    "experiments/grpo.py": "--config.train.steps=1 --config.train.eval_every=1 "
    "--config.grpo.prompts=2 --config.grpo.group_size=4 --config.grpo.minibatch=8 "
    "--config.grpo.max_new_tokens=8 --config.grpo.eval_prompts=4 --config.grpo.ptx_batch=4",
    "rlhf_jax.tools.generate": "--max-new-tokens 8",
    "rlhf_jax.tools.score": "",
    "rlhf_jax.tools.best_of_k": "--max-new-tokens 8 --k 2",
}


def readme_commands() -> list[str]:
    """Every `python -m ...` line of the README's bash blocks, plus the inline best-of-K one."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        lines += [ln.split("  #")[0].strip() for ln in block.splitlines()]
    lines = [ln for ln in lines if ln.startswith("python -m")]
    inline = re.search(r"`(python -m rlhf_jax\.tools\.best_of_k [^`]*)`", text, flags=re.S)
    return lines + [" ".join(inline.group(1).split())]


def stage_lines() -> list[str]:
    """The lines this test runs, in README order: every stage, then the tools on their output."""
    keep = []
    for ln in readme_commands():
        if "launch.run" in ln and re.search(
            r"experiments/(pretrain|sft|rm|ppo_ptx|rsft|dpo|simpo|kto|grpo)\.py", ln
        ):
            if ":size=" not in ln and "tiny" in ln:  # the big presets are planned, not run
                keep.append(ln)
        elif (
            re.match(r"python -m rlhf_jax\.tools\.(generate|score|best_of_k) ", ln) and "tiny" in ln
        ):
            keep.append(ln)
    order = [
        "/pretrain.py",
        "/sft.py",
        "/rm.py",
        "/ppo_ptx.py",
        "/rsft.py",
        "/dpo.py",
        "/simpo.py",
        "/kto.py",
        "/grpo.py",
        "generate",
        "score",
        "best",
    ]
    return sorted(keep, key=lambda ln: next(i for i, k in enumerate(order) if k in ln))


def shorten(line: str) -> str:
    for key, extra in SHORTEN.items():
        if key in line:
            return f"{line} {extra}".strip()
    raise AssertionError(f"no shortening for README line {line!r}")


def test_readme_lists_every_stage_with_relative_paths():
    lines = stage_lines()
    stages = ("/pretrain.py", "/sft.py", "/rm.py", "/ppo_ptx.py --", "ptx=0", "/rsft.py", "/dpo.py")
    for what in (*stages, "/simpo.py", "/kto.py", "/grpo.py"):
        assert any(what in ln for ln in lines), what
    for tool in ("generate", "score", "best_of_k"):
        assert any(f"rlhf_jax.tools.{tool} " in ln for ln in lines), tool
    assert all(" runs/" in ln and " /" not in ln for ln in lines)  # relative, as users type


@pytest.mark.slow
def test_readme_stage_commands_run_verbatim_from_a_copy(tmp_path):
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info")
    shutil.copytree(ROOT, repo, ignore=ignore)
    # The README's `prompts.jsonl` is the user's own file; a few bundled prompts stand in.
    with open(repo / "experiments/data/tiny_prompts.jsonl", encoding="utf-8") as f:
        (repo / "prompts.jsonl").write_text("".join(f.readlines()[:3]), encoding="utf-8")
    env = cpu_env(1)  # one device, as on a laptop: the commands, not the sharding, are tested
    for line in stage_lines():
        argv = shlex.split(shorten(line))
        assert argv[:2] == ["python", "-m"]
        proc = subprocess.run(
            [sys.executable, *argv[1:]],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-3000:]}"
    runs = repo / "runs"
    done = ("pretrain_tiny", "sft_tiny", "rm_tiny", "ppo_ptx_tiny", "ppo_tiny", "rsft_tiny")
    for name in (*done, "dpo_tiny", "grpo_tiny", "sft_packed", "dpo_packed"):
        assert (runs / name / "metrics.jsonl").stat().st_size > 0, name
        assert (runs / name / "config.json").exists(), name
    for name in ("pretrain_tiny", "sft_tiny", "rm_tiny", "ppo_ptx_tiny", "ppo_tiny", "dpo_tiny"):
        assert os.listdir(runs / name / "checkpoints"), name
    assert os.listdir(runs / "grpo_tiny" / "checkpoints")
    assert (runs / "pretrain_tiny" / "tokenizer.model").exists()
    assert (runs / "rm_tiny" / "reward_norm.json").exists()
    assert (runs / "rsft_tiny" / "round_1" / "selected.jsonl").exists()
    # Paths the user typed relative are recorded resolved, so a later stage can use them anywhere.
    sft = json.loads((runs / "sft_tiny" / "config.json").read_text())
    assert sft["init_from"] == str(runs / "pretrain_tiny")

    def rows(name):
        return [json.loads(ln) for ln in (repo / name).read_text().splitlines()]

    samples, scored, best = rows("samples.jsonl"), rows("scored.jsonl"), rows("best.jsonl")
    assert len(samples) == 3 * 4  # 3 prompts x --num-samples 4
    assert len(scored) == len(samples) and all(isinstance(r["score"], float) for r in scored)
    assert len(best) == 3 and all(len(r["candidates"]) == 2 for r in best)
