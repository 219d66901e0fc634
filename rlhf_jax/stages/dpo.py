"""DPO stage: the SFT policy trained directly on the reward model's comparisons, no RM, no RL.

The data are the comparisons the RM reads (data/dpo_data.py: same files, forms, ranks and
held-out split), and a K-way ranking is used whole: all ranked pairs of a prompt are ONE batch
element weighted 1/C as the RM loss weighs them (`dpo.loss=sigmoid`, `ipo`; conservative DPO
with `dpo.label_smoothing`), or the whole ranking's Plackett-Luce likelihood
(`dpo.loss=plackett_luce`); rlhf_jax/rl/dpo.py has the math and says how ties are treated.

Policy and reference: the policy starts from `init_from` (an SFT workdir, or `hf:DIR`); the
frozen reference is `dpo.reference_from`, else the same `init_from` checkpoint (else, with no
`init_from`, the policy's own seeded initial params, for tests). Reference log-probs are
computed IN THE STEP, as one more forward pass on the frozen params (an ordinary argument,
never donated, never in the optimizer): for one epoch this is the same work as a pass over the
data up front, it needs no second copy of the data or a table to keep in step with the
shuffled iterator, and it resumes with nothing extra to restore. Log-probs sum over response
tokens only (EOS included), from the float32 head.

Resuming is the supervised loop's (stages/loop.py): params, optimizer state and the data
position from `<workdir>/checkpoints`; the reference is restored again from its source.

Metrics: `dpo/loss`, `dpo/accuracy` (implicit-reward wins r_w > r_l over ranked pairs;
`dpo/tie_frac` the equal ones, all of them at step 0), `dpo/margin` (mean r_w - r_l),
`dpo/chosen_logp` / `dpo/rejected_logp` and `dpo/chosen_reward` / `dpo/rejected_reward` (means
over pairs of winner and loser), the same under `eval/` on the held-out comparisons, and
`eval/kl`: KL(policy || reference) in nats per response, the mean over `dpo.kl_prompts`
held-out prompts of log pi(y|x) - log pi_ref(y|x) for y sampled from the policy at
temperature 1 (`eval/kl_sem` its standard error).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.data import dpo_data, sft_data
from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.rl import dpo, losses
from rlhf_jax.sampling import sampler
from rlhf_jax.stages import loop, setup

BATCH_NDIM = {"tokens": 3, "mask": 3, "ranks": 2, "kmask": 2, "prompt_len": 1}


def check_config(c) -> None:
    """One clear sentence for a bad `config.dpo`."""
    if c.loss not in dpo.LOSSES:
        raise ValueError(f"unknown dpo.loss: {c.loss!r}; expected one of {dpo.LOSSES}")
    if not c.beta > 0:
        raise ValueError(f"dpo.beta must be > 0, got {c.beta}")
    if not 0.0 <= c.label_smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {c.label_smoothing}")
    if c.label_smoothing and c.loss != "sigmoid":
        raise ValueError(
            f"dpo.label_smoothing={c.label_smoothing} applies to dpo.loss='sigmoid' only, "
            f"not {c.loss!r}"
        )


def response_logprobs(graphdef, params, tokens, mask, prompt_len):
    """log pi(response | prompt) [P, K] of comparison rows tokens [P, K, L] (right-padded).

    Sums the float32 log-probs of the tokens at positions >= prompt_len [P] where `mask` is
    True. Causal attention keeps right padding out of every real token, so no key mask.
    """
    p, k, n = tokens.shape
    flat = tokens.reshape(p * k, n)
    model = state_lib.merge(graphdef, params)
    hidden, _ = model(flat, return_hidden=True)
    logp = losses.token_logprobs(model.unembed(hidden[:, :-1]), flat[:, 1:])  # [PK, L-1]
    start = jnp.repeat(prompt_len, k)[:, None]  # [PK, 1]
    scored = mask.reshape(p * k, n)[:, 1:] & (jnp.arange(1, n)[None, :] >= start)
    return jnp.where(scored, logp, 0.0).sum(axis=-1).reshape(p, k)


def batch_loss(params, ref_params, batch, *, graphdef, c):
    args = (batch["tokens"], batch["mask"], batch["prompt_len"])
    logp = response_logprobs(graphdef, params, *args)
    logp_ref = response_logprobs(graphdef, ref_params, *args)
    return dpo.dpo_loss(
        logp,
        logp_ref,
        batch["ranks"],
        batch["kmask"],
        beta=c.beta,
        loss=c.loss,
        label_smoothing=c.label_smoothing,
    )


def _accumulate(fn, params, ref_params, batch, grad_accum: int):
    """(loss, metrics, grads) of `batch` from `grad_accum` microbatches, equal to one pass.

    Each microbatch's loss is weighted by its prompts with a pair (the loss's denominator), so
    the summed weighted gradients over the summed weights are the full-batch gradient; pair
    metrics are pooled over pairs, as one pass pools them.
    """

    def split(x):  # [b, ...] -> [A, b/A, ...], each device's rows kept local
        return jnp.swapaxes(x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]), 0, 1)

    def weighted(p, mb):
        loss, m = fn(p, ref_params, mb)
        return loss * m["prompts"], m

    grad_fn = jax.value_and_grad(weighted, has_aux=True)

    def one(mb):
        mb = jax.tree.map(
            lambda x: sharding.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1)), mb
        )
        (lw, m), g = grad_fn(params, mb)
        out = {"loss_w": lw, "grads": g, "prompts": m["prompts"], "pairs": m["pairs"]}
        return {**out, **{k: m[k] * m["pairs"] for k in PAIR_MEANS}}

    micro = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], micro)
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(one, first))
    tot, _ = jax.lax.scan(lambda c, mb: (jax.tree.map(jnp.add, c, one(mb)), None), zero, micro)
    w, pairs = jnp.maximum(tot["prompts"], 1.0), jnp.maximum(tot["pairs"], 1.0)
    metrics = {k: tot[k] / pairs for k in PAIR_MEANS}
    metrics.update(pairs=tot["pairs"], prompts=tot["prompts"])
    return tot["loss_w"] / w, metrics, jax.tree.map(lambda g: g / w, tot["grads"])


def train_step(state, ref_params, batch, *, graphdef, tx, c, mesh, rules, grad_accum: int = 1):
    """One optimizer step on a comparison batch (data/dpo_data.py layout); with `grad_accum`
    > 1 as that many microbatches whose gradients combine exactly (`_accumulate`)."""
    with sharding.use_rules(mesh, rules):
        fn = functools.partial(batch_loss, graphdef=graphdef, c=c)
        if grad_accum == 1:
            grad_fn = jax.value_and_grad(fn, has_aux=True)
            (loss, m), grads = grad_fn(state["params"], ref_params, batch)
        else:
            loss, m, grads = _accumulate(fn, state["params"], ref_params, batch, grad_accum)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        out = {
            "dpo/loss": loss,
            "dpo/grad_norm": optax.tree.norm(grads),
            **{f"dpo/{k}": v for k, v in m.items()},
        }
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, out


PAIR_MEANS = (
    "accuracy",
    "tie_frac",
    "margin",
    "chosen_reward",
    "rejected_reward",
    "chosen_logp",
    "rejected_logp",
)


def eval_step(params, ref_params, batch, *, graphdef, c, mesh, rules):
    """Sums over one eval batch, so batches add up exactly."""
    with sharding.use_rules(mesh, rules):
        loss, m = batch_loss(params, ref_params, batch, graphdef=graphdef, c=c)
        out = {"loss_sum": loss * m["prompts"], "prompts": m["prompts"], "pairs": m["pairs"]}
        return {**out, **{k: m[k] * m["pairs"] for k in PAIR_MEANS}}


def summarize(sums: list[dict]) -> dict:
    total = jax.tree.map(lambda *x: float(np.sum(x)), *sharding.to_host(sums))
    pairs = max(total["pairs"], 1.0)
    return {
        "eval/loss": total["loss_sum"] / max(total["prompts"], 1.0),
        **{f"eval/{k}": total[k] / pairs for k in PAIR_MEANS},
    }


def compile_steps(graphdef, tx, shardings, config, mesh, rules):
    """The jitted train and eval steps with explicit shardings; state donated, reference not."""
    batch_sh = {k: sharding.batch_sharding(mesh, rules, nd) for k, nd in BATCH_NDIM.items()}
    kw = dict(graphdef=graphdef, c=config.dpo, mesh=mesh, rules=rules)
    train = jax.jit(
        functools.partial(train_step, tx=tx, grad_accum=config.train.grad_accum, **kw),
        in_shardings=(shardings, shardings["params"], batch_sh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, **kw),
        in_shardings=(shardings["params"], shardings["params"], batch_sh),
        out_shardings=sharding.replicated(mesh),
    )
    return train, evaluate


def make_kl_eval(config, graphdef, ref_params, tok, prompts, mesh, rules):
    """(params) -> {"eval/kl", "eval/kl_sem", "eval/response_length"} on held-out prompts, or
    None when there are none. The same prompts and sampling keys at every eval, so the curve
    moves with the policy, not with the draw; every process holds the whole batch."""
    c = config.dpo
    prompts = prompts[: c.kl_prompts]
    if not prompts:
        return None
    ex, _ = sft_data.encode_prompts(prompts, tok, config.data.prompt_template, c.kl_prompt_len)
    n = len(prompts)
    width = math.lcm(sharding.data_parallel_size(mesh, rules), jax.process_count())
    rows = np.arange(-(-n // width) * width) % n  # repeats fill the last devices, not counted
    root = jax.random.fold_in(jax.random.key(config.seed), 17)
    host = {
        "tokens": ex["tokens"][rows],
        "mask": ex["mask"][rows],
        "keys": jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(len(rows))),
    }
    p = c.kl_prompt_len

    def seq_kl(params, ref, tokens, mask, response_mask):
        with sharding.use_rules(mesh, rules):
            full = jnp.concatenate([mask, response_mask], axis=1)
            lp = lambda w: sampler.sequence_logprobs(graphdef, w, tokens, full, start=p - 1)
            diff = jnp.where(response_mask, lp(params) - lp(ref), 0.0)  # [B, T]
            return diff.sum(axis=1)

    rows_sh = lambda nd: sharding.batch_sharding(mesh, rules, nd)
    kl_fn = jax.jit(seq_kl, in_shardings=(None, None, rows_sh(2), rows_sh(2), rows_sh(2)))

    def evaluate(params):
        dev = sharding.put_global(host, mesh, rules)
        out = sampler.generate(
            graphdef,
            params,
            dev["tokens"],
            dev["mask"],
            dev["keys"],
            max_new_tokens=c.kl_max_new_tokens,
            eos_id=tok.eos_ids,
            pad_id=tok.pad_id,
            mesh=mesh,
            rules=rules,
        )
        kl = kl_fn(params, ref_params, out["tokens"], dev["mask"], out["response_mask"])
        kl, lengths = sharding.to_host((kl, out["lengths"]))
        kl = kl[:n].astype(np.float64)
        return {
            "eval/kl": float(kl.mean()),
            "eval/kl_sem": float(kl.std() / math.sqrt(n)),
            "eval/response_length": float(lengths[:n].mean()),
        }

    return evaluate


def reference_params(config, model_cfg, mesh, rules):
    """The frozen reference: `dpo.reference_from`, else `init_from`, else the seeded init."""
    _, _, p_shard = state_lib.param_shardings(model_cfg, mesh, rules)
    src = config.dpo.reference_from or config.init_from
    if not src:
        return state_lib.init_params(model_cfg, config.seed, p_shard)
    if config.dpo.reference_from:
        meta = setup.read_init_meta(src) or {}
        setup.check_same_model(meta, model_cfg, src)
        if meta.get("model", {}).get("head", "lm") != "lm":
            raise ValueError(f"dpo.reference_from {src!r} is not an LM-head model")
    return setup.restore_init_params(src, state_lib.abstract_params(model_cfg, mesh, rules))


def run(config, mesh, workdir: str):
    """DPO training loop; resumes from `<workdir>/checkpoints` when it holds a checkpoint."""
    rules = config.sharding.rules
    t, c = config.train, config.dpo
    check_config(c)
    setup.check_batch(config, mesh, rules)
    tok = setup.load_tokenizer(config, workdir)
    model_cfg, _ = setup.resolve_model(config, tok)
    if model_cfg.head != "lm":
        raise ValueError(
            f"init_from {config.init_from!r} has a {model_cfg.head!r} head; DPO "
            "trains a policy (an SFT or pretraining workdir)"
        )
    kl_len = c.kl_prompt_len + c.kl_max_new_tokens
    if c.kl_prompts and model_cfg.family == "gpt2" and kl_len > model_cfg.max_len:
        raise ValueError(
            f"dpo.kl_prompt_len + dpo.kl_max_new_tokens = {kl_len} exceeds "
            f"model.max_len={model_cfg.max_len}"
        )
    pc, pi = jax.process_count(), jax.process_index()
    train_iter, eval_batches, eval_prompts, info = dpo_data.build_dpo_data(
        config.data.train,
        tok,
        template=config.data.prompt_template,
        seq_len=t.seq_len,
        batch_size=t.batch_size // pc,
        seed=config.seed,
        k_max=c.k_max,
        eval_paths=config.data.eval,
        eval_fraction=config.data.eval_fraction,
        process_index=pi,
        process_count=pc,
    )
    eval_batches = eval_batches[: t.eval_batches] if t.eval_batches > 0 else eval_batches
    optim_cfg = setup.optim_config_from(t, t.steps)
    tx = state_lib.make_optimizer(optim_cfg)
    ref = reference_params(config, model_cfg, mesh, rules)
    s = loop.Setup(
        config=config,
        mesh=mesh,
        workdir=workdir,
        model_cfg=model_cfg,
        tx=tx,
        steps=t.steps,
        train_iter=train_iter,
        step_fn=None,
        loss_key="dpo/loss",
        tokens_per_step=t.batch_size * info["k"] * t.seq_len,
        init_params=(lambda a: setup.restore_init_params(config.init_from, a))
        if config.init_from
        else None,
        meta=setup.checkpoint_meta(config, model_cfg, tok, "dpo"),
    )
    graphdef, state, shardings, start, ckpt = loop.restore_or_init(s, rules)
    train_fn, eval_fn = compile_steps(graphdef, tx, shardings, config, mesh, rules)
    s.step_fn = lambda st, batch: train_fn(st, ref, batch)
    kl_eval = make_kl_eval(config, graphdef, ref, tok, eval_prompts, mesh, rules)

    def evaluate(params, step):
        out = {}
        if eval_batches:
            put = lambda b: sharding.put_batch(b, mesh, rules)
            out.update(summarize([eval_fn(params, ref, put(b)) for b in eval_batches]))
        if kl_eval is not None:
            out.update(kl_eval(params))
        return out

    if eval_batches or kl_eval is not None:
        s.evaluate = evaluate
    if pi == 0:
        n_params = model_lib.param_count(state["params"])
        print(
            f"dpo ({c.loss}, beta={c.beta}): {model_cfg.family} {n_params / 1e6:.2f}M params; "
            f"data: {info}; {t.steps} steps; starting at step {start}",
            flush=True,
        )
    return loop.train(s, state, start, ckpt, schedule=state_lib.lr_schedule(optim_cfg))
