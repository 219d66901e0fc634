"""PPO-ptx pure steps: score a rollout, and update policy + value with ONE loss.

Arrays of a rollout (B rows, P prompt slots, T response slots):
  tokens [B, P + T]  prompt (left-padded) then response (pad after EOS)
  prompt_mask [B, P], response_mask [B, T] (True up to and including EOS)
Response token t sits at column P + t and is predicted by the logits at column P + t - 1; the
value of the state before emitting token t is the value head's output at that same column.

Models: `policy` (LM head, trained), `value` (scalar head, trained), `ref` (the frozen SFT
policy; absent for a LoRA policy, whose own base with the adapters off is the reference) and
`reward` (the frozen RM; with LoRA and the value from the RM, only the RM's scalar head
`reward_head`, on the value model's frozen base: `reward_params`). The frozen params are
ordinary arguments: they are never donated and never reach the optimizer. With LoRA only each
trained model's adapters (and the value head) are differentiated and updated; its frozen base
passes through the step.

Every log-prob (logp_old, logp_ref, the update's logp, the entropy) is that of the rollout's
sampling distribution, the logits divided by `cfg.temperature` (`check_sampling` refuses
top-k / top-p), so the ratio starts at exactly 1 and the KL is that of what was sampled.

The loss, minimised, for one minibatch and one pretraining batch:
  L = policy_clip_loss + vf_coef * value_clip_loss + ptx_coef * NLL(pretraining batch)
which is the negative of InstructGPT's objective with gamma = ptx_coef (ptx_coef = 0: plain PPO).
One `value_and_grad` over {"policy", "value"} gives every term's gradient at once.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import lora
from rlhf_jax.rl import losses, ppo_math
from rlhf_jax.sampling import likelihood, reward, sampler


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """The static (hashable) settings the compiled steps need, from `config.ppo` and the
    optimizer keys of `config.train` (`ppo_config_from`)."""

    minibatch_rows: int
    epochs: int
    updates_per_epoch: int
    eos_id: tuple[int, ...]  # the tokenizer's eos_ids: any ends a response
    kl_kind: str
    discount: float
    lam: float
    clip: float
    value_clip: float
    vf_coef: float
    ptx_coef: float
    whiten_advantages: bool
    score_clip: float
    whiten_scores: bool
    no_eos_penalty: float
    policy_lr: float  # train.lr
    value_lr: float  # ppo.value_lr
    warmup_updates: int  # train.warmup_steps, counted in optimizer updates
    weight_decay: float
    grad_clip: float
    min_lr_ratio: float
    temperature: float = 1.0  # the rollout's; every log-prob is taken at it
    b1: float = 0.9
    b2: float = 0.95


# PPOConfig fields read from config.ppo under the same name.
_PPO_KEYS = (
    "epochs", "kl_kind", "discount", "lam", "clip", "value_clip", "vf_coef", "ptx_coef",
    "whiten_advantages", "score_clip", "whiten_scores", "no_eos_penalty", "value_lr",
    "temperature",
)  # fmt: skip


def ppo_config_from(config, eos_id) -> PPOConfig:
    """The compiled steps' settings: `config.ppo`, and the policy optimizer from `config.train`
    (lr, warmup_steps in optimizer updates, min_lr_ratio, weight_decay, b1, b2, grad_clip; the
    value model takes the same schedule at `ppo.value_lr`)."""
    c, t, pc = config.ppo, config.train, jax.process_count()
    if c.rollout_batch % c.minibatch or c.rollout_batch % pc:
        raise ValueError(
            f"ppo.rollout_batch={c.rollout_batch} must be divisible by "
            f"ppo.minibatch={c.minibatch} and by the {pc} processes"
        )
    check_sampling(c.temperature, c.top_k, c.top_p)
    return PPOConfig(
        **{k: c[k] for k in _PPO_KEYS},
        minibatch_rows=c.minibatch,
        eos_id=sampler.stop_ids(eos_id),
        updates_per_epoch=c.rollout_batch // c.minibatch,
        policy_lr=t.lr,
        warmup_updates=t.warmup_steps,
        weight_decay=t.weight_decay,
        grad_clip=t.grad_clip,
        min_lr_ratio=t.min_lr_ratio,
        b1=t.b1,
        b2=t.b2,
    )


def full_mask(batch):
    """[B, P + T] bool: real prompt and response tokens."""
    return jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1).astype(bool)


def _positions(mask):
    return jnp.maximum(jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0)


def check_sampling(temperature: float, top_k: int, top_p: float, stage: str = "ppo") -> None:
    """Refuses rollout sampling knobs PPO (or GRPO, `stage`) cannot train under, in one sentence.

    The ratio, the KL penalty and the adaptive KL controller are computed teacher-forced under
    the distribution that drew the tokens: the policy's logits divided by `<stage>.temperature`
    (the reference's by the same temperature, as TRL does). Top-k / top-p truncation is not
    supported: a token the old policy kept may fall outside the updated policy's (or the
    reference's) kept set, where its log-prob is -inf.
    """
    if top_k != 0 or top_p != 1.0:
        raise ValueError(
            f"{stage}.top_k={top_k} / {stage}.top_p={top_p}: {stage.upper()} trains under the "
            f"sampling distribution and supports temperature only; set {stage}.top_k=0 and "
            f"{stage}.top_p=1.0"
        )
    if not temperature > 0:
        raise ValueError(
            f"{stage}.temperature must be > 0 ({stage.upper()} samples its rollouts), "
            f"got {temperature}"
        )


def policy_forward(graphdef, params, tokens, mask, p: int, temperature: float = 1.0):
    """Response log-probs under the sampling distribution (logits / temperature), from the one
    log-prob function (`likelihood.teacher_forced_logprobs`) at start = P - 1: the float32 head
    runs on the response positions' hidden states only (columns P-1 .. P+T-2, which predict
    tokens[:, P:]), so no [B, P + T, V] logits are built.

    Returns:
      (logp of the response tokens [B, T] (0 at padding), scaled logits at response positions
       [B, T, V] float32).
    """
    return likelihood.teacher_forced_logprobs(
        graphdef, params, tokens, mask, start=p - 1, temperature=temperature, return_logits=True
    )


def value_forward(graphdef, params, tokens, mask, p: int):
    """Values of the states before each response token, [B, T] float32."""
    model = state_lib.merge(graphdef, params)
    per_pos, _ = model(tokens, positions=_positions(mask), key_mask=mask)
    return per_pos[:, p - 1 : -1]


def reward_params(params, frozen):
    """The reward model's params: `frozen["reward"]`, or, with a shared base, the value model's
    frozen leaves (the RM's base, adapters merged) under the RM's own scalar head
    `frozen["reward_head"]`: the same arrays the value model reads, no copy."""
    if "reward" in frozen:
        return frozen["reward"]
    return lora.combine(lora.split_lora(params["value"])[1], frozen["reward_head"])


def _chunked(fn, batch_fields, chunk: int):
    """Applies fn over rows in chunks of `chunk` (the update's minibatch size), so logp_old is
    computed with exactly the shapes — hence the same numerics — as the first update."""
    b = batch_fields[0].shape[0]
    n = b // chunk
    split = [x.reshape(n, chunk, *x.shape[1:]) for x in batch_fields]
    out = jax.lax.map(lambda xs: fn(*xs), split)
    return jax.tree.map(lambda y: y.reshape(b, *y.shape[2:]), out)


def score_step(params, frozen, batch, *, graphdefs, cfg, p: int, mesh, rules):
    """Teacher-forced logp/logp_ref, values, scores, KL-shaped rewards, GAE, whitening.

    Args:
      params: {"policy", "value"} trained params.
      frozen: {"ref", "reward" or "reward_head"} frozen params (no reward with a reward
        function, "reward_head" where reward and value share a base (`reward_params`), no "ref"
        for a LoRA policy that is its own reference with the adapters off) and
        "kl_coef" [] (the current beta), "reward_bias" [], "ext_scores" [B] (reward-function
        scores, zeros with an RM).
      batch: rollout arrays (module docstring).

    Returns:
      (update batch with logp_old, values_old, advantages, returns; scalar metrics).
    """
    with sharding.use_rules(mesh, rules):
        tokens, mask, rmask = batch["tokens"], full_mask(batch), batch["response_mask"]
        rmask_f = rmask.astype(jnp.float32)
        mb = cfg.minibatch_rows

        def lp(params_, t, m):  # policy and reference, both at the sampling temperature
            return policy_forward(graphdefs["policy"], params_, t, m, p, cfg.temperature)[0]

        logp = _chunked(functools.partial(lp, params["policy"]), [tokens, mask], mb)
        ref = frozen["ref"] if "ref" in frozen else lora.adapters_off(params["policy"])
        logp_ref = _chunked(functools.partial(lp, ref), [tokens, mask], mb)
        values = _chunked(
            lambda t, m: value_forward(graphdefs["value"], params["value"], t, m, p),
            [tokens, mask],
            mb,
        )
        logp, logp_ref, values = (x * rmask_f for x in (logp, logp_ref, values))
        if "reward" in frozen or "reward_head" in frozen:
            rm = reward_params(params, frozen)
            scores = reward.sequence_scores(graphdefs["reward"], rm, tokens, mask)
            scores = scores + frozen["reward_bias"]
        else:
            scores = frozen["ext_scores"]
        finished = jnp.any(rmask & sampler.is_stop(batch["tokens"][:, p:], cfg.eos_id), axis=1)
        raw_scores = scores
        scores = scores + jnp.where(finished, 0.0, cfg.no_eos_penalty)
        scores = ppo_math.clip_or_whiten_scores(
            scores, clip=cfg.score_clip, whiten=cfg.whiten_scores
        )
        kl = ppo_math.kl_estimate(logp, logp_ref, cfg.kl_kind) * rmask_f  # [B, T]
        rewards = ppo_math.shaped_rewards(scores, kl, rmask_f, frozen["kl_coef"])
        adv, returns = ppo_math.gae(rewards, values, rmask_f, cfg.discount, cfg.lam)
        if cfg.whiten_advantages:
            adv = ppo_math.whiten(adv, rmask_f)
        lengths = rmask_f.sum(1)
        out = dict(
            batch,
            logp_old=logp,
            values_old=values,
            advantages=adv,
            returns=returns,
            scores=raw_scores,  # [B] per-row values for the sample table and weighted evals
            seq_kl=kl.sum(1),
            finished=finished,
        )
        m = {
            "ppo/score": raw_scores.mean(),
            "ppo/score_std": raw_scores.std(),
            "ppo/kl_per_token": ppo_math.masked_mean(kl, rmask_f),
            "ppo/kl_per_seq": kl.sum(1).mean(),
            "ppo/kl_coef": frozen["kl_coef"],
            "ppo/response_length": lengths.mean(),
            "ppo/no_eos_fraction": 1.0 - finished.astype(jnp.float32).mean(),
            "ppo/return_mean": ppo_math.masked_mean(returns, rmask_f),
            "ppo/value_mean": ppo_math.masked_mean(values, rmask_f),
        }
        return out, m


def ppo_loss(params, mb, ptx, *, graphdefs, cfg, p: int):
    """The one PPO-ptx loss of a minibatch (module docstring) and its metrics."""
    tokens, mask = mb["tokens"], full_mask(mb)
    rmask = mb["response_mask"].astype(jnp.float32)
    logp, logits = policy_forward(
        graphdefs["policy"], params["policy"], tokens, mask, p, cfg.temperature
    )
    pl, pm = ppo_math.policy_loss(logp, mb["logp_old"], mb["advantages"], rmask, cfg.clip)
    values = value_forward(graphdefs["value"], params["value"], tokens, mask, p)
    vl, vm = ppo_math.value_loss(values, mb["values_old"], mb["returns"], rmask, cfg.value_clip)
    loss = pl + cfg.vf_coef * vl
    m = {
        "ppo/policy_loss": pl,
        "ppo/value_loss": vl,
        "ppo/entropy": ppo_math.entropy_from_logits(logits, rmask),
        "ppo/explained_variance": ppo_math.explained_variance(values, mb["returns"], rmask),
        **{f"ppo/{k}": v for k, v in {**pm, **vm}.items()},
    }
    if ptx is not None:
        model = state_lib.merge(graphdefs["policy"], params["policy"])
        ptx_logits, _ = model(ptx["inputs"])
        nll_sum, n = losses.masked_xent(ptx_logits, ptx["targets"], ptx["mask"])
        ptx_nll = nll_sum / jnp.maximum(n, 1.0)
        loss = loss + cfg.ptx_coef * ptx_nll
        m["ppo/ptx_loss"] = ptx_nll
    m["ppo/loss"] = loss
    return loss, m


def update_step(state, batch, ptx, rng, *, graphdefs, tx, cfg, p: int, mesh, rules):
    """`cfg.epochs` passes over the rollout in minibatches of `cfg.minibatch_rows`.

    Args:
      state: {"step", "params": {"policy", "value"}, "opt_state"} (donated).
      batch: the output of `score_step`, B rows.
      ptx: pretraining batches {"inputs", "targets", "mask"} [b_ptx, epochs * n_mb, L], or None
        (rows first, so they shard like every other batch).
      rng: key for the minibatch permutations.

    Returns:
      (new state, metrics averaged over all minibatches; those of the very first minibatch,
      where the ratio is exactly 1, also under "ppo/first_*").
    """
    with sharding.use_rules(mesh, rules):
        b = batch["tokens"].shape[0]
        n_mb = b // cfg.minibatch_rows
        # Only the trainable params (all without LoRA) are carried, differentiated and updated.
        split = {k: lora.split_trainable(v) for k, v in state["params"].items()}
        frozen = {k: v[1] for k, v in split.items()}
        full = lambda t: {k: lora.combine(t[k], frozen[k]) for k in t}  # noqa: E731
        loss_fn = functools.partial(ppo_loss, graphdefs=graphdefs, cfg=cfg, p=p)
        grad_fn = jax.value_and_grad(lambda t, mb, px: loss_fn(full(t), mb, px), has_aux=True)

        def one_epoch(carry, epoch):
            trainable, opt_state = carry
            # Epoch 0 keeps rollout order so its first minibatch is exactly what score_step
            # chunked; later epochs reshuffle.
            perm = jnp.where(
                epoch == 0, jnp.arange(b), jax.random.permutation(jax.random.fold_in(rng, epoch), b)
            )
            idx = perm.reshape(n_mb, cfg.minibatch_rows)

            def one_mb(carry, i):
                trainable, opt_state = carry
                mb = jax.tree.map(lambda x: x[idx[i]], batch)
                mb = jax.tree.map(
                    lambda x: sharding.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1)), mb
                )
                px = None if ptx is None else jax.tree.map(lambda x: x[:, epoch * n_mb + i], ptx)
                (_, m), grads = grad_fn(trainable, mb, px)
                trainable, opt_state = apply_tx(tx, grads, opt_state, trainable)
                m["ppo/grad_norm_policy"] = optax.tree.norm(grads["policy"])
                m["ppo/grad_norm_value"] = optax.tree.norm(grads["value"])
                return (trainable, opt_state), m

            return jax.lax.scan(one_mb, (trainable, opt_state), jnp.arange(n_mb))

        trainable = {k: v[0] for k, v in split.items()}
        (trainable, opt_state), ms = jax.lax.scan(
            one_epoch, (trainable, state["opt_state"]), jnp.arange(cfg.epochs)
        )
        params = full(trainable)
        metrics = jax.tree.map(jnp.mean, ms)
        metrics["ppo/first_ratio_max"] = ms["ppo/ratio_max"][0, 0]
        metrics["ppo/first_clipfrac"] = ms["ppo/clipfrac"][0, 0]
        metrics["ppo/first_ratio_mean"] = ms["ppo/ratio_mean"][0, 0]
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, metrics


def optim_config(cfg, lr: float, total_iters: int) -> state_lib.OptimConfig:
    """One model's AdamW settings; the schedule counts `total_iters` x epochs x minibatches
    optimizer updates."""
    return state_lib.OptimConfig(
        lr=lr,
        warmup_steps=cfg.warmup_updates,
        total_steps=max(total_iters * cfg.epochs * cfg.updates_per_epoch, 1),
        min_lr_ratio=cfg.min_lr_ratio,
        weight_decay=cfg.weight_decay,
        b1=cfg.b1,
        b2=cfg.b2,
        grad_clip=cfg.grad_clip,
    )


def make_tx(cfg, total_iters: int) -> dict:
    """Separate AdamW (own lr, own clipping, own state) for policy and value, so neither's
    gradient scale affects the other's update."""
    return {
        k: state_lib.make_optimizer(optim_config(cfg, lr, total_iters))
        for k, lr in (("policy", cfg.policy_lr), ("value", cfg.value_lr))
    }


def apply_tx(tx: dict, grads, opt_state, params):
    """Per-model optimizer step: {"policy", "value"} trees updated independently."""
    new_params, new_opt = {}, {}
    for k in ("policy", "value"):
        updates, new_opt[k] = tx[k].update(grads[k], opt_state[k], params[k])
        new_params[k] = optax.apply_updates(params[k], updates)
    return new_params, new_opt
