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

Packed rows (`data.packing`): whole comparisons several to a row of K L positions
(data/packing.py `pack_comparisons`), each response scored at its segment's last token
(reward.batch_scores); the same loss.
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

from rlhf_jax.data import packing, rm_data, sft_data
from rlhf_jax.infra import checkpoint, compiled, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import lora
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.rl import losses
from rlhf_jax.sampling import reward
from rlhf_jax.stages import accumulate, loop, setup

K_VALUES = tuple(range(2, 10))


PAIR_MEANS = ("accuracy", "tie_frac", "margin")  # pooled over ranked pairs
# Pooled over real responses: reward_std is not a mean, so the loss reports the moments that
# pool (each microbatch's variance and squared mean) and `pooled_std` combines them after.
RESPONSE_MEANS = ("reward_mean", "reward_var", "reward_mean_sq")


def rm_loss(params, batch, *, graphdef, batching: str, margin: float):
    """(loss, metrics) of a comparison batch {"tokens", "mask" [b, K, L], "ranks", "kmask"}.

    The loss is a mean over prompts with a pair ("per_prompt") or over ranked pairs
    ("per_pair"), both counted in the metrics; the metrics are those of `losses.rm_loss` with
    reward_std replaced by the moments it pools from (RESPONSE_MEANS) and "responses", the
    number of real responses they are means over.
    """
    scores, ranks, kmask = reward.batch_scores(graphdef, params, batch)  # [b, K]
    if batching == "per_prompt":
        loss, m = losses.rm_loss(scores, ranks, kmask, margin)
    elif batching == "per_pair":
        loss, m = losses.rm_loss_per_pair(scores, ranks, kmask, margin)
    else:
        raise ValueError(f"unknown rm.batching: {batching!r}; expected 'per_prompt' or 'per_pair'")
    real = kmask > 0  # [b, K]
    n = real.sum().astype(jnp.float32)
    del m["reward_std"]
    centred = jnp.where(real, scores.astype(jnp.float32) - m["reward_mean"], 0.0)  # [b, K]
    m["responses"] = n
    m["reward_var"] = jnp.square(centred).sum() / jnp.maximum(n, 1.0)
    m["reward_mean_sq"] = jnp.square(m["reward_mean"])
    return loss, m


def pooled_std(m: dict) -> dict:
    """Metrics with reward_std from the pooled moments (the variance within microbatches plus
    that of their means about the pooled mean; with one microbatch, the batch's own variance),
    the moments and the response count dropped."""
    m = dict(m)
    # Between-microbatch term first: it is exactly 0 with one microbatch (the same square), so
    # the std is then the batch's two-pass one, with no cancellation against the squared mean.
    between = m.pop("reward_mean_sq") - jnp.square(m["reward_mean"])
    var = m.pop("reward_var") + between
    m["reward_std"] = jnp.sqrt(jnp.maximum(var, 0.0))
    del m["responses"]
    return m


def train_step(state, batch, *, graphdef, tx, batching, margin, mesh, rules, grad_accum: int = 1):
    """One optimizer step on a comparison batch {"tokens", "mask" [b, K, L], "ranks", "kmask"}.

    With `grad_accum` > 1 the batch is run as that many microbatches of b / grad_accum rows whose
    gradients combine exactly (stages/accumulate.py: each microbatch's loss weighs by its
    prompts with a pair, or its pairs per pair; pair metrics pool over pairs, reward moments
    over real responses): the step equals the one-pass step.
    """
    with sharding.use_rules(mesh, rules):
        fn = functools.partial(rm_loss, graphdef=graphdef, batching=batching, margin=margin)
        means = dict.fromkeys(PAIR_MEANS, "pairs") | dict.fromkeys(RESPONSE_MEANS, "responses")
        weight = "prompts" if batching == "per_prompt" else "pairs"
        loss, m, grads = accumulate.accumulate(
            fn, state["params"], batch, grad_accum, weight=weight, means=means, sums=("prompts",)
        )
        # The loss sees score differences only, so the head's bias has a zero gradient but for
        # float rounding (~1e-12), which Adam's normalisation turns into steps of +-lr: a
        # random walk that shifted every score of 2 processes 1.5e-5 from 1 process's in 4
        # steps. The bias stays where it started (0 for a fresh head); rm.norm_data's
        # reward_bias centres the scores after training.
        if "score_bias" in grads:
            grads = {**grads, "score_bias": jnp.zeros_like(grads["score_bias"])}
        params, opt_state = state_lib.apply_gradients(
            tx, grads, state["params"], state["opt_state"]
        )
        out = {
            "rm/loss": loss,
            "rm/grad_norm": optax.tree.norm(grads),
            **{f"rm/{k}": v for k, v in pooled_std(m).items()},
        }
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, out


def eval_step(params, batch, *, graphdef, margin, mesh, rules):
    """Sums over one K-way eval batch, so batches add up exactly."""
    with sharding.use_rules(mesh, rules):
        scores, ranks, kmask = reward.batch_scores(graphdef, params, batch)
        loss, m = losses.rm_loss(scores, ranks, kmask, margin)
        per_k = losses.per_k_accuracy(scores, ranks, kmask, K_VALUES)
        real = kmask > 0
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

    Batches are {"tokens", "mask" [b, K, L], "ranks", "kmask" [b, K]}, or packed rows
    (`data.packing`, reward.batch_scores), rows over the batch axes.
    """
    ndim = {"tokens": 3, "mask": 3, "ranks": 2, "kmask": 2}
    if setup.is_packed(config):
        ndim = {k: nd for k, (nd, _) in packing.comparison_fields(scored=False).items()}
    batch_sh = {key: sharding.batch_sharding(mesh, rules, nd) for key, nd in ndim.items()}
    train = compiled.jit(
        train_step,
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        graphdef=graphdef, tx=tx, batching=config.rm.batching, margin=config.rm.margin,
        mesh=mesh, rules=rules, grad_accum=config.train.grad_accum,
    )  # fmt: skip
    evaluate = compiled.jit(
        eval_step,
        in_shardings=(shardings["params"], batch_sh),
        graphdef=graphdef, margin=config.rm.margin, mesh=mesh, rules=rules,
    )  # fmt: skip
    return train, evaluate


def backbone_params(config, model_cfg, mesh, rules, init_meta):
    """Params of `init_from` with the LM head swapped for a fresh scalar head (or kept if the
    source is already a scalar-head model): the model without adapters (a LoRA model's base)."""
    model_cfg = lora.base_config(model_cfg)
    src_cfg = dataclasses.replace(model_cfg, head=init_meta["model"].get("head", "lm"))
    abstract = state_lib.abstract_params(src_cfg, mesh, rules)
    src = setup.restore_init_params(config.init_from, abstract, rules=rules)
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
        packed=setup.is_packed(config),
    )
    eval_batches = eval_batches[: t.eval_batches] if t.eval_batches > 0 else eval_batches
    optim_cfg = setup.optim_config_from(t, t.steps)
    tx = state_lib.make_optimizer(optim_cfg)
    k = 2 if config.rm.batching == "per_pair" else info["k"]
    s = loop.Setup(
        data_info=packing.info_metrics(info),
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
