"""GRPO-ptx stage (and RLOO): G samples per prompt, advantages from the group, no value model.

One iteration: `grpo.prompts` prompts, each repeated `grpo.group_size` (G) times -> generate
(the on-device sampler, one PRNG stream per sample) -> score_step (jit: logp_old and logp_ref
teacher-forced, the RM score with its normalisation bias or a `module:function` reward, the KL
in the reward when `grpo.kl_in="reward"`, group advantages) -> update_step (jit: epochs x
minibatches of the clipped token loss, + beta * k3 when `grpo.kl_in="loss"` as GRPO, +
ptx_coef * the pretraining NLL, ONE loss and one gradient). rlhf_jax/rl/grpo.py has the math:
`grpo.advantage` grpo | rloo, `grpo.scale_std` (False: Dr. GRPO) and `grpo.std_scope` group |
batch (TRL's batch-level scaling), `grpo.loss_norm` sequence | token | constant (Dr. GRPO's
length-unbiased sum over a constant), `grpo.clip` and `grpo.clip_high` (DAPO's clip-higher).

The first minibatch of every iteration is exactly on-policy: epoch 0 keeps rollout order and
logp_old is computed in chunks of the minibatch's shape, so its ratio is exactly 1
(`grpo/first_ratio_max`, `grpo/first_ratio_min`). Log-probs are those of the sampling
distribution (logits / `grpo.temperature`), the reference's at the same temperature.

The pure steps are grpo_steps.py's; what GRPO shares with PPO (prompts, ptx text, rewards, eval
batches, rollout keys) is rl_data.py's. The iteration is the step of the shared loop
(stages/loop.py), so checkpoints, resume, the NaN stop, metrics and evals are the other stages':
a checkpoint holds the policy, its optimizer state and both data iterators' positions, and every
PRNG key derives from (seed, iteration, sample), so a killed run resumes to the same params as
the uninterrupted one. The optimizer keys are `train.*` (lr, warmup_steps counted in optimizer
updates, ...); `train.grad_accum` is refused (`grpo.minibatch` sets a gradient step's rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.infra import compiled, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.sampling import rollout
from rlhf_jax.stages import grpo_steps, loop, rl_data, setup

# The iterator of prompts x G and stacked ptx batches (shared with PPO, G = 1 there).
RolloutData = rl_data.RolloutData


def run(config, mesh, workdir: str):
    """GRPO training; resumes from `<workdir>/checkpoints` when it holds a checkpoint."""
    rules = sharding.normalize_rules(config.sharding.rules)
    c, t = config.grpo, config.train
    if not config.init_from:
        raise ValueError("stage 'grpo' needs config.init_from (the SFT workdir)")
    if bool(c.reward_from) == bool(c.reward_fn):
        raise ValueError("set exactly one of grpo.reward_from (RM workdir) and grpo.reward_fn")
    g = grpo_steps.grpo_config_from(config)
    rows = c.prompts * c.group_size
    for key, n in (("grpo.minibatch", c.minibatch), ("grpo.prompts x group_size", rows)):
        sharding.check_batch(n, key, mesh, rules)
    if c.ptx_coef > 0:
        sharding.check_batch(c.ptx_batch, "grpo.ptx_batch", mesh, rules)
    rl_data.check_rl_train_keys(config, "grpo", "minibatch")
    tok = setup.load_tokenizer(config, workdir)
    policy_cfg, _ = setup.resolve_model(config, tok)
    p = c.prompt_len
    if policy_cfg.family == "gpt2" and p + c.max_new_tokens > policy_cfg.max_len:
        raise ValueError(
            f"grpo.prompt_len + grpo.max_new_tokens = {p + c.max_new_tokens} exceeds "
            f"model.max_len={policy_cfg.max_len}"
        )
    reward_cfg, reward_meta = rl_data.reward_model_config(config, "grpo", policy_cfg)
    reward_fn = rl_data.load_reward_fn(config, "grpo")
    bias = float((reward_meta or {}).get("reward_bias", 0.0))
    frozen = {"reward_bias": jnp.float32(bias)}
    ref = rl_data.reference(config, "grpo", policy_cfg, mesh, rules)
    if ref is not None:  # else a LoRA policy's own base (grpo_steps.score_step)
        frozen["ref"] = ref
    graphdefs = {"policy": model_lib.abstract(policy_cfg)[0]}
    if reward_cfg is not None:
        frozen["reward"] = rl_data.restore(c.reward_from, reward_cfg, mesh, rules)
        graphdefs["reward"] = model_lib.abstract(reward_cfg)[0]

    ex, eval_p, info = rl_data.read_prompts(config, tok, "grpo", "prompts")
    n_mb = rows // c.minibatch
    data = rl_data.RolloutData(
        rl_data.prompt_iterator(ex, c.prompts, config.seed),
        group_size=c.group_size,
        ptx=rl_data.ptx_data(config, tok, workdir, "grpo"),
        n_ptx=c.epochs * n_mb,
    )
    optim = setup.optim_config_from(t, max(t.steps * c.epochs * n_mb, 1))
    tx = state_lib.make_optimizer(optim)
    sample = rollout.make(
        graphdefs["policy"],
        config.get("rollout"),
        max_new_tokens=c.max_new_tokens,
        eos_id=tok.eos_ids,
        pad_id=tok.pad_id,
        mesh=mesh,
        rules=rules,
    )
    kw = dict(g=g, p=p, mesh=mesh, rules=rules)
    score = compiled.jit(grpo_steps.score_step, graphdefs=graphdefs, **kw)
    s = loop.Setup(
        config=config,
        mesh=mesh,
        workdir=workdir,
        model_cfg=policy_cfg,
        tx=tx,
        steps=t.steps,
        train_iter=data,
        step_fn=None,
        loss_key="grpo/loss",
        tokens_per_step=rows * (p + c.max_new_tokens),
        init_params=lambda a: setup.restore_init_params(config.init_from, a, rules=rules),
        meta=setup.checkpoint_meta(config, policy_cfg, tok, "grpo", reward_bias=bias),
    )
    graphdef, state, shardings, start, ckpt = loop.restore_or_init(s, rules)
    update = compiled.jit(
        grpo_steps.update_step,
        in_shardings=(shardings, None, None, None),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        graphdef=graphdef, tx=tx, **kw,
    )  # fmt: skip

    def rollout_and_score(params, batch, iteration, stream):
        keys = rl_data.rollout_keys(config.seed, stream, iteration, batch["sample"])
        out = sample(params, batch["tokens"], batch["mask"], keys, temperature=c.temperature)
        roll = {
            "tokens": out["tokens"],
            "prompt_mask": batch["mask"],
            "response_mask": out["response_mask"],
        }
        if reward_fn is not None:
            ext = rl_data.external_scores(reward_fn, tok, roll, p, mesh, rules, "grpo")
        else:
            zeros = np.zeros(roll["tokens"].shape[0], np.float32)
            ext = sharding.put_global({"s": zeros}, mesh, rules)["s"]
        return score(params, frozen, roll, ext)

    def iteration(st, batch):
        scored, sm = rollout_and_score(st["params"], batch, st["step"], 0)
        ptx = {k[4:]: v for k, v in batch.items() if k.startswith("ptx_")} or None
        upd_key = jax.random.fold_in(jax.random.key(config.seed + 1), st["step"])
        st, um = update(st, scored, ptx, upd_key)
        return st, {**sm, **um}

    s.step_fn = iteration
    evals = rl_data.eval_batches(
        eval_p[: c.eval_prompts], tok, config, "grpo", c.prompts, c.group_size
    )
    if evals:

        def evaluate(params, step):
            out = []
            for b in evals:
                b = sharding.put_batch(b, mesh, rules)
                scored, _ = rollout_and_score(params, b, 0, 1)
                h = sharding.to_host(
                    {
                        "weight": b["weight"],
                        "score": scored["scores"],
                        "kl_per_seq": scored["seq_kl"],
                        "response_mask": scored["response_mask"],
                    }
                )
                h["response_length"] = h.pop("response_mask").sum(1).astype("float32")
                out.append(h)
            return rl_data.weighted_means(out)

        s.evaluate = evaluate
    if jax.process_index() == 0:
        print(
            f"grpo ({c.advantage}, G={c.group_size}, kl in {c.kl_in}, {c.loss_norm} norm, "
            f"clip [{1 - g.clip:g}, {1 + g.clip_high:g}]): "
            f"{model_lib.param_count(state['params']) / 1e6:.2f}M params; data: {info}; "
            f"{t.steps} iterations; starting at {start}",
            flush=True,
        )
    lr = state_lib.lr_schedule(optim)
    # The loop asks the lr of iteration i; the schedule counts optimizer updates.
    return loop.train(s, state, start, ckpt, schedule=lambda i: lr(i * c.epochs * n_mb))
