"""GRPO-ptx stage (and RLOO): G samples per prompt, advantages from the group, no value model.

One iteration: `grpo.prompts` prompts, each repeated `grpo.group_size` (G) times -> generate
(the on-device sampler, one PRNG stream per sample) -> score_step (jit: logp_old and logp_ref
teacher-forced, the RM score with its normalisation bias or a `module:function` reward, the KL
in the reward when `grpo.kl_in="reward"`, group advantages) -> update_step (jit: epochs x
minibatches of the clipped token loss, + beta * k3 when `grpo.kl_in="loss"` as GRPO, +
ptx_coef * the pretraining NLL, ONE loss and one gradient). rlhf_jax/rl/grpo.py has the math:
`grpo.advantage` grpo | rloo, `grpo.scale_std` (False: Dr. GRPO), `grpo.loss_norm` sequence |
token | constant (Dr. GRPO's length-unbiased sum over a constant).

The first minibatch of every iteration is exactly on-policy: epoch 0 keeps rollout order and
logp_old is computed in chunks of the minibatch's shape, so its ratio is exactly 1
(`grpo/first_ratio_max`, `grpo/first_ratio_min`). Log-probs are those of the sampling
distribution (logits / `grpo.temperature`), the reference's at the same temperature.

The pure steps are grpo_steps.py's. The iteration is the step of the supervised loop
(stages/loop.py), so checkpoints, resume, the NaN stop, metrics and evals are the other stages':
a checkpoint holds the policy, its optimizer state and both data iterators' positions, and every
PRNG key derives from (seed, iteration, sample), so a killed run resumes to the same params as
the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import iterators, lm_data, sft_data
from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.sampling import sampler
from rlhf_jax.stages import grpo_steps, loop, ppo, setup


class RolloutData:
    """Prompt batches with every prompt repeated G times (rows n * G + g) and "sample" ids
    (prompt index * G + g) for the PRNG, plus the iteration's stacked pretraining batches as
    "ptx_*"; one checkpointable state for both iterators."""

    def __init__(self, prompts, group_size: int, ptx=None, n_ptx: int = 0):
        self.prompts, self.g, self.ptx, self.n_ptx = prompts, group_size, ptx, n_ptx

    def __next__(self):
        b = next(self.prompts)
        out = {k: np.repeat(v, self.g, axis=0) for k, v in b.items() if k != "index"}
        out["sample"] = (b["index"][:, None] * self.g + np.arange(self.g)).reshape(-1)
        if self.ptx is not None:
            stacked = [next(self.ptx) for _ in range(self.n_ptx)]
            for k in stacked[0]:
                out[f"ptx_{k}"] = np.stack([s[k] for s in stacked], axis=1)  # [b, n, L]
        return out

    def get_state(self):
        return {
            "prompts": self.prompts.get_state(),
            "ptx": None if self.ptx is None else self.ptx.get_state(),
        }

    def set_state(self, state):
        self.prompts.set_state(state["prompts"])
        if self.ptx is not None:
            self.ptx.set_state(state["ptx"])


def _reward_model(config, policy_cfg, mesh, rules):
    """(reward cfg, frozen reward params, bias) from `grpo.reward_from`, or (None, None, 0)."""
    c = config.grpo
    if not c.reward_from:
        return None, None, 0.0
    meta = setup.read_init_meta(c.reward_from) or {}
    if "model" not in meta:
        raise ValueError(f"grpo.reward_from {c.reward_from!r}: checkpoint has no model config")
    cfg = dataclasses.replace(model_config.ModelConfig(**meta["model"]), dtype=policy_cfg.dtype)
    params = setup.restore_init_params(c.reward_from, state_lib.abstract_params(cfg, mesh, rules))
    return cfg, params, float(meta.get("reward_bias", 0.0))


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
    tok = setup.load_tokenizer(config, workdir)
    policy_cfg, _ = setup.resolve_model(config, tok)
    p = c.prompt_len
    if policy_cfg.family == "gpt2" and p + c.max_new_tokens > policy_cfg.max_len:
        raise ValueError(
            f"grpo.prompt_len + grpo.max_new_tokens = {p + c.max_new_tokens} exceeds "
            f"model.max_len={policy_cfg.max_len}"
        )
    reward_cfg, reward_params, bias = _reward_model(config, policy_cfg, mesh, rules)
    reward_fn = ppo.load_reward_fn(c.reward_fn) if c.reward_fn else None
    ref_src = c.reference_from or config.init_from
    frozen = {
        "ref": setup.restore_init_params(
            ref_src, state_lib.abstract_params(policy_cfg, mesh, rules)
        ),
        "reward_bias": jnp.float32(bias),
    }
    graphdefs = {"policy": model_lib.abstract(policy_cfg)[0]}
    if reward_cfg is not None:
        frozen["reward"], graphdefs["reward"] = reward_params, model_lib.abstract(reward_cfg)[0]

    pc, pi = jax.process_count(), jax.process_index()
    prompts = sft_data.read_prompts(config.data.train)
    if config.data.eval:
        train_p, eval_p = prompts, sft_data.read_prompts(config.data.eval)
    else:
        train_p, eval_p = lm_data.split_documents(prompts, config.data.eval_fraction, config.seed)
    ex, _ = sft_data.encode_prompts(train_p, tok, config.data.prompt_template, p)
    prompt_it = iterators.make_train_iterator(
        ex, batch_size=c.prompts // pc, seed=config.seed, process_index=pi, process_count=pc
    )
    n_mb = rows // c.minibatch
    if c.ptx_coef > 0:
        sharding.check_batch(c.ptx_batch, "grpo.ptx_batch", mesh, rules)
    ptx_it = ppo.ptx_data(config, tok, workdir, stage="grpo")
    data = RolloutData(prompt_it, c.group_size, ptx_it, c.epochs * n_mb)

    optim = state_lib.OptimConfig(
        lr=t.lr,
        warmup_steps=t.warmup_steps,
        total_steps=max(t.steps * c.epochs * n_mb, 1),
        min_lr_ratio=t.min_lr_ratio,
        weight_decay=t.weight_decay,
        b1=t.b1,
        b2=t.b2,
        grad_clip=t.grad_clip,
    )
    tx = state_lib.make_optimizer(optim)
    sample = sampler.make_sampler(
        graphdefs["policy"],
        max_new_tokens=c.max_new_tokens,
        eos_id=tok.eos_ids,
        pad_id=tok.pad_id,
        mesh=mesh,
        rules=rules,
    )
    kw = dict(g=g, p=p, mesh=mesh, rules=rules)
    score = jax.jit(functools.partial(grpo_steps.score_step, graphdefs=graphdefs, **kw))
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
        init_params=lambda a: setup.restore_init_params(config.init_from, a),
        meta=setup.checkpoint_meta(config, policy_cfg, tok, "grpo", reward_bias=bias),
    )
    graphdef, state, shardings, start, ckpt = loop.restore_or_init(s, rules)
    update = jax.jit(
        functools.partial(grpo_steps.update_step, graphdef=graphdef, tx=tx, **kw),
        in_shardings=(shardings, None, None, None),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )

    def rollout_and_score(params, batch, iteration, stream):
        root = jax.random.fold_in(
            jax.random.fold_in(jax.random.key(config.seed), stream), iteration
        )
        keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(batch["sample"])
        out = sample(params, batch["tokens"], batch["mask"], keys, temperature=c.temperature)
        roll = {
            "tokens": out["tokens"],
            "prompt_mask": batch["mask"],
            "response_mask": out["response_mask"],
        }
        if reward_fn is not None:
            ext = ppo.external_scores(reward_fn, tok, roll, p, mesh, rules)
        else:
            ext = sharding.put_global({"s": np.zeros(rows, np.float32)}, mesh, rules)["s"]
        return score(params, frozen, roll, ext)

    def iteration(st, batch):
        scored, sm = rollout_and_score(st["params"], batch, st["step"], 0)
        ptx = {k[4:]: v for k, v in batch.items() if k.startswith("ptx_")} or None
        upd_key = jax.random.fold_in(jax.random.key(config.seed + 1), st["step"])
        st, um = update(st, scored, ptx, upd_key)
        return st, {**sm, **um}

    s.step_fn = iteration
    eval_batches = _eval_batches(eval_p[: c.eval_prompts], tok, config)
    if eval_batches and t.eval_every > 0:

        def evaluate(params, step):
            ms = [
                rollout_and_score(params, sharding.put_batch(b, mesh, rules), 0, 1)[1]
                for b in eval_batches
            ]
            ms = sharding.to_host(ms)
            keys = ("grpo/score", "grpo/kl_per_seq", "grpo/response_length")
            return {f"eval/{k[5:]}": float(np.mean([m[k] for m in ms])) for k in keys}

        s.evaluate = evaluate
    if pi == 0:
        print(
            f"grpo ({c.advantage}, G={c.group_size}, kl in {c.kl_in}, {c.loss_norm} norm): "
            f"{model_lib.param_count(state['params']) / 1e6:.2f}M params; "
            f"{len(train_p)} train / {len(eval_p)} eval prompts; starting at {start}",
            flush=True,
        )
    return loop.train(s, state, start, ckpt, schedule=state_lib.lr_schedule(optim))


def _eval_batches(prompts, tok, config):
    """Held-out prompts as rollout-shaped host batches for this process (G samples each; the
    last global batch filled with repeats)."""
    c = config.grpo
    if not prompts:
        return []
    ex, _ = sft_data.encode_prompts(prompts, tok, config.data.prompt_template, c.prompt_len)
    n, big = len(prompts), c.prompts
    b, lo = big // jax.process_count(), jax.process_index() * (big // jax.process_count())
    idx = np.arange(-(-n // big) * big) % n
    out = []
    for i in range(0, len(idx), big):
        rows = idx[i + lo : i + lo + b]
        batch = {k: np.repeat(ex[k][rows], c.group_size, axis=0) for k in ("tokens", "mask")}
        batch["sample"] = (rows[:, None] * c.group_size + np.arange(c.group_size)).reshape(-1)
        out.append(batch)
    return out
