"""The planner with LoRA (`config.lora`): the arguments each stage holds, lowered for a v5e:2x2.

PPO-ptx with LoRA holds no reference copy (the policy's base with its adapters off is the
reference), and its reward model is the value model's frozen base plus the RM's scalar head;
only adapters and heads have AdamW moments; the bases are held in `lora.base_dtype`. DPO and GRPO
hold no reference. These are the trees ppo.build_models, dpo.py and grpo.py build for a run
(tests/test_lora_stages.py runs them); here they are planned without a checkpoint and lowered
for TPU.
"""

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("libtpu", reason="needs libtpu (pip install -e '.[tpu]') to compile for TPU")

from experiments import dpo, grpo, ppo_ptx  # noqa: E402
from rlhf_jax.infra import mesh as mesh_lib  # noqa: E402
from rlhf_jax.infra import plan  # noqa: E402
from rlhf_jax.models import lora  # noqa: E402
from rlhf_jax.stages import aot  # noqa: E402

TOPOLOGY = "v5e:2x2"
LORA = dict(rank=4, base_dtype="bfloat16")


def planned(config):
    mesh = mesh_lib.build_mesh(config.mesh, plan.topology_devices(TOPOLOGY))
    return {fn.name: fn for fn in aot.functions(config, mesh)}


def ppo_plan(lora_on: bool, **ppo):
    config = ppo_ptx.get_config("fsdp=4")
    config.ppo.update(ppo)
    if lora_on:
        config.lora.update(LORA)
    return planned(config)


def dtypes(tree):
    return {x.dtype for x in jax.tree.leaves(tree)}


def test_ppo_with_lora_holds_two_bases_and_small_adapters():
    full, low = ppo_plan(False), ppo_plan(True)
    assert set(full["score"].parts["frozen"]) == {"ref", "reward"}
    # No reference copy; of the reward model only its head (its base is the value model's).
    frozen = low["score"].parts["frozen"]
    assert set(frozen) == {"reward_head"}
    head = jax.tree.leaves(frozen["reward_head"])
    assert head and sum(x.size for x in head) <= 64 + 1  # d_model weights (+ a bias)
    params = low["update"].parts["params"]
    for k in ("policy", "value"):
        trained, base = lora.split_lora(params[k])
        assert lora.has_adapters(trained) and dtypes(trained) == {jnp.dtype(jnp.float32)}
        assert dtypes(base) == {jnp.dtype(jnp.bfloat16)}
    # AdamW's two moments of the adapters and heads only: the tiny preset's rank-4 adapters
    # (2 layers x 4 attention projections of 64 -> 64, up and down of 64 <-> 256) per model.
    per_model = 2 * (4 * 4 * (64 + 64) + 2 * 4 * (64 + 256))
    opt = low["update"].parts["opt_state"]
    moments = sum(x.size for x in jax.tree.leaves(opt) if x.ndim)
    assert 2 * 2 * per_model <= moments <= 2 * (2 * per_model + 64 + 1)
    fb = {
        n: plan.chip_bytes(f["update"].parts["opt_state"])
        for n, f in (("full", full), ("lora", low))
    }
    assert fb["lora"] < fb["full"] / 5
    # Both functions that take the new trees trace and lower for the TPU slice.
    for name in ("score", "update"):
        assert low[name].lower().as_text()


def test_ppo_with_lora_holds_what_the_stage_would_otherwise():
    # The value model from the SFT policy: the RM is a separate frozen model; with
    # `ppo.reference_from`, the reference is held (that model with zero adapters).
    low = ppo_plan(True, value_init="sft")
    assert set(low["score"].parts["frozen"]) == {"reward"}
    low = ppo_plan(True, reference_from="/elsewhere/sft")
    ref = low["score"].parts["frozen"]["ref"]
    assert lora.has_adapters(ref) and set(low["score"].parts["frozen"]) == {"ref", "reward_head"}
    # A reward function: no reward model at all.
    assert (
        set(ppo_plan(True, reward_fn="tests.ppo_rewards:count_apples")["score"].parts["frozen"])
        == set()
    )


def test_dpo_and_grpo_with_lora_hold_no_reference():
    config = dpo.get_config("fsdp=4")
    config.lora.update(LORA)
    train = planned(config)["dpo_train_step"]
    assert train.parts["frozen"] == {} and "LoRA r=4" in train.note
    assert train.lower().as_text()
    config = grpo.get_config("fsdp=4")
    config.lora.update(LORA)
    score = planned(config)["score"]
    assert set(score.parts["frozen"]) == {"reward"}
