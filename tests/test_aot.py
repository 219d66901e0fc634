"""The ahead-of-time planner (launch/aot.py, rlhf_jax/infra/plan.py, rlhf_jax/stages/aot.py).

Tiny stages compiled by the real TPU compiler (libtpu) for a v5e:2x2 slice from this CPU host:
per-chip parameter and optimizer bytes against a hand count from the architecture and the mesh,
the pretrain step's FLOPs against 6 N tokens + attention (and the compiler's own count), a step
the compiler refuses for HBM reported as a result, RM and PPO byte accounting, the paged rollout
engine's page pool against a hand count and below the static sampler's cache, the command line
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

from experiments import dpo, grpo, kto, ppo_ptx, pretrain, rm, rsft  # noqa: E402
from rlhf_jax import methods  # noqa: E402
from rlhf_jax.infra import mesh as mesh_lib  # noqa: E402
from rlhf_jax.infra import plan  # noqa: E402
from rlhf_jax.rl import dpo as dpo_math  # noqa: E402
from rlhf_jax.stages import aot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5e:2x2"
FSDP = 4  # the whole slice on the fsdp axis


def _plan(config, compile_only=None):
    """Report rows of the stage's functions, compiled (all, or those named in `compile_only`;
    the others' rows hold only the argument bytes)."""
    devices = plan.topology_devices(TOPOLOGY)
    mesh = mesh_lib.build_mesh(config.mesh, devices)
    chip = plan.chip_of(devices)
    rows = {}
    for fn in aot.functions(config, mesh):
        stats = None
        if compile_only is None or fn.name in compile_only:
            stats = plan.compile_stats(fn.lower())
        rows[fn.name] = plan.row(fn, stats, chip, len(devices), 0.0)
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
    # The iteration's bound: its three functions one after another (an rsft round counts each
    # function's calls the same way).
    it = plan.iteration(list(rows.values()), plan.chip_of(plan.topology_devices(TOPOLOGY)), 4)
    assert it["functions"] == {"rollout": 1, "score": 1, "update": 1}
    bound = sum(r["roofline_s"] for r in rows.values())
    assert it["roofline_s"] == pytest.approx(bound)
    assert it["samples_per_s"] == pytest.approx(roll["samples"] / bound)


@pytest.mark.slow
def test_paged_rollout_row_holds_its_page_pool_and_less_than_the_static_cache():
    # 2,048 rows of 32 + 224 tokens (the tiny model's whole context): the static sampler holds
    # every row's KV cache at full length; the engine runs 16 slots over a pool of 64 pages of
    # 16 tokens, 1/4 of what its slots would need at full length (R = 16 pages per row). (Its
    # compile grows with the slots: a branch per bucket of live rows; 16 keeps the test short.)
    config = ppo_ptx.get_config(f"fsdp={FSDP}")
    config.ppo.update(rollout_batch=2048, prompt_len=32, max_new_tokens=224)
    static = _plan(config, compile_only={"rollout"})["rollout"]
    slots, pages, page_size = 16, 64, 16
    config.rollout.update(engine="paged", slots=slots, pages=pages, page_size=page_size)
    paged = _plan(config, compile_only={"rollout"})["rollout"]
    assert "engine" not in static  # the static row is the one it always was
    assert (paged["engine"], paged["slots"], paged["pages"]) == ("paged", slots, pages)
    _, _, k = _tiny_counts()
    heads, head_dim = 4, k["d"] // 4  # tiny: no GQA
    # Keys and values of every page in every layer, float32, pages split over the 4 fsdp shards.
    hand = pages * page_size * k["layers"] * 2 * heads * head_dim * 4 // FSDP
    assert paged["page_pool_bytes"] == hand
    assert paged["temp_bytes"] >= hand  # the pool is one of the engine's temporaries
    assert slots * (32 + 224) > pages * page_size
    for r in (static, paged):
        assert _fits_with_a_bound(r) and r["samples"] == 2048
    assert paged["total_bytes"] < static["total_bytes"]
    # The same model FLOPs; with one row per shard at full length the engine takes 512 waves of
    # 223 decode steps, each reading the weights: a slower bound than one batch of 223 steps.
    assert paged["model_flops"] == pytest.approx(static["model_flops"])
    assert (paged["live_rows"], paged["decode_steps"]) == (4, 512 * 223)
    assert paged["roofline_s"] > static["roofline_s"]


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


def _fits_with_a_bound(r):
    """A compiled row that fits, with memory per chip and a roofline time."""
    return r["compiled"] and r["fits"] and r["total_bytes"] > 0 and r["roofline_s"] > 0


def test_every_method_has_a_planner_and_an_unknown_stage_is_one_error():
    # The method table's stages (SimPO is the DPO stage) are the planner's, and only those.
    assert {m.stage for m in methods.METHODS} == set(aot.PLANNERS) <= set(methods.STAGES)
    config = pretrain.get_config(f"fsdp={FSDP}")
    config.stage = "nope"
    with pytest.raises(ValueError, match="does not plan config.stage='nope'; expected one of"):
        aot.functions(config, mesh_lib.build_mesh(config.mesh, plan.topology_devices(TOPOLOGY)))


@pytest.mark.slow
def test_dpo_plans_its_train_step_with_the_frozen_reference_for_every_loss():
    config = dpo.get_config(f"fsdp={FSDP}")
    rows = _plan(config, compile_only={"dpo_train_step"})
    r = rows["dpo_train_step"]
    assert _fits_with_a_bound(r)
    # The reference is an argument of the policy's shapes, not in the optimizer; the eval
    # step holds the optimizer state resident.
    assert r["frozen_bytes"] == r["params_bytes"] > 0
    assert 0 <= r["opt_state_bytes"] - 2 * r["params_bytes"] <= 16
    assert rows["dpo_eval_step"]["resident_bytes"] == r["opt_state_bytes"]
    # Policy forward + backward + reference forward: 4 forwards of B x K x L tokens.
    assert r["model_flops"] == pytest.approx(2 * rows["dpo_eval_step"]["model_flops"])
    assert r["tokens"] == config.train.batch_size * config.dpo.k_max * config.train.seq_len
    # Every loss the stage takes traces through the stage's own train step (a new variant in
    # rl/dpo.py's LOSSES is planned without a planner change); tracing only, no compile.
    # A reference-free loss (SimPO) holds no reference and runs no reference forward.
    mesh = mesh_lib.build_mesh(config.mesh, plan.topology_devices(TOPOLOGY))
    for loss in dpo_math.LOSSES:
        config.dpo.update(loss=loss, label_smoothing=0.0)
        train = aot.functions(config, mesh)[0]
        assert train.name == "dpo_train_step" and f"loss={loss}" in train.note
        assert train.lower().as_text()
        free = loss in dpo_math.REFERENCE_FREE
        assert plan.chip_bytes(train.parts["frozen"]) == (0 if free else r["frozen_bytes"])
        assert train.flops == pytest.approx(r["model_flops"] * (3 / 4 if free else 1))


def test_kto_plans_its_train_step_with_the_reference_and_mismatched_rows():
    # Lowered, not compiled (DPO's test compiles the same kind of step): arguments by role
    # and the forward passes of one step.
    config = kto.get_config(f"fsdp={FSDP}")
    mesh = mesh_lib.build_mesh(config.mesh, plan.topology_devices(TOPOLOGY))
    train, evaluate = aot.functions(config, mesh)
    assert (train.name, evaluate.name) == ("kto_train_step", "kto_eval_step")
    assert train.lower().as_text()
    params = plan.chip_bytes(train.parts["params"])
    assert plan.chip_bytes(train.parts["frozen"]) == params > 0
    b, n = config.train.batch_size, config.train.seq_len
    assert train.args[2]["tokens"].shape == (b, 2, n)  # each completion and a mismatched one
    # z0: policy and reference forwards of the mismatched rows; the loss: the policy's forward
    # and backward and a reference forward of the completions; eval: the four forwards.
    assert train.flops == pytest.approx(6 / 4 * evaluate.flops)


@pytest.mark.slow
def test_grpo_plans_rollout_score_and_update_with_its_models_resident():
    config = grpo.get_config(f"fsdp={FSDP}")
    config.grpo.update(ptx_coef=1.0, ptx_batch=8)  # the ptx batch in the update's arguments
    rows = _plan(config, compile_only={"update"})
    assert list(rows) == ["rollout", "score", "update"]
    roll, score, update = rows["rollout"], rows["score"], rows["update"]
    assert _fits_with_a_bound(update)
    c = config.grpo
    b, s = c.prompts * c.group_size, c.prompt_len + c.max_new_tokens
    assert roll["samples"] == b and roll["tokens"] == b * c.max_new_tokens
    # Reference (policy-shaped) and reward model (scalar head) are frozen; no value model.
    policy = score["params_bytes"]
    assert score["frozen_bytes"] > 2 * policy and update["resident_bytes"] == score["frozen_bytes"]
    assert roll["resident_bytes"] == update["opt_state_bytes"] + score["frozen_bytes"]
    # epochs x minibatches of policy forward + backward, and the ptx term's.
    n_up = c.epochs * b // c.minibatch
    assert update["tokens"] == c.epochs * b * s + n_up * c.ptx_batch * c.ptx_seq_len
    assert update["batch_bytes"] > score["batch_bytes"]  # logp_old, logp_ref, advantages, ptx


@pytest.mark.slow
def test_rsft_plans_a_round_sampling_scoring_and_fine_tuning():
    config = rsft.get_config(f"fsdp={FSDP}")
    rows = _plan(config, compile_only={"score"})  # the sampler and SFT step: PPO's, LM's
    assert list(rows) == ["rollout", "score", "sft_train_step"]
    rc, t = config.rsft, config.train
    n = rc.prompts_per_round * rc.k
    roll, score, step = rows["rollout"], rows["score"], rows["sft_train_step"]
    assert _fits_with_a_bound(score)
    # best_of_k's batches of 64 rows, the scorer's of 32, and the round's SFT steps as if every
    # prompt were kept (train.epochs passes over prompts_per_round demonstrations).
    assert roll["samples"] == 64 and roll["calls"] == -(-n // 64)
    assert score["samples"] == 32 and score["calls"] == -(-n // 32)
    assert step["calls"] == -(-int(t.epochs * rc.prompts_per_round) // t.batch_size)
    # Each model alone on the chips: nothing resident, the RM frozen, the policy trained.
    assert roll["resident_bytes"] == score["resident_bytes"] == step["resident_bytes"] == 0
    assert score["frozen_bytes"] > roll["params_bytes"] == step["params_bytes"] > 0
    assert step["opt_state_bytes"] > 0
