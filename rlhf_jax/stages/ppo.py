"""PPO-ptx stage (InstructGPT step 3): rollout -> score -> update, as the step of the shared loop.

Models: policy and reference from the SFT workdir (`init_from`; the reference from
`ppo.reference_from` when set, e.g. a later round starting from a PPO policy), value from the RM
workdir (`ppo.value_init="rm"`, as InstructGPT) or the SFT backbone with a fresh head
(`"sft"`), reward from the RM workdir (`ppo.reward_from`) with its normalisation bias, or a
Python function `ppo.reward_fn="module:function"` taking (prompts, responses) lists and
returning scores.

One iteration (one step of stages/loop.py): `ppo.rollout_batch` prompts -> generate (compiled
on-device loop) -> score_step (jit) -> update_step (jit; epochs x minibatches, one loss). The
policy learns at `train.lr` (schedule keys `train.*`, counted in optimizer updates), the value
model at `ppo.value_lr`. The KL coefficient is fixed, or adapted toward `ppo.kl_target` after
every iteration (Ziegler et al. 2019; `KLController`, the loop's host-side hooks).

Checkpoints, resume, the NaN stop, preemption, metrics and evals are the loop's. A checkpoint
holds the policy as "params" (so a PPO workdir serves `generate`, `init_from` and evaluation like
any LM stage's), "value", "opt_state" (both), the KL coefficient in its meta and both data
iterators' positions; all RNG derives from seed and iteration, so a killed run resumes to the
same params as the uninterrupted one. The pure steps are ppo_steps.py's; what PPO shares with
GRPO (prompts, ptx text, rewards, eval batches, rollout keys) is rl_data.py's.

With LoRA (`lora.rank` > 0) policy and value each train adapters (the value its head too) over
a frozen base: the policy's from `init_from`, the value model's from the RM (or the SFT
backbone); checkpoints hold only what trains, and resuming rebuilds the bases from their
sources. Without `ppo.reference_from` the reference is the policy's own base with the adapters
off, not a second copy; with the value from the RM, the reward model is the value model's base
with the RM's head (`build_models`), not a second copy either: two frozen bases in all.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp

from rlhf_jax.infra import compiled, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import lora
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.rl import ppo_math
from rlhf_jax.sampling import rollout as rollout_lib
from rlhf_jax.stages import loop, ppo_steps, rl_data, setup
from rlhf_jax.stages import rm as rm_stage


def build_models(config, tok, mesh, rules):
    """(held configs, graphdefs, frozen params {"ref", ["reward" | "reward_head"]}, reward bias).

    The RM is restored only when it scores (no `ppo.reward_fn`); with `ppo.value_init="rm"` its
    config is the value model's either way. With LoRA and `value_init="rm"` the value model's
    frozen base is the RM's, so the reward model is that base plus the RM's own scalar head:
    only the head is held here ("reward_head"; `ppo_steps.reward_params` joins them), and the
    reward model is held in the value base's dtype (`lora.base_dtype`), not
    `ppo.frozen_dtype`. Trained params: `trained_params`."""
    c = config.ppo
    policy_cfg, _ = setup.resolve_model(config, tok)
    cfgs = {"policy": policy_cfg, "ref": lora.base_config(policy_cfg)}
    reward_cfg, reward_meta = rl_data.reward_model_config(config, "ppo", policy_cfg)
    if reward_cfg is not None:
        cfgs["reward"] = reward_cfg
    if c.value_init == "rm":
        if reward_cfg is None:
            raise ValueError("ppo.value_init='rm' needs ppo.reward_from (an RM workdir)")
        cfgs["value"] = dataclasses.replace(reward_cfg, **setup.lora_fields(config))
    elif c.value_init == "sft":
        cfgs["value"] = dataclasses.replace(policy_cfg, head="scalar")
    else:
        raise ValueError(f"unknown ppo.value_init: {c.value_init!r}; expected 'rm' or 'sft'")
    held = setup.frozen_configs(cfgs, c.frozen_dtype)
    shared = shares_reward_base(config, cfgs)
    if shared:
        dtype = state_lib.base_dtype(cfgs["value"]).name
        held["reward"] = dataclasses.replace(held["reward"], param_dtype=dtype)
    graphdefs = {k: model_lib.abstract(v)[0] for k, v in held.items()}
    # The KL reference is the SFT policy even when the policy starts elsewhere (a later round
    # of iterated RLHF continues from the previous round's policy).
    # (A LoRA policy without ppo.reference_from is its own reference: no "ref" is held.)
    ref = rl_data.reference(config, "ppo", policy_cfg, mesh, rules, held["ref"])
    frozen = {} if ref is None else {"ref": ref}
    if reward_cfg is not None and not c.reward_fn:
        rm = rl_data.restore(c.reward_from, reward_cfg, mesh, rules, held["reward"])
        if shared:  # the rest of the RM, dropped here, is the value model's base
            frozen["reward_head"] = lora.split_lora(rm)[0]
        else:
            frozen["reward"] = rm
    bias = float((reward_meta or {}).get("reward_bias", 0.0))
    return held, graphdefs, frozen, bias


def shares_reward_base(config, cfgs) -> bool:
    """Whether the reward model is the value model's frozen base plus the RM's head: LoRA, the
    value from the RM (`ppo.value_init="rm"`) and the RM scoring (no `ppo.reward_fn`)."""
    c = config.ppo
    return bool(cfgs["value"].lora_rank) and c.value_init == "rm" and not c.reward_fn


def trained_params(config, cfgs, mesh, rules):
    """{"policy", "value"} of a fresh run: the policy from `init_from`, the value model from
    the RM (`ppo.value_init="rm"`) or the SFT backbone with a fresh scalar head; with LoRA
    those are the bases, each given fresh adapters (the value's seeded apart from the
    policy's)."""
    base = {k: lora.base_config(cfgs[k]) for k in ("policy", "value")}
    params = {"policy": rl_data.restore(config.init_from, base["policy"], mesh, rules)}
    if config.ppo.value_init == "rm":
        params["value"] = rl_data.restore(config.ppo.reward_from, base["value"], mesh, rules)
    else:
        meta = {"model": dataclasses.asdict(base["policy"])}
        params["value"] = rm_stage.backbone_params(config, base["value"], mesh, rules, meta)
    for i, k in enumerate(("policy", "value")):
        if cfgs[k].lora_rank:
            _, _, shardings = state_lib.param_shardings(cfgs[k], mesh, rules)
            params[k] = state_lib.lora_params(cfgs[k], config.seed + i, shardings, params[k])
    return params


def value_base(config) -> str:
    """Where the value model's params start: the RM workdir, or the SFT one's backbone."""
    return config.ppo.reward_from if config.ppo.value_init == "rm" else config.init_from


def train_state_shardings(cfgs, tx, mesh, rules):
    """(state shardings, abstract params, abstract optimizer state with shardings)."""
    keys = ("policy", "value")
    p_shard = {k: state_lib.param_shardings(cfgs[k], mesh, rules)[2] for k in keys}
    abstract = {k: state_lib.abstract_params(cfgs[k], mesh, rules) for k in keys}
    # Optimizer state for the trainable params only (all of them without LoRA).
    train = lambda tree: lora.split_trainable(tree)[0]  # noqa: E731
    opt = {
        k: state_lib.opt_shardings(tx[k], train(abstract[k]), train(p_shard[k]), mesh) for k in keys
    }
    o_shard = {k: opt[k][1] for k in keys}
    abstract_opt = {k: state_lib.with_sharding(opt[k][0], o_shard[k]) for k in keys}
    shardings = {"step": sharding.replicated(mesh), "params": p_shard, "opt_state": o_shard}
    return shardings, abstract, abstract_opt


def _items(state) -> dict:
    """PPO's checkpoint items: the policy as "params" (what every LM-stage reader loads); with
    LoRA each model's trainable part only."""
    p = {k: lora.split_trainable(v)[0] for k, v in state["params"].items()}
    return {"params": p["policy"], "value": p["value"], "opt_state": state["opt_state"]}


def _from_items(items) -> dict:
    return {
        "params": {"policy": items["params"], "value": items["value"]},
        "opt_state": items["opt_state"],
    }


def from_items(config, cfgs, mesh, rules):
    """The inverse of `_items`; with LoRA the frozen bases are rebuilt from their sources as a
    fresh run builds them (`trained_params`), so the resume is bitwise."""
    if not cfgs["policy"].lora_rank:
        return _from_items

    def restore(items) -> dict:
        state = _from_items(items)
        fresh = trained_params(config, cfgs, mesh, rules)
        state["params"] = {
            k: lora.combine(v, lora.split_trainable(fresh[k])[1])
            for k, v in state["params"].items()
        }
        return state

    return restore


class Iteration:
    """Compiled pieces of one PPO iteration, bound to models, shapes and the mesh."""

    def __init__(self, config, tok, cfgs, graphdefs, tx, shardings, mesh, rules, ppo_cfg):
        c = config.ppo
        self.mesh, self.rules, self.c, self.tok = mesh, rules, c, tok
        p = c.prompt_len
        if cfgs["policy"].family == "gpt2" and p + c.max_new_tokens > cfgs["policy"].max_len:
            raise ValueError(
                f"ppo.prompt_len + ppo.max_new_tokens = {p + c.max_new_tokens} "
                f"exceeds model.max_len={cfgs['policy'].max_len}"
            )
        self.sample = rollout_lib.make(
            graphdefs["policy"],
            config.get("rollout"),
            max_new_tokens=c.max_new_tokens,
            eos_id=tok.eos_ids,
            pad_id=tok.pad_id,
            mesh=mesh,
            rules=rules,
        )
        kw = dict(graphdefs=graphdefs, cfg=ppo_cfg, p=p, mesh=mesh, rules=rules)
        self.score = compiled.jit(ppo_steps.score_step, **kw)
        self.update = compiled.jit(
            ppo_steps.update_step,
            in_shardings=(shardings, None, None, None),
            out_shardings=(shardings, sharding.replicated(mesh)),
            donate_argnums=0,
            tx=tx, **kw,
        )  # fmt: skip

    def rollout(self, params, batch, iteration, seed: int, stream: int = 0):
        """Samples responses for a device batch {"tokens", "mask" [B, P], "sample" [B]}."""
        keys = rl_data.rollout_keys(seed, stream, iteration, batch["sample"])
        c = self.c
        out = self.sample(
            params["policy"],
            batch["tokens"],
            batch["mask"],
            keys,
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p,
        )
        return {
            "tokens": out["tokens"],
            "prompt_mask": batch["mask"],
            "response_mask": out["response_mask"],
        }


class KLController:
    """The KL coefficient beta, host-side: fixed at `ppo.beta`, or adapted toward
    `ppo.kl_target` from each iteration's observed KL. The loop saves it in every checkpoint's
    meta ("kl_coef") and restores it on resume."""

    def __init__(self, c):
        self.c, self.coef = c, float(c.beta)

    def update(self, observed_kl: float) -> None:
        c = self.c
        if c.adaptive_kl:
            self.coef = float(
                ppo_math.adaptive_kl_update(
                    self.coef, observed_kl, c.rollout_batch, c.kl_target, c.kl_horizon
                )
            )

    def get_state(self) -> dict:
        return {"kl_coef": self.coef}

    def set_state(self, meta) -> None:
        self.coef = float(meta["kl_coef"])


def run(config, mesh, workdir: str):
    """PPO-ptx training; resumes from `<workdir>/checkpoints` when it holds a checkpoint."""
    rules = sharding.normalize_rules(config.sharding.rules)
    c, t = config.ppo, config.train
    if not config.init_from:
        raise ValueError("stage 'ppo' needs config.init_from (the SFT workdir)")
    if not (c.reward_from or c.reward_fn):
        raise ValueError("set ppo.reward_from (an RM workdir) or ppo.reward_fn (module:function)")
    for key in ("rollout_batch", "minibatch") + (("ptx_batch",) if c.ptx_coef > 0 else ()):
        sharding.check_batch(c[key], f"ppo.{key}", mesh, rules)
    rl_data.check_rl_train_keys(config, "ppo", "minibatch")
    tok = setup.load_tokenizer(config, workdir)
    ppo_cfg = ppo_steps.ppo_config_from(config, tok.eos_ids)
    cfgs, graphdefs, frozen, bias = build_models(config, tok, mesh, rules)
    reward_fn = rl_data.load_reward_fn(config, "ppo")
    tx = ppo_steps.make_tx(ppo_cfg, t.steps)
    shardings, abstract_params, abstract_opt = train_state_shardings(cfgs, tx, mesh, rules)
    ex, eval_prompts, info = rl_data.read_prompts(config, tok, "ppo", "rollout_batch")
    n_updates = ppo_cfg.epochs * ppo_cfg.updates_per_epoch
    data = rl_data.RolloutData(
        rl_data.prompt_iterator(ex, c.rollout_batch, config.seed),
        group_size=1,
        ptx=rl_data.ptx_data(config, tok, workdir, "ppo"),
        n_ptx=n_updates,
    )
    it = Iteration(config, tok, cfgs, graphdefs, tx, shardings, mesh, rules, ppo_cfg)
    kl = KLController(c)
    p = c.prompt_len

    def score(params, roll, coef):
        ext = (
            rl_data.external_scores(reward_fn, tok, roll, p, mesh, rules, "ppo")
            if reward_fn is not None
            else jnp.zeros((roll["tokens"].shape[0],), jnp.float32)
        )
        fz = {
            **frozen,
            "kl_coef": jnp.float32(coef),
            "reward_bias": jnp.float32(bias),
            "ext_scores": ext,
        }
        return it.score(params, fz, roll)

    last = {}  # the latest rollout and its scores, for the sample table at log steps

    def iteration(state, batch):
        # The phases are timed apart (each blocks), as the host-side time split of the metrics.
        t0 = time.time()
        roll = it.rollout(state["params"], batch, state["step"], config.seed)
        jax.block_until_ready(roll)
        t1 = time.time()
        scored, sm = score(state["params"], roll, kl.coef)
        jax.block_until_ready(scored)
        t2 = time.time()
        ptx = {k[4:]: v for k, v in batch.items() if k.startswith("ptx_")} or None
        upd_key = jax.random.fold_in(jax.random.key(config.seed + 1), state["step"])
        state, um = it.update(state, scored, ptx, upd_key)
        jax.block_until_ready(um)
        t3 = time.time()
        last.update(roll=roll, scores=scored["scores"])
        times = {"time/rollout": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2}
        times |= {"time/iteration": t3 - t0, "ppo/samples_per_sec": c.rollout_batch / (t3 - t0)}
        return state, {**sm, **um, **times}

    def after_step(n, m, is_log, writer):
        if c.adaptive_kl:  # the next iteration's beta, from this one's KL
            kl.update(float(sharding.to_host(m["ppo/kl_per_seq"])))
        if is_log:
            writer.write_text(n, "ppo/samples", sample_table(tok, last["roll"], last["scores"], c))

    evals = rl_data.eval_batches(
        eval_prompts[: c.eval_prompts], tok, config, "ppo", c.rollout_batch
    )

    def evaluate(params, n):
        rows = []
        for b in evals:
            b = sharding.put_batch(b, mesh, rules)
            roll = it.rollout(params, b, n, config.seed, stream=1)
            out, _ = score(params, roll, kl.coef)
            h = sharding.to_host(
                {
                    "weight": b["weight"],
                    "score": out["scores"],
                    "kl_per_seq": out["seq_kl"],
                    "finished": out["finished"],
                    "response_mask": roll["response_mask"],
                }
            )
            length = h.pop("response_mask").sum(1).astype("float32")
            h |= {"response_length": length, "no_eos_fraction": 1.0 - h.pop("finished")}
            rows.append(h)
        return rl_data.weighted_means(rows)

    def init():
        params = trained_params(config, cfgs, mesh, rules)
        init_opt = lambda ps: {k: tx[k].init(lora.split_trainable(ps[k])[0]) for k in ps}
        opt_state = jax.jit(init_opt, out_shardings=shardings["opt_state"])(params)
        return {"params": params, "opt_state": opt_state}

    s = loop.Setup(
        config=config,
        mesh=mesh,
        workdir=workdir,
        model_cfg=cfgs["policy"],
        tx=tx,
        steps=t.steps,
        train_iter=data,
        step_fn=iteration,
        loss_key="ppo/loss",
        tokens_per_step=c.rollout_batch * (p + c.max_new_tokens),
        evaluate=evaluate if evals else None,
        meta=setup.checkpoint_meta(
            config,
            cfgs["policy"],
            tok,
            "ppo",
            value_model=dataclasses.asdict(cfgs["value"]),
            reward_bias=bias,
            # A LoRA value model's base (its adapters and head are the "value" item).
            **({"value_base": value_base(config)} if cfgs["value"].lora_rank else {}),
        ),
        layout=loop.Layout(
            abstract={"params": abstract_params, "opt_state": abstract_opt},
            shardings=shardings,
            init=init,
            to_items=_items,
            from_items=from_items(config, cfgs, mesh, rules),
        ),
        host_state=kl,
        after_step=after_step,
    )
    _, state, _, start, ckpt = loop.restore_or_init(s, rules)
    if jax.process_index() == 0:
        print(
            f"ppo: policy {model_lib.param_count(abstract_params['policy']) / 1e6:.2f}M, "
            f"value {model_lib.param_count(abstract_params['value']) / 1e6:.2f}M params"
            f"{' (its frozen base is the reward model)' if 'reward_head' in frozen else ''}; "
            f"data: {info}; {t.steps} iterations; starting at {start}",
            flush=True,
        )
    policy_lr = state_lib.lr_schedule(ppo_steps.optim_config(ppo_cfg, ppo_cfg.policy_lr, t.steps))
    # The loop asks the lr of iteration i; the schedule counts optimizer updates.
    return loop.train(s, state, start, ckpt, schedule=lambda i: policy_lr(i * n_updates))


def sample_table(tok, rollout, scores, c) -> str:
    """A few prompts, responses and their scores [B] (reward model or function), as text."""
    rows = range(min(c.sample_rows, rollout["tokens"].shape[0]))
    prompts, responses = rl_data.decode_rows(tok, rollout, c.prompt_len, rows)
    scores = sharding.to_host(scores)
    return "\n".join(f"[{scores[i]:+.3f}] {prompts[i]!r} -> {responses[i]!r}" for i in rows)
