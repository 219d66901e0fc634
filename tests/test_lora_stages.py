"""LoRA through the stages (stages/*.py with config.lora): a LoRA SFT run lowers its loss,
stores only adapters naming its base, resumes bitwise and hands on base + adapters; LoRA RM, DPO,
rsft, GRPO and PPO train through their stages on the bases they should. The math (fresh adapters,
merged forward, sharding, one step) is test_lora.py's."""

import dataclasses
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_lora import forward

from experiments import dpo, grpo, ppo_ptx, pretrain, rm, rsft, sft
from rlhf_jax.data import lm_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.infra import checkpoint, metrics, restore, sharding
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import lora
from rlhf_jax.sampling import load
from rlhf_jax.stages import dpo as dpo_stage
from rlhf_jax.stages import grpo as grpo_stage
from rlhf_jax.stages import lm, ppo_steps, setup
from rlhf_jax.stages import ppo as ppo_stage
from rlhf_jax.stages import rm as rm_stage
from rlhf_jax.stages import rsft as rsft_stage
from rlhf_jax.tools import convert


def write_base_dir(root):
    """A seeded tiny LM saved as a stage workdir `root/base` (training it would test nothing
    more), and its tokenizer."""
    docs = lm_data.read_documents(pretrain.get_config().data.train)
    tok_path = tok_lib.train_tokenizer(docs, str(root / "tok.model"), 512)
    cfg = setup.model_config_from(sft.get_config(), tok_lib.Tokenizer.load(tok_path).vocab_size)
    mesh = mesh_lib.build_mesh(sft.get_config().mesh, jax.devices())
    _, _, shard = state_lib.param_shardings(cfg, mesh, sharding.DEFAULT_RULES)
    params = state_lib.init_params(cfg, 0, shard)
    with checkpoint.Checkpointer(str(root / "base" / "checkpoints")) as ckpt:
        ckpt.save(1, {"params": params}, meta={"model": dataclasses.asdict(cfg), "stage": "sft"})
    shutil.copyfile(tok_path, root / "base" / setup.TOKENIZER_FILE)
    return jax.device_get(params)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return root, write_base_dir(root)


def with_lora(c, rank=4):
    c.lora.update(rank=rank, alpha=8.0)
    return c


def sft_config(root):
    c = with_lora(sft.get_config())
    c.init_from = str(root / "base")
    c.sft.eval_samples = 0
    c.train.update(epochs=0.0, steps=8, batch_size=8, lr=1e-2, warmup_steps=0, log_every=1,
                   ckpt_every=4, eval_every=0)  # fmt: skip
    return c


def mesh_of(config):
    return mesh_lib.build_mesh(config.mesh, jax.devices())


class Crash(Exception):
    pass


def crash_after(monkeypatch, crash_step: int):
    """A simulated preemption: the run raises Crash once step `crash_step` is logged."""
    real_write = metrics.MetricsWriter.write

    def write(self, step, m):
        real_write(self, step, m)
        if step == crash_step:
            raise Crash(f"simulated preemption after step {crash_step}")

    monkeypatch.setattr(metrics.MetricsWriter, "write", write)


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.fixture(scope="module")
def lora_sft(chain):
    """A LoRA SFT run from the seeded base: (its final state, its workdir)."""
    root, _ = chain
    config = sft_config(root)
    return lm.run(config, mesh_of(config), str(root / "sft")), root / "sft"


@pytest.fixture(scope="module")
def lora_rm(chain, lora_sft):
    """A LoRA RM run from the LoRA SFT workdir: (its final state, its workdir)."""
    root, _ = chain
    c = with_lora(rm.get_config())
    c.init_from = str(lora_sft[1])
    c.rm.norm_max = 16
    c.train.update(steps=3, batch_size=8, seq_len=64, log_every=1, ckpt_every=3, eval_every=0,
                   lr=1e-2, warmup_steps=0)  # fmt: skip
    return rm_stage.run(c, mesh_of(c), str(root / "rm")), root / "rm"


@pytest.mark.slow
def test_lora_sft_learns_stores_adapters_resumes_bitwise_and_hands_on(chain, lora_sft, monkeypatch):
    root, base = chain
    config = sft_config(root)
    straight = lora_sft[0]
    losses = [r["train/loss"] for r in metrics.read_metrics(str(root / "sft" / "metrics.jsonl"))
              if "train/loss" in r]  # fmt: skip
    assert losses[-1] < losses[0] - 0.1, losses
    trainable, frozen = lora.split_trainable(straight["params"])
    assert leaves_equal(frozen, base)  # the base never moved
    # The checkpoint holds the adapters and their optimizer state only, and names its base.
    meta = checkpoint.read_meta(str(root / "sft"))
    assert meta["lora"] == {"base": str(root / "base"), "seed": 0}
    stored = checkpoint.restore_params(
        str(root / "sft"),
        jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trainable
        ),
    )
    assert leaves_equal(stored, trainable)

    crash_after(monkeypatch, 6)  # the last checkpoint before it: step 4
    with pytest.raises(Crash):
        lm.run(config, mesh_of(config), str(root / "sft_b"))
    monkeypatch.undo()
    resumed = lm.run(config, mesh_of(config), str(root / "sft_b"))
    assert leaves_equal(straight["params"], resumed["params"])
    assert leaves_equal(straight["opt_state"], resumed["opt_state"])

    # Read back (a tool, or init_from): the merged model, whose logits are the LoRA model's.
    graphdef, merged, cfg, _, _ = load.load_model(str(root / "sft"), mesh_of(config))
    assert cfg.lora_rank == 0 and not lora.has_adapters(merged)
    tokens = jnp.asarray(np.arange(24).reshape(2, 12) % cfg.vocab_size)
    tok = tok_lib.load_tokenizer(str(root / "tok.model"))
    lora_model = setup.resolve_model(config, tok)[0]
    want = forward(lora_model, straight["params"], tokens)
    np.testing.assert_allclose(forward(cfg, merged, tokens), want, atol=1e-4)
    # Exported for Hugging Face: the merged weights, read back as `hf:DIR` with the same logits.
    hf_dir = root / "hf_sft"
    convert.export_workdir(str(root / "sft"), str(hf_dir), mesh_of(config), config.sharding.rules)
    abstract = state_lib.abstract_params(cfg, mesh_of(config), config.sharding.rules)
    exported = restore.restore_params(f"hf:{hf_dir}", abstract)
    np.testing.assert_allclose(forward(cfg, exported, tokens), want, atol=1e-4)


@pytest.mark.slow
def test_lora_rm_and_dpo_from_a_lora_sft(chain, lora_sft, lora_rm):
    root, _ = chain
    sft_dir, (state, rm_dir) = lora_sft[1], lora_rm
    mesh = mesh_of(sft.get_config())
    merged = load.load_model(str(sft_dir), mesh)[1]
    trainable, frozen = lora.split_trainable(state["params"])
    assert {"score_head", "score_bias"} <= set(trainable)  # the head trains beside the adapters
    assert np.abs(jax.device_get(trainable["score_head"])).max() > 0
    assert leaves_equal(frozen, {k: merged[k] for k in frozen})  # the merged SFT, frozen
    rm_meta = checkpoint.read_meta(str(rm_dir))
    assert rm_meta["lora"]["base"] == str(sft_dir) and "reward_bias" in rm_meta
    # A LoRA RM is read as base + adapters + head, as PPO's reward and value models read it.
    rules = sharding.DEFAULT_RULES
    abstract = state_lib.abstract_params(restore.stored_model(rm_meta, "rm"), mesh, rules)
    rm_merged = restore.restore_params(str(rm_dir), abstract)
    np.testing.assert_array_equal(rm_merged["score_head"], trainable["score_head"])

    d = with_lora(dpo.get_config())
    d.init_from = str(sft_dir)
    d.dpo.kl_prompts = 0
    d.train.update(steps=2, batch_size=8, seq_len=64, log_every=1, ckpt_every=2, eval_every=0,
                   lr=1e-2, warmup_steps=0)  # fmt: skip
    state = dpo_stage.run(d, mesh_of(d), str(root / "dpo"))
    rows = [r for r in metrics.read_metrics(str(root / "dpo" / "metrics.jsonl")) if "dpo/loss" in r]
    # The reference is the policy's own frozen base: at step 1 every margin is 0 up to the float
    # rounding of two compiled programs (base + a zero adapter vs the base alone; on one CPU all
    # pairs tie exactly, on another one pair in 14 is an ulp apart).
    assert rows[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(rows[0]["dpo/margin"]) < 1e-6 and rows[0]["dpo/tie_frac"] > 0.5
    assert rows[1]["dpo/loss"] != rows[0]["dpo/loss"]
    assert leaves_equal(lora.split_trainable(state["params"])[1], merged)
    # The pipeline names the LoRA SFT workdir as the reference too: read merged, it is the
    # policy at step 0 (a check against its LoRA fields stopped this run before).
    d.dpo.reference_from = str(sft_dir)
    dpo_stage.run(d, mesh_of(d), str(root / "dpo_ref"))
    first = metrics.read_metrics(str(root / "dpo_ref" / "metrics.jsonl"))[0]
    assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow
def test_lora_rsft_rounds_stack_adapters_on_the_previous_round(chain, lora_sft, lora_rm):
    """rsft with LoRA: best-of-K samples from the LoRA SFT (read merged), the LoRA RM scores
    them, and each round's SFT trains fresh adapters on the previous round's policy, merged,
    as its frozen base: the bases chain round to round and every round moves the model."""
    root, _ = chain
    sft_dir, rm_dir = lora_sft[1], lora_rm[1]
    c = with_lora(rsft.get_config())
    c.init_from, c.rsft.reward_from = str(sft_dir), str(rm_dir)
    # The tiny base rarely ends with EOS: keep every prompt's best candidate.
    c.rsft.update(k=2, rounds=2, prompts_per_round=8, max_new_tokens=8, finished_only=False)
    c.train.update(epochs=0.0, steps=2, batch_size=8, seq_len=64, log_every=1, ckpt_every=2,
                   lr=1e-2, warmup_steps=0)  # fmt: skip
    final = rsft_stage.run(c, mesh_of(c), str(root / "rsft"))
    rounds = [root / "rsft" / f"round_{r}" / "policy" for r in (1, 2)]
    assert final == str(rounds[1])
    bases = [checkpoint.read_meta(str(d))["lora"]["base"] for d in rounds]
    assert bases == [str(sft_dir), str(rounds[0])]
    cands = lm_data.read_jsonl(str(root / "rsft" / "round_1" / "candidates.jsonl"),
                               {"prompt": str, "candidates": list})  # fmt: skip
    assert len(cands) == 8 and all(len(r["candidates"]) == 2 for r in cands)
    mesh = mesh_of(c)
    merged = [load.load_model(str(d), mesh)[1] for d in (sft_dir, *rounds)]
    for before, after in zip(merged[:-1], merged[1:], strict=True):
        assert not leaves_equal(before, after)  # each round's adapters moved its base


def count_a(prompts, responses):
    return [min(r.count("a"), 5) / 5 for r in responses]


@pytest.mark.slow
def test_lora_grpo_is_on_policy_with_its_base_as_reference(chain):
    root, base = chain
    c = with_lora(grpo.get_config())
    c.init_from = str(root / "base")
    c.grpo.reward_fn = "test_lora_stages:count_a"
    c.grpo.update(prompts=4, group_size=4, minibatch=8, epochs=2, prompt_len=32,
                  max_new_tokens=8, eval_prompts=0, beta=0.1)  # fmt: skip
    c.train.update(steps=2, log_every=1, ckpt_every=2, eval_every=0, lr=1e-2)
    state = grpo_stage.run(c, mesh_of(c), str(root / "grpo"))
    rows = [r for r in metrics.read_metrics(str(root / "grpo" / "metrics.jsonl"))
            if "grpo/loss" in r]  # fmt: skip
    assert rows[0]["grpo/first_ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["grpo/kl_per_seq"] == 0.0  # policy == its base at the first rollout
    assert rows[1]["grpo/kl_per_seq"] != 0.0
    assert leaves_equal(lora.split_trainable(state["params"])[1], base)


def count_apples(prompts, responses):
    return [min(r.count("apples"), 3) for r in responses]


@pytest.mark.slow
def test_lora_ppo_trains_adapters_and_value_head_and_resumes_bitwise(
    chain, lora_sft, lora_rm, monkeypatch
):
    root, _ = chain
    (sft_dir, rm_dir) = lora_sft[1], lora_rm[1]
    c = with_lora(ppo_ptx.get_config())
    c.init_from, c.ppo.reward_from = str(sft_dir), str(rm_dir)  # value from the LoRA RM too
    c.ppo.update(rollout_batch=8, minibatch=8, epochs=1, prompt_len=48, max_new_tokens=8,
                 ptx_coef=0.0, value_lr=1e-2, eval_prompts=0)  # fmt: skip
    c.train.update(steps=2, lr=1e-2, log_every=1, eval_every=0, ckpt_every=1)
    run = lambda w: ppo_stage.run(c, mesh_lib.build_mesh(c.mesh, jax.devices()[:2]), str(w))  # noqa: E731
    straight = run(root / "ppo")
    rows = [r for r in metrics.read_metrics(str(root / "ppo" / "metrics.jsonl")) if "ppo/loss" in r]
    assert rows[0]["ppo/first_ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["ppo/kl_per_seq"] == 0.0  # the reference is the policy's own base
    mesh = mesh_lib.build_mesh(c.mesh, jax.devices()[:2])
    sft_merged, rm_merged = (load.load_model(str(d), mesh)[1] for d in (sft_dir, rm_dir))
    policy, value = straight["params"]["policy"], straight["params"]["value"]
    assert leaves_equal(lora.split_trainable(policy)[1], sft_merged)
    v_train, v_frozen = lora.split_trainable(value)
    assert leaves_equal(v_frozen, {k: rm_merged[k] for k in v_frozen})
    assert not np.array_equal(v_train["score_head"], rm_merged["score_head"])  # the head trains
    assert checkpoint.read_meta(str(root / "ppo"))["value_base"] == str(rm_dir)
    # One frozen base for reward and value: of the RM only its head is held; the reward model's
    # other params are the value model's base arrays themselves, one base fewer in bytes.
    tok, rules = setup.load_tokenizer(c, str(root / "ppo")), c.sharding.rules
    cfgs, _, frozen, _ = ppo_stage.build_models(c, tok, mesh, rules)
    params = ppo_stage.trained_params(c, cfgs, mesh, rules)
    reward, v_base = ppo_steps.reward_params(params, frozen), lora.split_lora(params["value"])[1]
    assert set(frozen) == {"reward_head"} and leaves_equal(reward, rm_merged)
    pairs = zip(jax.tree.leaves(lora.split_lora(reward)[1]), jax.tree.leaves(v_base), strict=True)
    assert all(x is y for x, y in pairs)
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    distinct = {id(x): x.nbytes for x in jax.tree.leaves((params, frozen, reward))}
    assert sum(distinct.values()) == nbytes((params, reward)) - nbytes(v_base) > 0

    crash_after(monkeypatch, 1)
    with pytest.raises(Crash):
        run(root / "ppo_b")
    monkeypatch.undo()
    resumed = run(root / "ppo_b")
    assert leaves_equal(straight["params"], resumed["params"])
    assert leaves_equal(straight["opt_state"], resumed["opt_state"])
