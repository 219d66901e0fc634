"""Reward-model stage (InstructGPT step 2): the SFT model with a scalar head, trained on rankings.

`rm.batching="per_prompt"` (default) is the paper's objective: the K responses of a prompt are
scored in one pass and all its ranked pairs form ONE batch element, weighted 1/C (losses.rm_loss).
`"per_pair"` is the ablation other codebases use: every pair an independent example.

Hand-off: `init_from` an SFT (or pretraining) workdir; the backbone is restored, the unembedding
dropped and a zero-initialised scalar head added. After the last step the normalisation bias that
makes the reference responses (`rm.norm_data`, default: the SFT stage's demonstrations) score 0
on average is computed and stored in the final checkpoint's meta (`reward_bias`) and in
`<workdir>/reward_norm.json`; everything that scores with this RM adds it. The reference is
checked before training, so a run that has none stops at once, not after its last step.

K (response slots per example) is the largest comparison in the data, not `rm.k_max` (which only
bounds it): pairwise data runs with K = 2. `train.grad_accum` splits each step's batch into that
many microbatches whose gradients combine exactly to the full-batch gradient.

Accuracy (`rm/accuracy`, `eval/accuracy`, `eval/accuracy_k{K}`) counts strict wins only
(r_w > r_l); pairs the RM scores equally are reported apart as `rm/tie_frac` / `eval/tie_frac`.
So a fresh zero head at step 0 reads accuracy 0 with tie_frac 1 ("no opinion yet"), and
accuracy + tie_frac / 2 is the accuracy that counts a tie as half right.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.data import rm_data, sft_data
from rlhf_jax.infra import checkpoint, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.rl import losses
from rlhf_jax.sampling import reward
from rlhf_jax.stages import loop, setup

K_VALUES = tuple(range(2, 10))


def rm_loss(params, batch, *, graphdef, batching: str, margin: float):
    scores = reward.comparison_scores(graphdef, params, batch["tokens"], batch["mask"])
    if batching == "per_prompt":
        return losses.rm_loss(scores, batch["ranks"], batch["kmask"], margin)
    if batching == "per_pair":
        return losses.rm_loss_per_pair(scores, batch["ranks"], batch["kmask"], margin)
    raise ValueError(f"unknown rm.batching: {batching!r}; expected 'per_prompt' or 'per_pair'")


def _accumulate(fn, params, batch, *, grad_accum: int, batching: str):
    """(loss, metrics, grads) of `batch` from `grad_accum` microbatches, equal to one pass.

    Each microbatch's loss is weighted by its own denominator (prompts with a pair in
    "per_prompt", ranked pairs in "per_pair"), so the summed weighted gradients over the summed
    weights are exactly the full-batch gradient, padding rows included. Pair metrics are pooled
    over pairs and reward_mean/std over real responses, as one pass would compute them.
    """

    # [b, ...] -> [A, b/A, ...] keeping each device's rows local (row-major split, then swap).
    def split(x):
        x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    micro = jax.tree.map(split, batch)

    def weighted(p, mb):
        loss, m = fn(p, mb)
        w = m["prompts"] if batching == "per_prompt" else m["pairs"]
        return loss * w, (m, w)

    grad_fn = jax.value_and_grad(weighted, has_aux=True)

    def one(mb):
        mb = jax.tree.map(
            lambda x: sharding.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1)), mb
        )
        (lw, (m, w)), g = grad_fn(params, mb)
        n, pairs = (mb["kmask"] > 0).sum().astype(jnp.float32), m["pairs"]
        return {
            "loss_w": lw,
            "w": w,
            "grads": g,
            "pairs": pairs,
            "prompts": m["prompts"],
            "responses": n,
            "correct": m["accuracy"] * pairs,
            "ties": m["tie_frac"] * pairs,
            "margin_sum": m["margin"] * pairs,
            "score_sum": m["reward_mean"] * n,
            "score_sq": (m["reward_std"] ** 2 + m["reward_mean"] ** 2) * n,
        }

    first = jax.tree.map(lambda x: x[0], micro)
    zero = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(one, first))
    tot, _ = jax.lax.scan(lambda c, mb: (jax.tree.map(jnp.add, c, one(mb)), None), zero, micro)
    w, pairs, n = (jnp.maximum(tot[k], 1.0) for k in ("w", "pairs", "responses"))
    mean = tot["score_sum"] / n
    metrics = {
        "accuracy": tot["correct"] / pairs,
        "tie_frac": tot["ties"] / pairs,
        "margin": tot["margin_sum"] / pairs,
        "reward_mean": mean,
        "reward_std": jnp.sqrt(jnp.maximum(tot["score_sq"] / n - mean**2, 0.0)),
        "pairs": tot["pairs"],
        "prompts": tot["prompts"],
    }
    return tot["loss_w"] / w, metrics, jax.tree.map(lambda g: g / w, tot["grads"])


def train_step(state, batch, *, graphdef, tx, batching, margin, mesh, rules, grad_accum: int = 1):
    """One optimizer step on a comparison batch {"tokens", "mask" [b, K, L], "ranks", "kmask"}.

    With `grad_accum` > 1 the batch is run as that many microbatches of b / grad_accum rows and
    their gradients combined exactly (see `_accumulate`): the step equals the one-pass step.
    """
    with sharding.use_rules(mesh, rules):
        fn = functools.partial(rm_loss, graphdef=graphdef, batching=batching, margin=margin)
        if grad_accum == 1:
            (loss, m), grads = jax.value_and_grad(fn, has_aux=True)(state["params"], batch)
        else:
            loss, m, grads = _accumulate(
                fn, state["params"], batch, grad_accum=grad_accum, batching=batching
            )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        out = {
            "rm/loss": loss,
            "rm/grad_norm": optax.tree.norm(grads),
            **{f"rm/{k}": v for k, v in m.items()},
        }
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, out


def eval_step(params, batch, *, graphdef, margin, mesh, rules):
    """Sums over one K-way eval batch, so batches add up exactly."""
    with sharding.use_rules(mesh, rules):
        scores = reward.comparison_scores(graphdef, params, batch["tokens"], batch["mask"])
        loss, m = losses.rm_loss(scores, batch["ranks"], batch["kmask"], margin)
        per_k = losses.per_k_accuracy(scores, batch["ranks"], batch["kmask"], K_VALUES)
        real = batch["kmask"] > 0
        return {
            "loss_sum": loss * m["prompts"],
            "prompts": m["prompts"],
            "correct": m["accuracy"] * m["pairs"],
            "ties": m["tie_frac"] * m["pairs"],
            "pairs": m["pairs"],
            "margin_sum": m["margin"] * m["pairs"],
            "score_sum": (scores * real).sum(),
            "score_sq": (scores**2 * real).sum(),
            "responses": real.sum().astype(np.float32),
            **{f"k{k}": v for k, v in per_k.items()},
        }


def summarize(sums: list[dict]) -> dict:
    """Eval metrics from the per-batch sums of `eval_step`; accuracy is strict wins over ranked
    pairs and `eval/tie_frac` the fraction of pairs scored equally (see the module docstring)."""
    total = jax.tree.map(lambda *x: float(np.sum(x)), *sharding.to_host(sums))
    n = max(total["responses"], 1.0)
    mean = total["score_sum"] / n
    out = {
        "eval/loss": total["loss_sum"] / max(total["prompts"], 1.0),
        "eval/accuracy": total["correct"] / max(total["pairs"], 1.0),
        "eval/tie_frac": total["ties"] / max(total["pairs"], 1.0),
        "eval/margin": total["margin_sum"] / max(total["pairs"], 1.0),
        "eval/reward_mean": mean,
        "eval/reward_std": float(np.sqrt(max(total["score_sq"] / n - mean**2, 0.0))),
    }
    for k in K_VALUES:
        correct, pairs = total[f"k{k}"]
        if pairs > 0:
            out[f"eval/accuracy_k{k}"] = correct / pairs
    return out


def compile_steps(graphdef, tx, shardings, config, mesh, rules):
    """The jitted train and eval steps with explicit shardings; state donated.

    Batches are {"tokens", "mask" [b, K, L], "ranks", "kmask" [b, K]}, rows over the batch axes.
    """
    batch_sh = {
        key: sharding.batch_sharding(mesh, rules, nd)
        for key, nd in (("tokens", 3), ("mask", 3), ("ranks", 2), ("kmask", 2))
    }
    train = jax.jit(
        functools.partial(
            train_step,
            graphdef=graphdef,
            tx=tx,
            batching=config.rm.batching,
            margin=config.rm.margin,
            mesh=mesh,
            rules=rules,
            grad_accum=config.train.grad_accum,
        ),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(
            eval_step, graphdef=graphdef, margin=config.rm.margin, mesh=mesh, rules=rules
        ),
        in_shardings=(shardings["params"], batch_sh),
    )
    return train, evaluate


def backbone_params(config, model_cfg, mesh, rules, init_meta):
    """Params of `init_from` with the LM head swapped for a fresh scalar head (or kept if the
    source is already a scalar-head model)."""
    src_cfg = dataclasses.replace(model_cfg, head=init_meta["model"].get("head", "lm"))
    abstract = state_lib.abstract_params(src_cfg, mesh, rules)
    src = setup.restore_init_params(config.init_from, abstract)
    if src_cfg.head == "scalar":
        return src
    _, _, shardings = state_lib.param_shardings(model_cfg, mesh, rules)
    fresh = state_lib.init_params(model_cfg, config.seed, shardings)
    params = {k: v for k, v in src.items() if k != "lm_head"}
    params.update(score_head=fresh["score_head"], score_bias=fresh["score_bias"])
    return params


def norm_pairs(config, init_meta) -> tuple[str, list[tuple[str, str]]]:
    """The reference (prompt, response) pairs for the normalisation bias."""
    path = config.rm.norm_data
    if not path and init_meta:
        path = ((init_meta.get("config") or {}).get("data") or {}).get("train", "")
        if (init_meta.get("stage") or (init_meta.get("config") or {}).get("stage")) != "sft":
            path = ""
    if not path:
        raise ValueError(
            "set config.rm.norm_data (reference {prompt, response} JSONL): "
            "init_from is not an SFT workdir whose demonstrations could be used"
        )
    demos = sft_data.read_demos(path)[: config.rm.norm_max]
    return path, [(d["prompt"], d["response"]) for d in demos]


def run(config, mesh, workdir: str):
    """RM training loop; resumes from `<workdir>/checkpoints` when it holds a checkpoint."""
    rules = config.sharding.rules
    t = config.train
    setup.check_batch(config, mesh, rules)
    tok = setup.load_tokenizer(config, workdir)
    lm_cfg, init_meta = setup.resolve_model(config, tok)
    norm_pairs(config, init_meta)  # fail now, not after training, if there is no reference
    model_cfg = dataclasses.replace(lm_cfg, head="scalar")
    pc, pi = jax.process_count(), jax.process_index()
    train_iter, eval_batches, info = rm_data.build_rm_data(
        config.data.train,
        tok,
        template=config.data.prompt_template,
        seq_len=t.seq_len,
        batch_size=t.batch_size // pc,
        seed=config.seed,
        batching=config.rm.batching,
        k_max=config.rm.k_max,
        eval_paths=config.data.eval,
        eval_fraction=config.data.eval_fraction,
        process_index=pi,
        process_count=pc,
    )
    eval_batches = eval_batches[: t.eval_batches] if t.eval_batches > 0 else eval_batches
    optim_cfg = setup.optim_config_from(t, t.steps)
    tx = state_lib.make_optimizer(optim_cfg)
    k = 2 if config.rm.batching == "per_pair" else info["k"]
    s = loop.Setup(
        config=config,
        mesh=mesh,
        workdir=workdir,
        model_cfg=model_cfg,
        tx=tx,
        steps=t.steps,
        train_iter=train_iter,
        step_fn=None,
        loss_key="rm/loss",
        tokens_per_step=t.batch_size * k * t.seq_len,
        init_params=(lambda _: backbone_params(config, model_cfg, mesh, rules, init_meta))
        if config.init_from
        else None,
        meta=setup.checkpoint_meta(config, model_cfg, tok, "rm"),
    )
    graphdef, state, shardings, start, ckpt = loop.restore_or_init(s, rules)
    s.step_fn, eval_fn = compile_steps(graphdef, tx, shardings, config, mesh, rules)
    if eval_batches:
        s.evaluate = lambda params, step: summarize(
            [eval_fn(params, sharding.put_batch(b, mesh, rules)) for b in eval_batches]
        )

    def final_meta(params):
        path, pairs = norm_pairs(config, init_meta)
        raw = reward.score_texts(
            graphdef,
            params,
            tok,
            pairs,
            template=config.data.prompt_template,
            seq_len=t.seq_len,
            mesh=mesh,
            rules=rules,
        )
        bias = -float(np.mean(raw))
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "reward_norm.json"), "w") as f:
                json.dump(
                    {
                        "reward_bias": bias,
                        "reference": path,
                        "n": len(pairs),
                        "raw_mean": float(np.mean(raw)),
                        "raw_std": float(np.std(raw)),
                    },
                    f,
                    indent=1,
                )
        return {"reward_bias": bias, "reward_norm_reference": path}

    s.final_meta = final_meta
    n_params = model_lib.param_count(state["params"])
    if jax.process_index() == 0:
        print(
            f"rm ({config.rm.batching}): {model_cfg.family} {n_params / 1e6:.2f}M params; "
            f"data: {info}; {t.steps} steps; starting at step {start}",
            flush=True,
        )
    return loop.train(s, state, start, ckpt, schedule=state_lib.lr_schedule(optim_cfg))


def load_bias(workdir: str) -> float:
    """The normalisation bias stored with an RM checkpoint (0 if it was never computed)."""
    meta = checkpoint.read_meta(workdir) or {}
    return float(meta.get("reward_bias", 0.0))
