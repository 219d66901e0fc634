"""Every compiled function of a stage, with abstract inputs, for the ahead-of-time planner.

`functions(config, mesh)` returns the jitted functions `config.stage` runs, built exactly as its
run loop builds them (`lm.compile_steps`, `rm.compile_steps`, `ppo.Iteration`: same jit,
shardings and donation), with ShapeDtypeStruct arguments that carry their NamedShardings, the
arguments by role (params, optimizer state, frozen models, batch), what stays resident in HBM
during the call without being an argument, and the model FLOPs of one call with every loop trip
counted. `launch/aot.py` compiles them for a TPU topology; `infra/plan.py` reads the results.
Nothing is allocated and no data, tokenizer or checkpoint is read (an `init_from` workdir that
exists here lends its model config, as the stage would use it).

Shapes are each function's largest: PPO responses run to `ppo.max_new_tokens` (EOS never stops
a row), the RM's K is `rm.k_max` (a run sizes K from its data, at most that).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from rlhf_jax.infra import plan, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import hf_init
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.sampling import sampler
from rlhf_jax.stages import lm, ppo, ppo_steps, rm, setup

STAGES = ("pretrain", "sft", "rm", "ppo")
# The KV cache's logical layout, as sampling/sampler.py constrains it: [L, B, S, K, H].
_CACHE_AXES = (None, "act_batch", None, "act_heads", None)


@dataclasses.dataclass
class Function:
    """One compiled function of a stage, ready to lower. FLOPs are all chips' for one call."""

    name: str
    jitted: object
    args: tuple
    parts: dict  # role -> the arguments in it: "params", "opt_state", "frozen", "batch"
    flops: float  # model FLOPs, loop trips counted
    tokens: int
    samples: int
    resident: object = None  # in HBM during the call, not an argument
    hw_factor: float = 1.0  # hardware over model FLOPs (remat recomputes the forward)
    flops_seen: float | None = None  # per-chip FLOPs XLA's cost analysis counts, when not all
    loop_bytes: float = 0.0  # per-chip bytes of loop trips XLA's cost analysis leaves out
    static: tuple = ()  # trailing static arguments of `jitted`
    note: str = ""

    def lower(self):
        return self.jitted.lower(*self.args, *self.static)


def _rows(mesh, rules, shape, dtype) -> jax.ShapeDtypeStruct:
    """An abstract batch array, rows over the batch axes as `sharding.put_batch` places them."""
    sh = sharding.batch_sharding(mesh, rules, len(shape)) if shape else sharding.replicated(mesh)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def _key_dtype():
    return jax.eval_shape(lambda: jax.random.key(0)).dtype


def _stored_model(path: str, current: model_config.ModelConfig):
    """The architecture an `init_from` source fixes (setup.resolve_model's rule), or None when
    the source is not on this machine (planning somewhere else than the run)."""
    if not path or not os.path.isdir(hf_init.hf_dir(path)):
        return None
    stored = ((setup.read_init_meta(path) or {}).get("model")) or None
    if stored is None:
        return None
    numerics = {k: getattr(current, k) for k in setup.NUMERICS + ("scan_layers",)}
    return model_config.ModelConfig(**{**stored, **numerics})


def model_config_of(config) -> model_config.ModelConfig:
    """The stage's ModelConfig without a tokenizer: `model.vocab_size`, else the vocabulary a
    pretraining run would train (`tokenizer.vocab_size`), else the preset's; an `init_from`
    workdir present here overrides the architecture."""
    trains_tokenizer = config.stage == "pretrain" and not config.tokenizer.path
    current = setup.model_config_from(
        config, config.tokenizer.vocab_size if trains_tokenizer else None
    )
    return _stored_model(config.init_from, current) or current


def functions(config, mesh, rm_size: str = "") -> list[Function]:
    """The stage's compiled functions (module docstring). `rm_size` names the preset of PPO's
    value and reward models when no `ppo.reward_from` workdir is here (default: the policy's)."""
    rules = sharding.normalize_rules(config.sharding.rules)
    if config.stage in ("pretrain", "sft"):
        return _lm(config, mesh, rules)
    if config.stage == "rm":
        return _rm(config, mesh, rules)
    if config.stage == "ppo":
        return _ppo(config, mesh, rules, rm_size)
    raise ValueError(
        f"the planner does not plan config.stage={config.stage!r}; expected one of {STAGES} "
        "(plan a pipeline's stages one experiment file at a time)"
    )


def _train_state(cfg, config, mesh, rules):
    tx = state_lib.make_optimizer(setup.optim_config_from(config.train, max(config.train.steps, 1)))
    graphdef, state, shardings = state_lib.abstract_train_state(cfg, tx, mesh, rules)
    return graphdef, tx, state, shardings


def _lm(config, mesh, rules) -> list[Function]:
    t = config.train
    setup.check_batch(config, mesh, rules)
    cfg = model_config_of(config)
    if cfg.family == "gpt2" and t.seq_len > cfg.max_len:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_len={cfg.max_len}")
    graphdef, tx, state, shardings = _train_state(cfg, config, mesh, rules)
    train, evaluate = lm.compile_steps(graphdef, tx, shardings, mesh, rules, t.grad_accum)
    b, n = t.batch_size, t.seq_len
    batch = {
        "inputs": _rows(mesh, rules, (b, n), jnp.int32),
        "targets": _rows(mesh, rules, (b, n), jnp.int32),
        "mask": _rows(mesh, rules, (b, n), jnp.float32),
    }
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
            note=f"{_describe(cfg, params)}; grad_accum={t.grad_accum}",
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


def _rm(config, mesh, rules) -> list[Function]:
    t = config.train
    setup.check_batch(config, mesh, rules)
    cfg = dataclasses.replace(model_config_of(config), head="scalar")
    graphdef, tx, state, shardings = _train_state(cfg, config, mesh, rules)
    train, evaluate = rm.compile_steps(graphdef, tx, shardings, config, mesh, rules)
    k = 2 if config.rm.batching == "per_pair" else config.rm.k_max
    b, n = t.batch_size, t.seq_len
    batch = {
        "tokens": _rows(mesh, rules, (b, k, n), jnp.int32),
        "mask": _rows(mesh, rules, (b, k, n), jnp.bool_),
        "ranks": _rows(mesh, rules, (b, k), jnp.int32),
        "kmask": _rows(mesh, rules, (b, k), jnp.float32),
    }
    fwd = plan.forward_flops(cfg, state["params"], b * k * n, n)
    params, opt = state["params"], state["opt_state"]
    note = f"{_describe(cfg, params)}; K={k}"
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


def _describe(cfg, params) -> str:
    n = model_lib.param_count(params)
    return (
        f"{cfg.family} {n / 1e6:,.1f}M params (vocab {cfg.vocab_size}), {cfg.dtype}, "
        f"remat={cfg.remat}, scan_layers={cfg.scan_layers}"
    )


def _ppo_models(config, rm_size: str):
    """The four models as `ppo.build_models` holds them: the reward model from a
    `ppo.reward_from` workdir here, else the `rm_size` preset (default: the policy's); the value
    model the reward model's (`ppo.value_init=rm`) or the policy's (`sft`); the frozen ones in
    `ppo.frozen_dtype`."""
    policy = model_config_of(config)
    reward = None
    reward_from = config.ppo.reward_from
    if reward_from and os.path.isdir(reward_from):
        stored = _stored_model(reward_from, policy)
        reward = stored and dataclasses.replace(stored, dtype=policy.dtype)
    if reward is None:
        base = policy
        if rm_size:
            kw = {k: getattr(policy, k) for k in ("family", "vocab_size", "max_len")}
            kw.update({k: getattr(policy, k) for k in setup.NUMERICS + ("scan_layers",)})
            kw["param_dtype"] = policy.param_dtype
            base = model_config.preset(rm_size, **kw)
        reward = dataclasses.replace(base, head="scalar")
    value = reward if config.ppo.value_init == "rm" else dataclasses.replace(policy, head="scalar")
    cfgs = {"policy": policy, "ref": policy, "value": value, "reward": reward}
    if config.ppo.reward_fn:
        del cfgs["reward"]
    return setup.frozen_configs(cfgs, config.ppo.frozen_dtype)


def _ppo(config, mesh, rules, rm_size: str) -> list[Function]:
    c = config.ppo
    for key in ("rollout_batch", "minibatch") + (("ptx_batch",) if c.ptx_coef > 0 else ()):
        sharding.check_batch(c[key], f"ppo.{key}", mesh, rules)
    ppo_cfg = ppo.ppo_config_from(config, eos_id=-1)  # -1 never matches: full-length responses
    cfgs = _ppo_models(config, rm_size)
    graphdefs = {k: model_lib.abstract(v)[0] for k, v in cfgs.items()}
    tx = ppo_steps.make_tx(ppo_cfg, config.train.steps)
    shardings, params, opt = ppo.train_state_shardings(cfgs, tx, mesh, rules)
    rep = sharding.replicated(mesh)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), "params": params}
    state["opt_state"] = opt
    models = {k: state_lib.abstract_params(cfgs[k], mesh, rules) for k in cfgs if k not in params}

    class _Tok:  # the sampler needs only these ids
        eos_id, eos_ids, pad_id = -1, (-1,), 0

    it = ppo.Iteration(config, _Tok, cfgs, graphdefs, tx, shardings, mesh, rules, ppo_cfg)
    b, p, t, mb = c.rollout_batch, c.prompt_len, c.max_new_tokens, c.minibatch
    s, n = p + t, mesh.devices.size
    rows = lambda shape, dtype: _rows(mesh, rules, shape, dtype)
    pol = cfgs["policy"]
    every = {**params, **models}
    fwd = lambda k, tokens, ctx, head=None: plan.forward_flops(cfgs[k], every[k], tokens, ctx, head)
    note = (
        f"policy {_describe(pol, params['policy'])}; value/reward "
        f"{model_lib.param_count(params['value']) / 1e6:,.1f}M"
    )

    # 1 rollout: prefill P tokens, then T - 1 decode steps of one token per row, all attending
    # to the S = P + T cache slots. XLA counts the prefill and one trip of the decode loop; every
    # trip reads the policy's weights (gathered from their FSDP shards, in the compute dtype) and
    # this chip's rows of the KV cache from HBM.
    prompts = (rows((b, p), jnp.int32), rows((b, p), jnp.bool_), rows((b,), _key_dtype()))
    knobs = {
        "temperature": jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
        "top_k": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        "top_p": jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
    }
    prefill, step = fwd("policy", b * p, s, b), fwd("policy", b, s)
    kv_shape = (pol.n_layers, b, s, pol.n_kv_heads, pol.head_dim)
    kv_spec = sharding.logical_to_spec(_CACHE_AXES, rules, mesh, kv_shape)
    kv = jax.ShapeDtypeStruct(
        kv_shape, jnp.dtype(pol.dtype), sharding=jax.sharding.NamedSharding(mesh, kv_spec)
    )
    step_bytes = plan.gathered_bytes(params["policy"], pol.dtype) + 2 * plan.chip_bytes(kv)
    mode = sampler.sampling_mode(c.temperature, c.top_k, c.top_p, False)
    sample = Function(
        "rollout",
        it.sample.jitted,
        (params["policy"], *prompts, knobs),
        {"params": params["policy"], "batch": prompts},
        prefill + (t - 1) * step,
        b * t,
        b,
        resident={"value": params["value"], "opt_state": opt, **models},
        flops_seen=(prefill + step) / n,
        loop_bytes=max(t - 2, 0) * step_bytes,
        static=(mode,),
        note=f"{note}; {t} new tokens per row",
    )

    # 2 score: policy and reference (head on the T response positions), value and reward.
    frozen = {
        **models,
        "kl_coef": jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
        "reward_bias": jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
        "ext_scores": rows((b,), jnp.float32),
    }
    rollout = {
        "tokens": rows((b, s), jnp.int32),
        "prompt_mask": rows((b, p), jnp.bool_),
        "response_mask": rows((b, t), jnp.bool_),
    }
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
    )

    # 3 update: epochs x minibatches of policy + value (+ the ptx batch) forward and backward.
    out = jax.eval_shape(it.score, params, frozen, rollout)[0]
    batch = jax.tree.map(lambda x: rows(x.shape, x.dtype), out)
    n_up = ppo_cfg.epochs * ppo_cfg.updates_per_epoch
    per_mb = fwd("policy", mb * s, s, mb * t) + fwd("value", mb * s, s)
    ptx, ptx_tokens = None, 0
    if c.ptx_coef != 0:
        pb, pl = c.ptx_batch, c.ptx_seq_len
        ptx = {
            "inputs": rows((pb, n_up, pl), jnp.int32),
            "targets": rows((pb, n_up, pl), jnp.int32),
            "mask": rows((pb, n_up, pl), jnp.float32),
        }
        per_mb += fwd("policy", pb * pl, pl)
        ptx_tokens = n_up * pb * pl
    rng = jax.ShapeDtypeStruct((), _key_dtype(), sharding=rep)
    update = Function(
        "update",
        it.update,
        (state, batch, ptx, rng),
        {"params": params, "opt_state": opt, "batch": (batch, ptx)},
        3 * n_up * per_mb,
        ppo_cfg.epochs * b * s + ptx_tokens,
        b,
        resident=models,
        hw_factor=plan.remat_factor(pol),
        note=f"{ppo_cfg.epochs} epochs x {ppo_cfg.updates_per_epoch} minibatches of {mb}",
    )
    return [sample, score, update]
