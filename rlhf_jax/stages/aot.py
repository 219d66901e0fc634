"""Every compiled function of a stage, with abstract inputs, for the ahead-of-time planner.

`functions(config, mesh)` returns the jitted functions `config.stage` runs, built by the stage's
own builders (`lm.compile_steps`, `rm.compile_steps`, `dpo.compile_steps`, `kto.compile_steps`,
`ppo.Iteration`, grpo_steps.py's steps, the sampler and the RM scorer: same jit, shardings and
donation), with ShapeDtypeStruct arguments that carry their NamedShardings, the arguments by role
(params, optimizer state, frozen models, batch), what stays resident in HBM during the call
without being an argument, and the model FLOPs of one call with every loop trip counted.
`launch/aot.py` compiles them for a TPU topology; `infra/plan.py` reads the results. Nothing is
allocated and no data, tokenizer or checkpoint is read (an `init_from` or reward workdir that
exists here lends its model config, as the stage would use it).

`PLANNERS` maps each stage to its planner, `(config, mesh, rules, rm_size) -> [Function]`: this
module's for the supervised stages (pretrain, SFT, RM; DPO and its loss variants such as SimPO,
which take DPO's own train step; KTO) and rsft; rlhf_jax/stages/aot_rl.py's for PPO and GRPO.

Shapes are each function's largest: responses run to their `max_new_tokens` (EOS never stops a
row), the RM's and DPO's K is `k_max` (a run sizes K from its data, at most that).
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import jax.numpy as jnp

from rlhf_jax.data import packing
from rlhf_jax.infra import plan, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.rl import dpo as dpo_math
from rlhf_jax.sampling import best_of_k, reward
from rlhf_jax.stages import aot_rl, aot_rollout, dpo, kto, lm, rm, rsft, setup
from rlhf_jax.stages.aot_inputs import (
    Function,
    describe,
    model_config_of,
    reference_params,
    reward_config,
    rows,
    stored_model,
    train_state,
)


def functions(config, mesh, rm_size: str = "") -> list[Function]:
    """The stage's compiled functions (module docstring). `rm_size` names the preset of the
    reward model (and PPO's value model) when no reward workdir is here (default: the policy's)."""
    if config.stage not in PLANNERS:
        raise ValueError(
            f"the planner does not plan config.stage={config.stage!r}; expected one of "
            f"{tuple(PLANNERS)} (plan a pipeline's stages one experiment file at a time)"
        )
    rules = sharding.normalize_rules(config.sharding.rules)
    return PLANNERS[config.stage](config, mesh, rules, rm_size)


def plan_lm(config, mesh, rules, rm_size: str = "") -> list[Function]:
    """Pretraining / SFT: `train_step` and `eval_step` (lm.compile_steps)."""
    del rm_size
    t = config.train
    setup.check_batch(config, mesh, rules)
    cfg = model_config_of(config)
    if cfg.family == "gpt2" and t.seq_len > cfg.max_len:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_len={cfg.max_len}")
    graphdef, tx, state, shardings = train_state(cfg, config, mesh, rules)
    packed = setup.is_packed(config)
    train, evaluate = lm.compile_steps(graphdef, tx, shardings, mesh, rules, t.grad_accum, packed)
    b, n = t.batch_size, t.seq_len
    batch = {
        "inputs": rows(mesh, rules, (b, n), jnp.int32),
        "targets": rows(mesh, rules, (b, n), jnp.int32),
        "mask": rows(mesh, rules, (b, n), jnp.float32),
    }
    if packed:  # several demonstrations per row (data/packing.py)
        batch.update({k: rows(mesh, rules, (b, n), jnp.int32) for k in packing.PACKED_FIELDS})
    fwd = plan.forward_flops(cfg, state["params"], b * n, n)
    params, opt = state["params"], state["opt_state"]
    return [
        Function(
            "train_step",
            train,
            (state, batch),
            {"params": params, "opt_state": opt, "batch": batch},
            3 * fwd,
            b * n,
            b,
            hw_factor=plan.remat_factor(cfg),
            note=f"{describe(cfg, params)}; grad_accum={t.grad_accum}",
        ),
        Function(
            "eval_step",
            evaluate,
            (params, batch),
            {"params": params, "batch": batch},
            fwd,
            b * n,
            b,
            resident=opt,
        ),
    ]


def plan_rm(config, mesh, rules, rm_size: str = "") -> list[Function]:
    """Reward model: `rm_train_step` and `rm_eval_step` (rm.compile_steps) at K = `rm.k_max`."""
    del rm_size
    t = config.train
    setup.check_batch(config, mesh, rules)
    cfg = dataclasses.replace(model_config_of(config), head="scalar")
    graphdef, tx, state, shardings = train_state(cfg, config, mesh, rules)
    train, evaluate = rm.compile_steps(graphdef, tx, shardings, config, mesh, rules)
    k = 2 if config.rm.batching == "per_pair" else config.rm.k_max
    b, n = t.batch_size, t.seq_len
    batch = {
        "tokens": rows(mesh, rules, (b, k, n), jnp.int32),
        "mask": rows(mesh, rules, (b, k, n), jnp.bool_),
        "ranks": rows(mesh, rules, (b, k), jnp.int32),
        "kmask": rows(mesh, rules, (b, k), jnp.float32),
    }
    fwd = plan.forward_flops(cfg, state["params"], b * k * n, n)
    params, opt = state["params"], state["opt_state"]
    note = f"{describe(cfg, params)}; K={k}"
    if setup.is_packed(config):  # B rows of K L positions, attention over the whole row
        batch, more = packed_comparisons(mesh, rules, b, k, n, scored=False)
        fwd, note = plan.forward_flops(cfg, params, b * k * n, k * n), note + more
    return [
        Function(
            "rm_train_step",
            train,
            (state, batch),
            {"params": params, "opt_state": opt, "batch": batch},
            3 * fwd,
            b * k * n,
            b,
            hw_factor=plan.remat_factor(cfg),
            note=note,
        ),
        Function(
            "rm_eval_step",
            evaluate,
            (params, batch),
            {"params": params, "batch": batch},
            fwd,
            b * k * n,
            b,
            resident=opt,
        ),
    ]


def plan_dpo(config, mesh, rules, rm_size: str = "") -> list[Function]:
    """DPO and its loss variants (`dpo.loss`, SimPO among them): `dpo_train_step` and
    `dpo_eval_step` as dpo.compile_steps builds them, on comparison batches of K = `dpo.k_max`
    responses, the frozen reference an argument (never donated; `{}` for a reference-free loss).
    Not planned: the `eval/kl` sampler, a few dozen short rows."""
    del rm_size
    t, c = config.train, config.dpo
    dpo.check_config(c)
    b, k, n = t.batch_size, c.k_max, t.seq_len
    batch = {  # data/dpo_data.py's layout
        "tokens": rows(mesh, rules, (b, k, n), jnp.int32),
        "mask": rows(mesh, rules, (b, k, n), jnp.bool_),
        "ranks": rows(mesh, rules, (b, k), jnp.int32),
        "kmask": rows(mesh, rules, (b, k), jnp.float32),
        "prompt_len": rows(mesh, rules, (b,), jnp.int32),
    }
    # Per step: the policy's forward and backward, and one reference forward unless the loss
    # has none (each forward over all B x K sequences).
    refs = 0 if c.loss in dpo_math.REFERENCE_FREE else 1
    note = f"K={k}; loss={c.loss}"
    if setup.is_packed(config):  # B rows of K L positions (data/packing.pack_comparisons)
        batch, more = packed_comparisons(mesh, rules, b, k, n, scored=True)
        return _reference_steps(config, mesh, rules, dpo, batch, b, (0, refs), note + more, k * n)
    return _reference_steps(config, mesh, rules, dpo, batch, b * k, (0, refs), note)


def packed_comparisons(mesh, rules, b: int, k: int, n: int, scored: bool):
    """(abstract packed comparison batch of B rows of K L positions, a note for the plan): the
    layout of data/packing.pack_comparisons, with `scored` for DPO's response tokens. The
    comparison slots per row C are the data's; 8 assumed (only [B, C, K] tables scale with it)."""
    per_row = 8
    shape = {2: (b, k * n), 3: (b, per_row, k)}
    batch = {
        f: rows(mesh, rules, shape[nd], dtype)
        for f, (nd, dtype) in packing.comparison_fields(scored).items()
    }
    return batch, f"; packed rows of {k * n}, {per_row} comparisons per row assumed"


def plan_kto(config, mesh, rules, rm_size: str = "") -> list[Function]:
    """KTO: `kto_train_step` and `kto_eval_step` as kto.compile_steps builds them, on rows of a
    completion and its mismatched one (data/kto_data.py), the frozen reference an argument."""
    del rm_size
    t = config.train
    kto.check_config(config.kto)
    b, n = t.batch_size, t.seq_len
    batch = {
        "tokens": rows(mesh, rules, (b, 2, n), jnp.int32),
        "mask": rows(mesh, rules, (b, 2, n), jnp.bool_),
        "prompt_len": rows(mesh, rules, (b,), jnp.int32),
        "label": rows(mesh, rules, (b,), jnp.float32),
        "weight": rows(mesh, rules, (b,), jnp.float32),
    }
    # Per step, over the B completions (slot 0) and the B mismatched ones (slot 1): the
    # reference point z0 (policy and reference forwards of slot 1), then the loss (the
    # policy's forward and backward and a reference forward of slot 0).
    return _reference_steps(config, mesh, rules, kto, batch, b, (1, 2), "mismatched pairs")


def _reference_steps(config, mesh, rules, stage, batch, seqs: int, extra, note: str, n=0):
    """The train and eval steps of a stage trained against a frozen reference (DPO, KTO), from
    `stage.compile_steps`, on `batch` of `seqs` rows of `n` (0: `train.seq_len`) per forward.

    `extra` = (policy forwards without gradient, reference forwards) per step, each over those
    `seqs` sequences, beside the policy's one forward and backward; eval runs the forwards."""
    t = config.train
    setup.check_batch(config, mesh, rules)
    cfg = model_config_of(config)
    graphdef, tx, state, shardings = train_state(cfg, config, mesh, rules)
    train, evaluate = stage.compile_steps(graphdef, tx, shardings, config, mesh, rules)
    params, opt = state["params"], state["opt_state"]
    no_grad, refs = extra
    # The policy's shapes; `{}` for a reference-free loss and for a LoRA policy's own base.
    ref = (refs and reference_params(config, config.stage, cfg, mesh, rules)) or {}
    n, name = n or t.seq_len, config.stage
    # The head runs on every predicting position (stages/dpo.response_logprobs).
    fwd = plan.forward_flops(cfg, params, seqs * n, n, seqs * (n - 1))
    return [
        Function(
            f"{name}_train_step",
            train,
            (state, ref, batch),
            {"params": params, "opt_state": opt, "frozen": ref, "batch": batch},
            (3 + no_grad + refs) * fwd,
            seqs * n,
            t.batch_size,
            # Full remat reruns the forward of the one pass with a gradient.
            hw_factor=(3 * plan.remat_factor(cfg) + no_grad + refs) / (3 + no_grad + refs),
            note=f"{describe(cfg, params)}; {note}; grad_accum={t.grad_accum}",
        ),
        Function(
            f"{name}_eval_step",
            evaluate,
            (params, ref, batch),
            {"params": params, "frozen": ref, "batch": batch},
            (1 + no_grad + refs) * fwd,
            seqs * n,
            t.batch_size,
            resident=opt,
        ),
    ]


def plan_rsft(config, mesh, rules, rm_size: str = "") -> list[Function]:
    """Best-of-K fine-tuning, one round: `rollout` (K samples of each of `rsft.prompts_per_round`
    prompts, in best_of_k's batches of rows), `score` (the RM on every candidate, in its scorer's
    batches) and the round's SFT `train_step` (rsft.sft_config's stage, as lm plans it).

    The three run one after another, each model alone on the chips (best_of_k frees the policy
    before the RM loads; each round's SFT is a fresh stage), so nothing is resident. Prompts are
    planned `train.seq_len - rsft.max_new_tokens` wide, the longest a round's SFT step trains
    whole; the round bound counts every batch and SFT step as if every prompt were kept."""
    rc, t = config.rsft, config.train
    policy = model_config_of(config)
    n_rows, tn = rc.prompts_per_round * rc.k, rc.max_new_tokens
    p = t.seq_len - tn
    if policy.family == "gpt2":  # best_of_k cuts prompts to the learned positions left
        p = min(p, policy.max_len - tn)
    if p < 1:
        raise ValueError(
            f"rsft.max_new_tokens={tn} leaves no prompt room in train.seq_len={t.seq_len}"
        )
    dp = sharding.data_parallel_size(mesh, rules)

    def default(fn, arg):  # the batch size rsft leaves at best_of_k's default
        return inspect.signature(fn).parameters[arg].default

    batch = dp * math.ceil(min(default(best_of_k.best_of_k, "batch_size"), n_rows) / dp)
    graphdef, _, _ = state_lib.param_shardings(policy, mesh, rules)
    params = state_lib.abstract_params(policy, mesh, rules)
    sample = aot_rollout.make(graphdef, config.get("rollout"), mesh, rules, tn)
    roll = aot_rollout.function(
        sample, config.get("rollout"), policy, params, mesh, rules, (batch, p, tn),
        (rc.temperature, 0, 1.0),
    )  # fmt: skip
    roll.calls = math.ceil(n_rows / batch)
    roll.note = f"policy {describe(policy, params)}; {roll.note}; {roll.calls} batches"

    # The scorer reads [bos] + template + response, cut at the RM's own train.seq_len (its
    # workdir's, when here; else this config's).
    rm_cfg = reward_config(policy, rc.reward_from, rm_size)
    n = t.seq_len
    if stored_model(rc.reward_from, policy) is not None:
        rm_train = (setup.read_init_meta(rc.reward_from) or {}).get("config", {}).get("train", {})
        n = rm_train.get("seq_len") or n
    sb = default(best_of_k.load_scorer, "batch_size")
    sb = max(dp, sb - sb % dp)
    rm_graphdef = model_lib.abstract(rm_cfg)[0]
    rm_params = state_lib.abstract_params(rm_cfg, mesh, rules)
    tokens = (rows(mesh, rules, (sb, n), jnp.int32), rows(mesh, rules, (sb, n), jnp.bool_))
    score = Function(
        "score",
        reward.jitted_scorer(rm_graphdef, mesh, rules),
        (rm_params, *tokens),
        {"frozen": rm_params, "batch": tokens},
        plan.forward_flops(rm_cfg, rm_params, sb * n, n),
        sb * n,
        sb,
        calls=math.ceil(n_rows / sb),
        note=f"reward {model_lib.param_count(rm_params) / 1e6:,.1f}M params",
    )
    score.note += f"; {score.calls} batches of {sb} x {n} tokens"

    sft = rsft.sft_config(config, "", config.init_from)
    sft_fns = {fn.name: fn for fn in plan_lm(sft, mesh, rules)}
    step = sft_fns["train_step"]
    step.name = "sft_train_step"
    step.calls = lm.total_steps(sft, {"train_demos": rc.prompts_per_round})
    step.note += f"; {step.calls} steps per round"
    out = [roll, score, step]
    if config.data.eval:  # held-out SFT loss only with an explicit data.eval (rsft.sft_config)
        out.append(dataclasses.replace(sft_fns["eval_step"], name="sft_eval_step"))
    return out


PLANNERS = {
    "pretrain": plan_lm,
    "sft": plan_lm,
    "rm": plan_rm,
    "dpo": plan_dpo,
    "kto": plan_kto,
    "ppo": aot_rl.plan_ppo,
    "grpo": aot_rl.plan_grpo,
    "rsft": plan_rsft,
}
