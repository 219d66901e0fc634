"""The ahead-of-time planner (launch/aot.py, rlhf_jax/infra/plan.py, rlhf_jax/stages/aot.py).

Tiny stages compiled by the real TPU compiler (libtpu) for a v5e:2x2 slice from this CPU host:
per-chip parameter and optimizer bytes against a hand count from the architecture and the mesh,
the pretrain step's FLOPs against 6 N tokens + attention (and the compiler's own count), a step
the compiler refuses for HBM reported as a result, RM and PPO byte accounting, the command line
refusing a config far too large for the slice, and the README's tiny command run verbatim.
Skipped where libtpu is missing (`pip install -e ".[tpu]"`).
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="needs libtpu (pip install -e '.[tpu]') to compile for TPU")

from experiments import ppo_ptx, pretrain, rm  # noqa: E402
from rlhf_jax.infra import mesh as mesh_lib  # noqa: E402
from rlhf_jax.infra import plan  # noqa: E402
from rlhf_jax.stages import aot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5e:2x2"
FSDP = 4  # the whole slice on the fsdp axis


def _plan(config):
    devices = plan.topology_devices(TOPOLOGY)
    mesh = mesh_lib.build_mesh(config.mesh, devices)
    chip = plan.chip_of(devices)
    rows = {}
    for fn in aot.functions(config, mesh):
        rows[fn.name] = plan.row(fn, plan.compile_stats(fn.lower()), chip, len(devices), 0.0)
    return rows


@pytest.fixture(scope="module")
def pretrain_rows():
    config = pretrain.get_config(f"fsdp={FSDP}")
    # The XLA attention path, whose matmuls the compiler's cost analysis counts (on TPU `auto`
    # runs the splash kernel, a custom call whose FLOPs it does not see).
    config.model.attention = "xla"
    return _plan(config)


def _tiny_counts():
    """Tiny GPT-2 preset (models/config.py): parameters split by fsdp (a dim named `embed`) and
    replicated (norms and biases without one), counted by hand from the architecture."""
    v, d, layers, t_max = 512, 64, 2, 256
    f = 4 * d
    split = v * d + t_max * d + layers * (4 * d * d + 2 * d * f)  # wte, wpe, qkvo, mlp
    full = layers * (2 * d + 3 * d + d + 2 * d + f + d) + 2 * d  # ln1, qkv/o/mlp biases, ln2, lnf
    return split, full, dict(v=v, d=d, layers=layers, t_max=t_max, f=f)


def test_tiny_pretrain_bytes_per_chip_match_hand_count(pretrain_rows):
    split, full, _ = _tiny_counts()
    params = 4 * (split // FSDP + full)  # float32
    r = pretrain_rows["train_step"]
    assert r["params_bytes"] == params
    # AdamW: two float32 moments sharded like the params, plus int32 step counts.
    assert 0 <= r["opt_state_bytes"] - 2 * params <= 16
    assert pretrain_rows["eval_step"]["params_bytes"] == params
    assert pretrain_rows["eval_step"]["resident_bytes"] == r["opt_state_bytes"]
    # The compiler's arguments hold at least that (TPU tiles pad small arrays), and the donated
    # state aliases its outputs.
    assert r["argument_bytes"] >= params + r["opt_state_bytes"] + r["batch_bytes"]
    assert r["alias_bytes"] > 0 and r["fits"] and r["headroom_bytes"] > 15 * plan.GiB


def test_pretrain_flops_are_6n_tokens_plus_attention(pretrain_rows):
    split, full, k = _tiny_counts()
    cfg = pretrain.get_config(f"fsdp={FSDP}")
    b, t = cfg.train.batch_size, cfg.train.seq_len
    n = split + full - k["t_max"] * k["d"]  # the position table is a lookup, not a matmul
    hand = 6 * n * b * t + 12 * k["layers"] * k["d"] * t * b * t
    r = pretrain_rows["train_step"]
    assert r["model_flops"] == pytest.approx(hand, rel=1e-9)
    # Independent of the formula: what the TPU compiler counts for the same (loop-free) step,
    # over all chips; it also counts norms, softmax and AdamW, about 6% more at this size.
    assert r["compiler_flops"] * 4 == pytest.approx(hand, rel=0.10)
    assert r["roofline_s"] > 0 and 0 < r["mfu"] <= 1
    assert r["tokens_per_s"] == pytest.approx(b * t / r["roofline_s"])


def test_over_hbm_compile_is_a_result_not_an_error():
    # 65,536 x 256 tokens: the float32 logits alone are 8 GiB per chip; the compiler refuses the
    # step and what its message says it needs becomes the row.
    config = pretrain.get_config(f"fsdp={FSDP}")
    config.train.update(batch_size=65536, seq_len=256)
    rows = _plan(config)
    r = rows["train_step"]
    assert r["compiled"] and "temp_bytes" not in r  # no memory analysis: the compile failed
    assert not r["fits"] and r["total_bytes"] > 2 * r["hbm_bytes"]
    assert plan.first_misfit(list(rows.values()))["function"] == "train_step"


@pytest.mark.slow
def test_rm_and_ppo_plans_account_every_model():
    rows = _plan(rm.get_config(f"fsdp={FSDP}"))
    r = rows["rm_train_step"]
    assert 0 <= r["opt_state_bytes"] - 2 * r["params_bytes"] <= 16 and r["fits"]

    rows = _plan(ppo_ptx.get_config(f"fsdp={FSDP}"))
    assert list(rows) == ["rollout", "score", "update"]
    roll, score, update = rows["rollout"], rows["score"], rows["update"]
    policy = roll["params_bytes"]
    # Policy, value, reference and reward are the same tiny shapes (value/reward: scalar head).
    assert score["params_bytes"] == update["params_bytes"]
    assert score["frozen_bytes"] == update["resident_bytes"]
    # While the sampler runs, the value model, both optimizer states and both frozen models stay
    # in HBM; while the update runs, the frozen models do.
    value = score["params_bytes"] - policy
    assert roll["resident_bytes"] == value + update["opt_state_bytes"] + score["frozen_bytes"]
    assert all(r["fits"] and r["roofline_s"] > 0 for r in rows.values())


def _ppo_parts(rm_size="", **ppo):
    config = ppo_ptx.get_config(f"fsdp={FSDP}")
    config.ppo.update(ppo)
    mesh = mesh_lib.build_mesh(config.mesh, plan.topology_devices(TOPOLOGY))
    fns = {fn.name: fn for fn in aot.functions(config, mesh, rm_size)}
    score = fns["score"].parts
    return {
        k: plan.chip_bytes(score[part][k])
        for part, k in [
            ("frozen", "ref"),
            ("frozen", "reward"),
            ("params", "policy"),
            ("params", "value"),
        ]
    }


def test_ppo_frozen_models_in_bf16_and_a_smaller_value_model():
    # Nothing compiled: the argument bytes per chip come from shapes and shardings alone.
    split, full, k = _tiny_counts()
    head = k["d"] // FSDP + 1  # the scalar head [D] (over fsdp) and its bias
    f32 = _ppo_parts()
    assert f32["ref"] == f32["policy"] == 4 * (split // FSDP + full)
    assert f32["reward"] == f32["value"] == f32["policy"] + 4 * head
    bf16 = _ppo_parts(frozen_dtype="bfloat16")
    assert bf16["ref"] == f32["ref"] // 2 and bf16["reward"] == f32["reward"] // 2
    assert (bf16["policy"], bf16["value"]) == (f32["policy"], f32["value"])  # still trained in f32
    # A value (and reward) model of another preset than the policy's (InstructGPT: 1.3B and
    # 175B policies, 6B RM and value); `ppo.value_init=sft` makes the value the policy's size.
    mini = _ppo_parts("mini")  # D = 128, 4 layers, vocab and context the policy's
    d, f, v, t_max, layers = 128, 512, 512, 256, 4
    mini_split = v * d + t_max * d + layers * (4 * d * d + 2 * d * f)
    mini_full = layers * (9 * d + f) + 2 * d + 1  # as _tiny_counts' `full`, and the bias
    assert mini["value"] == mini["reward"] == 4 * ((mini_split + d) // FSDP + mini_full)
    assert _ppo_parts("mini", value_init="sft")["value"] == f32["value"]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "launch.aot", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_refuses_a_config_far_too_large():
    # GPT-3 6.7B: params and AdamW moments alone are ~18 GiB per chip over 4 chips.
    proc = _cli(
        "--config", "experiments/pretrain.py:size=6b,fsdp=4", "--topology", TOPOLOGY
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    m = re.fullmatch(
        r"error: train_step needs (at least )?([\d.]+) GiB per chip, v5e:2x2 chips have "
        r"15\.75 GiB",
        last,
    )
    assert m and float(m.group(2)) > 17, last
    assert "NO" in proc.stdout  # the table came first

    proc = _cli(
        "--config", "experiments/pretrain.py", "--topology", "v9:2x2"
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --topology 'v9:2x2'")


def readme_plan_lines() -> list[str]:
    """The `python -m launch.aot` lines of the README's bash blocks."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), flags=re.S)
    lines = [ln.split("  #")[0].strip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if ln.startswith("python -m launch.aot")]


@pytest.mark.slow
def test_readme_tiny_plan_runs_verbatim_and_writes_json(tmp_path):
    # As a user types it, from a directory holding experiments/ (relative --config and --out).
    lines = [ln for ln in readme_plan_lines() if "size=" not in ln]
    assert lines, "the README shows no tiny launch.aot command"
    os.symlink(os.path.join(ROOT, "experiments"), tmp_path / "experiments")
    for line in lines:
        argv = shlex.split(line)
        proc = subprocess.run(
            [sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
    report = json.loads((tmp_path / "plan.json").read_text())
    assert report["chips"] == 4 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert report["versions"]["libtpu"]
    train = report["functions"][0]
    assert train["function"] == "train_step" and train["fits"] and train["roofline_s"] > 0
    assert "train_step" in proc.stdout and "roofline" in proc.stdout
