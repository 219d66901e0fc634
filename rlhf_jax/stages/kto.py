"""KTO stage: the SFT policy trained on unpaired desirable / undesirable completions.

The data are `{"prompt", "completion", "label"}` rows or any comparison form the RM reads,
converted (data/kto_data.py: best-ranked responses desirable, worst undesirable); the loss is
rl/kto.py's, with the reference point z0 estimated from the batch's mismatched (prompt,
completion) rows, held constant in the gradient. z0 is computed over the WHOLE batch before the
gradient pass, so `train.grad_accum` microbatches give the one-pass step exactly.

Everything else is the DPO stage's (stages/dpo.py `prepare` and `train`): the frozen reference
(`kto.reference_from`, else `init_from`), the shared loop (checkpoints, resume, NaN stop,
preemption), and `eval/kl`, the policy's KL to the reference on held-out prompts.

Metrics: `kto/loss`, `kto/z0`, `kto/accuracy` (rows on their label's side of z0: r > z0 for
desirable, r < z0 for undesirable), `kto/chosen_reward` / `kto/rejected_reward` (mean implied
reward r = log pi - log pi_ref of the desirable / undesirable rows), the same under `eval/` on
the held-out rows (z0 estimated per eval batch), and `eval/kl`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.data import kto_data
from rlhf_jax.infra import compiled, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.rl import kto
from rlhf_jax.stages import accumulate
from rlhf_jax.stages import dpo as dpo_stage

BATCH_NDIM = {"tokens": 3, "mask": 3, "prompt_len": 1, "label": 1, "weight": 1}
MEANS = {"accuracy": "rows", "chosen_reward": "desirable", "rejected_reward": "undesirable"}


def check_config(c) -> None:
    """One clear sentence for a bad `config.kto`."""
    if not c.beta > 0:
        raise ValueError(f"kto.beta must be > 0, got {c.beta}")
    for key in ("desirable_weight", "undesirable_weight"):
        if not c[key] > 0:
            raise ValueError(f"kto.{key} must be > 0, got {c[key]}")


def logratios(params, ref_params, batch, slot: int, graphdef):
    """log pi(y|x) - log pi_ref(y|x) [N] of slot 0 (each row's completion) or slot 1 (its
    mismatched completion) of batch tokens [N, 2, L]; the policy part differentiable."""
    args = (batch["tokens"][:, slot : slot + 1], batch["mask"][:, slot : slot + 1],
            batch["prompt_len"])  # fmt: skip
    logp = dpo_stage.response_logprobs(graphdef, params, *args)[:, 0]
    ref = dpo_stage.reference(params, ref_params)  # a LoRA policy's own base when empty
    logp_ref = dpo_stage.response_logprobs(graphdef, ref, *args)[:, 0]
    return logp, logp_ref


def reference_point(params, ref_params, batch, *, graphdef, microbatches: int):
    """z0 of the whole batch, forward passes only, in the gradient pass's microbatches."""

    def part(mb):
        logp, logp_ref = logratios(params, ref_params, mb, 1, graphdef)
        return logp - logp_ref, mb["weight"]  # [n], [n]

    if microbatches == 1:
        kl, w = part(batch)
    else:
        kl, w = jax.lax.map(part, accumulate.microbatches(batch, microbatches))
    return kto.reference_point(kl.reshape(-1), w.reshape(-1))


def batch_loss(params, ref_params, batch, z0, *, graphdef, c):
    logp, logp_ref = logratios(params, ref_params, batch, 0, graphdef)
    return kto.kto_loss(
        logp, logp_ref, batch["label"], batch["weight"], z0, beta=c.beta,
        desirable_weight=c.desirable_weight, undesirable_weight=c.undesirable_weight,
    )  # fmt: skip


def train_step(state, ref_params, batch, *, graphdef, tx, c, mesh, rules, grad_accum: int = 1):
    """One optimizer step on a KTO batch (data/kto_data.py layout)."""
    with sharding.use_rules(mesh, rules):
        params = state["params"]
        z0 = reference_point(params, ref_params, batch, graphdef=graphdef, microbatches=grad_accum)
        fn = functools.partial(batch_loss, ref_params=ref_params, z0=z0, graphdef=graphdef, c=c)
        loss, m, grads = accumulate.accumulate(
            lambda p, mb: fn(p, batch=mb), params, batch, grad_accum, weight="rows", means=MEANS
        )
        params, opt_state = state_lib.apply_gradients(tx, grads, params, state["opt_state"])
        out = {
            "kto/loss": loss,
            "kto/grad_norm": optax.tree.norm(grads),
            **{f"kto/{k}": v for k, v in m.items()},
        }
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, out


def eval_step(params, ref_params, batch, *, graphdef, c, mesh, rules, microbatches: int = 1):
    """Sums over one eval batch (z0 its own), so batches add up exactly; in the train step's
    microbatches."""
    with sharding.use_rules(mesh, rules):
        z0 = reference_point(params, ref_params, batch, graphdef=graphdef,
                             microbatches=microbatches)  # fmt: skip

        def sums(mb):
            loss, m = batch_loss(params, ref_params, mb, z0, graphdef=graphdef, c=c)
            out = {k: m[k] for k in ("rows", "desirable", "undesirable")}
            out.update({k: m[k] * m[w] for k, w in MEANS.items()})
            return {**out, "loss_sum": loss * m["rows"]}

        out = accumulate.sum_over(sums, batch, microbatches)
        return {**out, "z0": z0, "batches": jnp.float32(1.0)}


def summarize(sums: list[dict]) -> dict:
    total = jax.tree.map(lambda *x: float(np.sum(x)), *sharding.to_host(sums))
    out = {"eval/loss": total["loss_sum"] / max(total["rows"], 1.0)}
    out.update({f"eval/{k}": total[k] / max(total[w], 1.0) for k, w in MEANS.items()})
    out["eval/z0"] = total["z0"] / max(total["batches"], 1.0)
    return out


def compile_steps(graphdef, tx, shardings, config, mesh, rules):
    """The jitted train and eval steps with explicit shardings; state donated, reference not."""
    batch_sh = {k: sharding.batch_sharding(mesh, rules, nd) for k, nd in BATCH_NDIM.items()}
    kw = dict(graphdef=graphdef, c=config.kto, mesh=mesh, rules=rules)
    ref_sh = dpo_stage.reference_shardings(config, "kto", shardings)
    train = compiled.jit(
        train_step,
        in_shardings=(shardings, ref_sh, batch_sh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        tx=tx, grad_accum=config.train.grad_accum, **kw,
    )  # fmt: skip
    evaluate = compiled.jit(
        eval_step,
        in_shardings=(shardings["params"], ref_sh, batch_sh),
        out_shardings=sharding.replicated(mesh),
        microbatches=config.train.grad_accum, **kw,
    )  # fmt: skip
    return train, evaluate


def run(config, mesh, workdir: str):
    """KTO training; resumes from `<workdir>/checkpoints` when it holds a checkpoint."""
    c, t = config.kto, config.train
    check_config(c)
    p = dpo_stage.prepare(config, mesh, workdir, "kto", kto_data.build_kto_data)
    ref = dpo_stage.reference_params(config, p["model_cfg"], mesh, config.sharding.rules, "kto")
    return dpo_stage.train(
        config, mesh, workdir, "kto", p, compile_fn=compile_steps, summarize_fn=summarize,
        ref=ref, kl_ref=ref, loss_key="kto/loss",
        # Two sequences a row: the completion and the mismatched one (forward only).
        tokens_per_step=t.batch_size * 2 * t.seq_len, title=f"kto (beta={c.beta})",
    )  # fmt: skip
