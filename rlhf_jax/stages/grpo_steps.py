"""GRPO-ptx pure steps: score a grouped rollout, and update the policy with ONE loss.

Arrays of a rollout (B = N * G rows, the G samples of each prompt in consecutive rows; P prompt
slots, T response slots), as ppo_steps.py lays them out:
  tokens [B, P + T]  prompt (left-padded) then response (pad after EOS)
  prompt_mask [B, P], response_mask [B, T] (True up to and including EOS)
Models: `policy` (trained), `ref` (the frozen SFT policy; absent for a LoRA policy, whose own
base with the adapters off is the reference) and optionally `reward` (the frozen RM); frozen
params are ordinary arguments, never donated, never in the optimizer. Every log-prob
is the sampling distribution's (logits / temperature), so the first minibatch's ratio is 1.

The loss, minimised, of one minibatch and one pretraining batch:
  L = grpo.policy_loss (clipped token surrogate [+ beta * k3]) + ptx_coef * NLL(pretraining)
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
from rlhf_jax.rl import grpo, losses
from rlhf_jax.sampling import likelihood, reward
from rlhf_jax.stages import ppo_steps

KL_IN = ("loss", "reward")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """The static (hashable) subset of `config.grpo` the compiled steps need."""

    group_size: int
    advantage: str
    scale_std: bool
    std_scope: str
    kl_in: str
    beta: float
    loss_norm: str
    clip: float
    clip_high: float
    minibatch_rows: int
    epochs: int
    ptx_coef: float
    temperature: float


def grpo_config_from(config) -> GRPOConfig:
    c, pc = config.grpo, jax.process_count()
    if c.advantage not in grpo.ADVANTAGES:
        raise ValueError(f"unknown grpo.advantage: {c.advantage!r}; expected {grpo.ADVANTAGES}")
    if c.kl_in not in KL_IN:
        raise ValueError(f"unknown grpo.kl_in: {c.kl_in!r}; expected one of {KL_IN}")
    if c.loss_norm not in grpo.NORMS:
        raise ValueError(f"unknown grpo.loss_norm: {c.loss_norm!r}; expected {grpo.NORMS}")
    if c.std_scope not in grpo.STD_SCOPES:
        raise ValueError(f"unknown grpo.std_scope: {c.std_scope!r}; expected {grpo.STD_SCOPES}")
    if c.std_scope == "batch" and (c.advantage != "grpo" or not c.scale_std):
        raise ValueError(
            "grpo.std_scope='batch' scales GRPO's advantages by the batch's std: it needs "
            f"grpo.advantage='grpo' and grpo.scale_std=True (got {c.advantage!r}, {c.scale_std})"
        )
    # None: the symmetric clip; DAPO's clip-higher sets it above grpo.clip.
    clip_high = c.clip if c.clip_high is None else c.clip_high
    if not (0 < c.clip < 1 and clip_high > 0):
        raise ValueError(
            f"grpo.clip must be in (0, 1) and grpo.clip_high > 0, got {c.clip} and {clip_high}"
        )
    if c.group_size < 2:
        raise ValueError(f"grpo.group_size must be at least 2, got {c.group_size}")
    rows = c.prompts * c.group_size
    if rows % c.minibatch or c.prompts % pc:
        raise ValueError(
            f"grpo.prompts x grpo.group_size = {rows} must be divisible by grpo.minibatch="
            f"{c.minibatch}, and grpo.prompts={c.prompts} by the {pc} processes"
        )
    ppo_steps.check_sampling(c.temperature, 0, 1.0, stage="grpo")
    return GRPOConfig(
        group_size=c.group_size,
        advantage=c.advantage,
        scale_std=c.scale_std,
        std_scope=c.std_scope,
        kl_in=c.kl_in,
        beta=c.beta,
        loss_norm=c.loss_norm,
        clip=c.clip,
        clip_high=clip_high,
        minibatch_rows=c.minibatch,
        epochs=c.epochs,
        ptx_coef=c.ptx_coef,
        temperature=c.temperature,
    )


def _chunked(fn, fields, chunk: int):
    """fn over rows in chunks of `chunk` rows: logp_old with the update minibatch's shapes."""
    b = fields[0].shape[0]
    split = [x.reshape(b // chunk, chunk, *x.shape[1:]) for x in fields]
    out = jax.lax.map(lambda xs: fn(*xs), split)
    return out.reshape(b, *out.shape[2:])


def score_step(params, frozen, batch, ext_scores, *, graphdefs, g: GRPOConfig, p: int, mesh, rules):
    """Teacher-forced logp_old / logp_ref, scores, (KL-in-reward), group advantages.

    Args:
      params: the policy's params.
      frozen: {["ref"], ["reward"], "reward_bias" []} frozen inputs; without "ref" the
        reference is the (LoRA) policy's base, adapters off.
      batch: {"tokens" [B, P + T], "prompt_mask" [B, P], "response_mask" [B, T]}, B = N * G
        with each prompt's G samples in consecutive rows.
      ext_scores: [B] reward-function scores (zeros with an RM).

    Returns:
      (the batch with logp_old, logp_ref [B, T], advantages, scores and seq_kl [B]; scalar
      metrics).
    """
    with sharding.use_rules(mesh, rules):
        tokens, mask = batch["tokens"], ppo_steps.full_mask(batch)
        rmask = batch["response_mask"]

        def lp(w, t, m):  # [B, T]: the head at the response positions only
            return likelihood.teacher_forced_logprobs(
                graphdefs["policy"], w, t, m, start=p - 1, temperature=g.temperature
            )

        rows = g.minibatch_rows
        logp = _chunked(functools.partial(lp, params), [tokens, mask], rows)
        ref = frozen["ref"] if "ref" in frozen else lora.adapters_off(params)
        logp_ref = _chunked(functools.partial(lp, ref), [tokens, mask], rows)
        logp, logp_ref = (jnp.where(rmask, x, 0.0) for x in (logp, logp_ref))
        if "reward" in frozen:
            scores = reward.sequence_scores(graphdefs["reward"], frozen["reward"], tokens, mask)
            scores = scores + frozen["reward_bias"]
        else:
            scores = ext_scores
        penalized, seq_kl = grpo.kl_penalized_scores(scores, logp, logp_ref, rmask, g.beta)
        used = penalized if g.kl_in == "reward" else scores
        adv = grpo.group_advantages(
            used, g.group_size, kind=g.advantage, scale_std=g.scale_std, std_scope=g.std_scope
        )
        flat = jnp.all(adv.reshape(-1, g.group_size) == 0, axis=1)
        out = dict(batch, logp_old=logp, logp_ref=logp_ref, advantages=adv)
        out |= {"scores": scores, "seq_kl": seq_kl}  # [B] per row, for weighted evals
        return out, {
            "grpo/score": scores.mean(),
            "grpo/score_std": scores.std(),
            "grpo/kl_per_seq": seq_kl.mean(),
            "grpo/response_length": rmask.sum(axis=1).astype(jnp.float32).mean(),
            "grpo/flat_groups": flat.astype(jnp.float32).mean(),
        }


def grpo_loss(params, mb, ptx, *, graphdef, g: GRPOConfig, p: int):
    """The one GRPO-ptx loss of a minibatch and its metrics."""
    rmask = mb["response_mask"]
    logp = likelihood.teacher_forced_logprobs(
        graphdef, params, mb["tokens"], ppo_steps.full_mask(mb), start=p - 1,
        temperature=g.temperature,
    )  # fmt: skip
    kl_coef = g.beta if g.kl_in == "loss" else 0.0
    loss, m = grpo.policy_loss(
        logp,
        mb["logp_old"],
        mb["logp_ref"],
        mb["advantages"],
        rmask,
        clip=g.clip,
        clip_high=g.clip_high,
        kl_coef=kl_coef,
        norm=g.loss_norm,
    )
    ratio = jnp.exp(jnp.where(rmask, logp - mb["logp_old"], 0.0))
    m = {f"grpo/{k}": v for k, v in m.items()}
    m["grpo/policy_loss"] = loss
    m["grpo/ratio_max"] = jnp.where(rmask, ratio, -jnp.inf).max()
    m["grpo/ratio_min"] = jnp.where(rmask, ratio, jnp.inf).min()
    if ptx is not None:
        model = state_lib.merge(graphdef, params)
        logits, _ = model(ptx["inputs"])
        nll_sum, n = losses.masked_xent(logits, ptx["targets"], ptx["mask"])
        m["grpo/ptx_loss"] = nll_sum / jnp.maximum(n, 1.0)
        loss = loss + g.ptx_coef * m["grpo/ptx_loss"]
    m["grpo/loss"] = loss
    return loss, m


def update_step(state, batch, ptx, rng, *, graphdef, tx, g: GRPOConfig, p: int, mesh, rules):
    """`g.epochs` passes over the rollout in minibatches; epoch 0 in rollout order.

    ptx: {"inputs", "targets", "mask"} [b_ptx, epochs * n_mb, L] or None.
    """
    with sharding.use_rules(mesh, rules):
        b = batch["tokens"].shape[0]
        n_mb = b // g.minibatch_rows
        # Only the trainable params (all without LoRA) are carried, differentiated and updated.
        trainable, frozen = lora.split_trainable(state["params"])
        loss_fn = functools.partial(grpo_loss, graphdef=graphdef, g=g, p=p)
        grad_fn = jax.value_and_grad(
            lambda t, mb, px: loss_fn(lora.combine(t, frozen), mb, px), has_aux=True
        )

        def one_epoch(carry, epoch):
            shuffled = jax.random.permutation(jax.random.fold_in(rng, epoch), b)
            idx = jnp.where(epoch == 0, jnp.arange(b), shuffled).reshape(n_mb, g.minibatch_rows)

            def one_mb(carry, i):
                trainable, opt_state = carry
                mb = jax.tree.map(lambda x: x[idx[i]], batch)
                mb = jax.tree.map(
                    lambda x: sharding.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1)), mb
                )
                px = None if ptx is None else jax.tree.map(lambda x: x[:, epoch * n_mb + i], ptx)
                (_, m), grads = grad_fn(trainable, mb, px)
                updates, opt_state = tx.update(grads, opt_state, trainable)
                m["grpo/grad_norm"] = optax.tree.norm(grads)
                return (optax.apply_updates(trainable, updates), opt_state), m

            return jax.lax.scan(one_mb, carry, jnp.arange(n_mb))

        (trainable, opt_state), ms = jax.lax.scan(
            one_epoch, (trainable, state["opt_state"]), jnp.arange(g.epochs)
        )
        params = lora.combine(trainable, frozen)
        metrics = jax.tree.map(jnp.mean, ms)
        metrics["grpo/first_ratio_max"] = ms["grpo/ratio_max"][0, 0]
        metrics["grpo/first_ratio_min"] = ms["grpo/ratio_min"][0, 0]
        metrics["grpo/ratio_max"] = ms["grpo/ratio_max"].max()
        metrics["grpo/ratio_min"] = ms["grpo/ratio_min"].min()
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics
