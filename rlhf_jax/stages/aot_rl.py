"""The RL stages' planners (PPO, GRPO).

Each iteration of an RL stage is three compiled functions, each a `Function` with `calls=1`:
`rollout` (the generator `config.rollout` names, the static sampler or the paged engine, as
aot_rollout.py plans it for every sampling stage), `score`
(teacher-forced log-probs, the reward, advantages) and `update` (epochs x minibatches, one loss).
They are built by the stages' own builders: `ppo.Iteration` for PPO; for GRPO `rollout.make` and
grpo_steps.py's `score_step` and `update_step`, jitted with grpo.py's shardings and donation.
rlhf_jax/stages/aot.py's `PLANNERS` points here; aot_inputs.py has the shared shapes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rlhf_jax.infra import plan, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import lora
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.stages import aot_rollout, grpo_steps, ppo, ppo_steps, setup
from rlhf_jax.stages.aot_inputs import (
    Function,
    describe,
    key_dtype,
    model_config_of,
    reference_params,
    reward_config,
    rows,
    scalar,
    train_state,
)


def _check_len(cfg, p: int, t: int, section: str) -> None:
    """The stages' own check: GPT-2's learned positions end at max_len."""
    if cfg.family == "gpt2" and p + t > cfg.max_len:
        raise ValueError(
            f"{section}.prompt_len + {section}.max_new_tokens = {p + t} exceeds "
            f"model.max_len={cfg.max_len}"
        )


def _ppo_models(config, rm_size: str):
    """(held configs, whether the reward model is the value model's base) as `ppo.build_models`
    holds them: the reward model from a `ppo.reward_from` workdir here, else the `rm_size`
    preset (default: the policy's base); the value model the reward model's (`ppo.value_init=rm`)
    or the policy's (`sft`), with the policy's adapters under LoRA; the frozen ones in
    `ppo.frozen_dtype`, a reward model that shares the LoRA value model's base in its dtype."""
    policy = model_config_of(config)
    reward = reward_config(lora.base_config(policy), config.ppo.reward_from, rm_size)
    if config.ppo.value_init == "rm":
        value = dataclasses.replace(reward, **setup.lora_fields(config))
    else:
        value = dataclasses.replace(policy, head="scalar")
    cfgs = {"policy": policy, "ref": lora.base_config(policy), "value": value, "reward": reward}
    if config.ppo.reward_fn:
        del cfgs["reward"]
    held = setup.frozen_configs(cfgs, config.ppo.frozen_dtype)
    shared = ppo.shares_reward_base(config, cfgs)
    if shared:
        dtype = state_lib.base_dtype(cfgs["value"]).name
        held["reward"] = dataclasses.replace(held["reward"], param_dtype=dtype)
    return held, shared


def _ppo_frozen(config, cfgs, shared: bool, mesh, rules) -> dict:
    """The frozen params `ppo.build_models` restores, abstract: the reference unless a LoRA
    policy is its own (adapters off), and the reward model, or only its scalar head when it
    shares the value model's base."""
    out = {}
    ref = reference_params(config, "ppo", cfgs["policy"], mesh, rules, cfgs["ref"])
    if ref is not None:
        out["ref"] = ref
    if "reward" in cfgs:
        rm = state_lib.abstract_params(cfgs["reward"], mesh, rules)
        out.update({"reward_head": lora.split_lora(rm)[0]} if shared else {"reward": rm})
    return out


def plan_ppo(config, mesh, rules, rm_size: str = "") -> list[Function]:
    """PPO-ptx: `rollout`, `score` and `update` of one iteration, from `ppo.Iteration`."""
    c = config.ppo
    for key in ("rollout_batch", "minibatch") + (("ptx_batch",) if c.ptx_coef > 0 else ()):
        sharding.check_batch(c[key], f"ppo.{key}", mesh, rules)
    ppo_cfg = ppo_steps.ppo_config_from(config, eos_id=-1)  # -1 never matches: full length
    cfgs, shared = _ppo_models(config, rm_size)
    graphdefs = {k: model_lib.abstract(v)[0] for k, v in cfgs.items()}
    tx = ppo_steps.make_tx(ppo_cfg, config.train.steps)
    shardings, params, opt = ppo.train_state_shardings(cfgs, tx, mesh, rules)
    state = {"step": scalar(mesh, jnp.int32), "params": params, "opt_state": opt}
    models = _ppo_frozen(config, cfgs, shared, mesh, rules)

    class _Tok:  # the sampler needs only these ids
        eos_id, eos_ids, pad_id = -1, (-1,), 0

    it = ppo.Iteration(config, _Tok, cfgs, graphdefs, tx, shardings, mesh, rules, ppo_cfg)
    b, p, t, mb = c.rollout_batch, c.prompt_len, c.max_new_tokens, c.minibatch
    s = p + t
    pol = cfgs["policy"]
    # FLOPs by model: the reference and a shared-base reward model count the params they run.
    every = {"ref": params["policy"], "reward": params["value"], **params, **models}
    fwd = lambda k, tokens, ctx, head=None: plan.forward_flops(cfgs[k], every[k], tokens, ctx, head)
    note = (
        f"policy {describe(pol, params['policy'])}; value/reward "
        f"{model_lib.param_count(params['value']) / 1e6:,.1f}M"
    )
    resident = {"value": params["value"], "opt_state": opt, **models}
    knobs = (c.temperature, c.top_k, c.top_p)
    sample = aot_rollout.function(
        it.sample, config.get("rollout"), pol, params["policy"], mesh, rules, (b, p, t), knobs,
        resident,
    )  # fmt: skip
    sample.note = f"{note}; " + (sample.note if sample.extra else f"{t} new tokens per row")

    # 2 score: policy and reference (head on the T response positions), value and reward.
    frozen = {
        **models,
        "kl_coef": scalar(mesh, jnp.float32),
        "reward_bias": scalar(mesh, jnp.float32),
        "ext_scores": rows(mesh, rules, (b,), jnp.float32),
    }
    rollout = _rollout_batch(mesh, rules, b, p, t)
    score_flops = 2 * fwd("policy", b * s, s, b * t) + fwd("value", b * s, s)
    if "reward" in cfgs:
        score_flops += fwd("reward", b * s, s)
    score = Function(
        "score",
        it.score,
        (params, frozen, rollout),
        {"params": params, "frozen": models, "batch": rollout},
        score_flops,
        b * s,
        b,
        resident=opt,
        calls=1,
    )

    # 3 update: epochs x minibatches of policy + value (+ the ptx batch) forward and backward.
    out = jax.eval_shape(it.score, params, frozen, rollout)[0]
    batch = jax.tree.map(lambda x: rows(mesh, rules, x.shape, x.dtype), out)
    n_up = ppo_cfg.epochs * ppo_cfg.updates_per_epoch
    per_mb = fwd("policy", mb * s, s, mb * t) + fwd("value", mb * s, s)
    ptx, ptx_tokens = _ptx_batch(c, mesh, rules, n_up), 0
    if ptx is not None:
        per_mb += fwd("policy", c.ptx_batch * c.ptx_seq_len, c.ptx_seq_len)
        ptx_tokens = n_up * c.ptx_batch * c.ptx_seq_len
    update = Function(
        "update",
        it.update,
        (state, batch, ptx, scalar(mesh, key_dtype())),
        {"params": params, "opt_state": opt, "batch": (batch, ptx)},
        3 * n_up * per_mb,
        ppo_cfg.epochs * b * s + ptx_tokens,
        b,
        resident=models,
        hw_factor=plan.remat_factor(pol),
        calls=1,
        note=f"{ppo_cfg.epochs} epochs x {ppo_cfg.updates_per_epoch} minibatches of {mb}",
    )
    return [sample, score, update]


def _rollout_batch(mesh, rules, b: int, p: int, t: int) -> dict:
    """A sampled rollout as score steps take it (ppo_steps.py's layout)."""
    return {
        "tokens": rows(mesh, rules, (b, p + t), jnp.int32),
        "prompt_mask": rows(mesh, rules, (b, p), jnp.bool_),
        "response_mask": rows(mesh, rules, (b, t), jnp.bool_),
    }


def _ptx_batch(c, mesh, rules, n_up: int):
    """The iteration's stacked pretraining batches [b_ptx, n_up, L] as PPO's and GRPO's update
    steps take them, or None when `ptx_coef` is 0."""
    if c.ptx_coef == 0:
        return None
    shape = (c.ptx_batch, n_up, c.ptx_seq_len)
    ptx = {
        "inputs": rows(mesh, rules, shape, jnp.int32),
        "targets": rows(mesh, rules, shape, jnp.int32),
        "mask": rows(mesh, rules, shape, jnp.float32),
    }
    return ptx


def plan_grpo(config, mesh, rules, rm_size: str = "") -> list[Function]:
    """GRPO-ptx / RLOO: `rollout` of `grpo.prompts` x G rows, `score` (policy and reference
    log-probs, the RM unless `grpo.reward_fn`, group advantages) and `update`, jitted as
    stages/grpo.py jits grpo_steps.py's steps."""
    c = config.grpo
    g = grpo_steps.grpo_config_from(config)
    b, p, t, mb = c.prompts * c.group_size, c.prompt_len, c.max_new_tokens, c.minibatch
    s = p + t
    checks = [("grpo.minibatch", mb), ("grpo.prompts x group_size", b)]
    checks += [("grpo.ptx_batch", c.ptx_batch)] if c.ptx_coef > 0 else []
    for key, n in checks:
        sharding.check_batch(n, key, mesh, rules)
    policy = model_config_of(config)
    _check_len(policy, p, t, "grpo")
    graphdef, tx, state, shardings = train_state(policy, config, mesh, rules)
    params, opt = state["params"], state["opt_state"]
    cfgs, graphdefs = {"policy": policy, "ref": policy}, {"policy": graphdef}
    ref = reference_params(config, "grpo", policy, mesh, rules)
    models = {} if ref is None else {"ref": ref}  # none: a LoRA policy's own base
    if not c.reward_fn:  # the stage loads `grpo.reward_from` then
        cfgs["reward"] = reward_config(lora.base_config(policy), c.reward_from, rm_size)
        graphdefs["reward"] = model_lib.abstract(cfgs["reward"])[0]
        models["reward"] = state_lib.abstract_params(cfgs["reward"], mesh, rules)
    every = {"policy": params, "ref": params, **models}
    fwd = lambda k, tokens, ctx, head=None: plan.forward_flops(cfgs[k], every[k], tokens, ctx, head)
    kw = dict(g=g, p=p, mesh=mesh, rules=rules)

    knobs, resident = (c.temperature, 0, 1.0), {"opt_state": opt, **models}
    sample = aot_rollout.make(graphdef, config.get("rollout"), mesh, rules, t)
    roll = aot_rollout.function(
        sample, config.get("rollout"), policy, params, mesh, rules, (b, p, t), knobs, resident
    )
    roll.note = f"policy {describe(policy, params)}; G={c.group_size}; {roll.note}"

    score_fn = jax.jit(functools.partial(grpo_steps.score_step, graphdefs=graphdefs, **kw))
    frozen = {**models, "reward_bias": scalar(mesh, jnp.float32)}
    rollout = _rollout_batch(mesh, rules, b, p, t)
    ext = rows(mesh, rules, (b,), jnp.float32)
    score_flops = fwd("policy", b * s, s, b * t) + fwd("ref", b * s, s, b * t)
    if "reward" in models:
        score_flops += fwd("reward", b * s, s)
    score = Function(
        "score",
        score_fn,
        (params, frozen, rollout, ext),
        {"params": params, "frozen": models, "batch": (rollout, ext)},
        score_flops,
        b * s,
        b,
        resident=opt,
        calls=1,
    )

    update_fn = jax.jit(
        functools.partial(grpo_steps.update_step, graphdef=graphdef, tx=tx, **kw),
        in_shardings=(shardings, None, None, None),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    out = jax.eval_shape(score_fn, params, frozen, rollout, ext)[0]
    batch = jax.tree.map(lambda x: rows(mesh, rules, x.shape, x.dtype), out)
    n_up = c.epochs * (b // mb)
    per_mb = fwd("policy", mb * s, s, mb * t)
    ptx, ptx_tokens = _ptx_batch(c, mesh, rules, n_up), 0
    if ptx is not None:
        per_mb += fwd("policy", c.ptx_batch * c.ptx_seq_len, c.ptx_seq_len)
        ptx_tokens = n_up * c.ptx_batch * c.ptx_seq_len
    update = Function(
        "update",
        update_fn,
        (state, batch, ptx, scalar(mesh, key_dtype())),
        {"params": params, "opt_state": opt, "batch": (batch, ptx)},
        3 * n_up * per_mb,
        c.epochs * b * s + ptx_tokens,
        b,
        resident=models,
        hw_factor=plan.remat_factor(policy),
        calls=1,
        note=f"{c.epochs} epochs x {b // mb} minibatches of {mb}",
    )
    return [roll, score, update]
