"""Language-model stage: pretraining (`stage="pretrain"`) and supervised fine-tuning (`"sft"`).

Owns the pure jitted `train_step` / `eval_step` and the `run(config, mesh, workdir)` loop:
tokenizer -> data -> sharded state (fresh, resumed from this workdir, or params from
`config.init_from`) -> steps with periodic logging, eval and checkpoints. The two stages differ
only in their data: packed text with every token a target, or demonstrations with the loss on
response tokens only (see data_demos.py); SFT evals also log sampled completions.

Host/device traffic: one batch in per step through `sharding.put_batch`; scalar metrics leave
once per log step (one `device_get` of the steps since the last log). A non-finite loss found
there stops the run naming the step, before any checkpoint of a later step is written.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.data import lm_data, packing, sft_data
from rlhf_jax.infra import compiled, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.rl import losses
from rlhf_jax.stages import accumulate, loop, setup


def lm_sums(params, batch, graphdef):
    """(summed token NLL, token count) of `batch` {"inputs", "targets", "mask"} [B, T], and for
    packed rows "segments" and "positions" (data/packing.py): attention stays within each
    example, positions restart per example."""
    model = state_lib.merge(graphdef, params)
    if "segments" in batch:
        logits, _ = model(batch["inputs"], positions=batch["positions"], key_mask=batch["segments"])
    else:
        logits, _ = model(batch["inputs"])
    return losses.masked_xent(logits, batch["targets"], batch["mask"])


def lm_loss(params, batch, graphdef):
    """(mean token NLL, {"tokens": count}): the loss as `accumulate` takes it, a mean over the
    tokens it reports, so microbatches with more real tokens weigh more."""
    nll_sum, n = lm_sums(params, batch, graphdef)
    return nll_sum / jnp.maximum(n, 1.0), {"tokens": n}


def train_step(state, batch, *, graphdef, tx, grad_accum: int, mesh, rules):
    """One optimizer step over `grad_accum` microbatches; tokens weighted equally.

    Args:
      state: {"step", "params", "opt_state"} (donated).
      batch: {"inputs", "targets", "mask"} each [B, T], B = global batch.

    Returns:
      (new state, {"train/loss", "train/grad_norm", "train/tokens"} scalars on device).
    """
    with sharding.use_rules(mesh, rules):
        params = state["params"]
        fn = functools.partial(lm_loss, graphdef=graphdef)
        loss, m, grads = accumulate.accumulate(
            fn, params, batch, grad_accum, weight="tokens", means={}
        )
        new_params, opt_state = state_lib.apply_gradients(tx, grads, params, state["opt_state"])
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        out = {
            "train/loss": loss,
            "train/grad_norm": optax.tree.norm(grads),
            "train/tokens": m["tokens"],
        }
        return new_state, out


def eval_step(params, batch, *, graphdef, mesh, rules, microbatches: int = 1):
    """(summed NLL, token count) of one eval batch, in `microbatches` sequential pieces (the
    train step's, so the eval's logits and activations are never larger than a microbatch's)."""
    with sharding.use_rules(mesh, rules):
        fn = functools.partial(lm_sums, params, graphdef=graphdef)
        return accumulate.sum_over(fn, batch, microbatches)


BATCH_FIELDS = ("inputs", "targets", "mask")


def compile_steps(graphdef, tx, shardings, mesh, rules, grad_accum: int, packed: bool = False):
    """The jitted train and eval steps with explicit shardings; state donated. Both run a batch
    in `grad_accum` microbatches; `packed` batches carry segments and positions too."""
    fields = BATCH_FIELDS + (packing.PACKED_FIELDS if packed else ())
    batch_sh = {k: sharding.batch_sharding(mesh, rules) for k in fields}
    train = compiled.jit(
        train_step,
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        graphdef=graphdef, tx=tx, grad_accum=grad_accum, mesh=mesh, rules=rules,
    )  # fmt: skip
    evaluate = compiled.jit(
        eval_step,
        in_shardings=(shardings["params"], batch_sh),
        out_shardings=sharding.replicated(mesh),
        graphdef=graphdef, mesh=mesh, rules=rules, microbatches=grad_accum,
    )  # fmt: skip
    return train, evaluate


def build_data(config, tok, workdir: str):
    """(train iterator, eval batches, held-out demos for sampling or [], info) for the stage."""
    t = config.train
    pc, pi = jax.process_count(), jax.process_index()
    if config.stage == "pretrain":
        cache = os.path.join(workdir, "cache") if config.data.cache else None
        it, evals, info = lm_data.build_text_data(
            config.data.train,
            tok,
            seq_len=t.seq_len,
            batch_size=t.batch_size // pc,
            eval_fraction=config.data.eval_fraction,
            seed=config.seed,
            process_index=pi,
            process_count=pc,
            cache_dir=cache,
        )
        return it, evals, [], info
    if config.stage == "sft":
        return sft_data.build_sft_data(
            config.data.train,
            tok,
            template=config.data.prompt_template,
            seq_len=t.seq_len,
            batch_size=t.batch_size // pc,
            seed=config.seed,
            eval_paths=config.data.eval,
            eval_fraction=config.data.eval_fraction,
            process_index=pi,
            process_count=pc,
            packed=setup.is_packed(config),
        )
    raise ValueError(f"unknown LM stage: {config.stage!r}; expected 'pretrain' or 'sft'")


def total_steps(config, info) -> int:
    """`train.steps`, or `train.epochs` passes over the SFT rows (demonstrations, or packed rows
    of them) when set."""
    t = config.train
    if config.stage == "sft" and t.epochs > 0 and t.steps > 0:
        raise ValueError(
            f"train.epochs={t.epochs} and train.steps={t.steps} are both set; SFT trains for "
            "one of them: set train.epochs=0 to train for train.steps, or train.steps=0"
        )
    if config.stage == "sft" and t.epochs > 0:
        rows = info.get("train_rows", info["train_demos"])  # packed rows, else one per demo
        return max(1, math.ceil(t.epochs * rows / t.batch_size))
    return t.steps


def run(config, mesh, workdir: str):
    """Pretraining / SFT loop; resumes from `<workdir>/checkpoints` when it holds a checkpoint."""
    rules = config.sharding.rules
    t = config.train
    setup.check_batch(config, mesh, rules)
    tok = setup.load_tokenizer(config, workdir)
    model_cfg, _ = setup.resolve_model(config, tok)
    if model_cfg.family == "gpt2" and t.seq_len > model_cfg.max_len:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_len={model_cfg.max_len}")
    train_iter, eval_batches, eval_demos, info = build_data(config, tok, workdir)
    eval_batches = eval_batches[: t.eval_batches]
    steps = total_steps(config, info)

    optim_cfg = setup.optim_config_from(t, steps)
    tx = state_lib.make_optimizer(optim_cfg)

    def init_params(abstract_params):
        if config.init_from:  # hand-off: params only, fresh optimizer
            return setup.restore_init_params(config.init_from, abstract_params, rules=rules)
        return None

    s = loop.Setup(
        data_info=packing.info_metrics(info),
        config=config,
        mesh=mesh,
        workdir=workdir,
        model_cfg=model_cfg,
        tx=tx,
        steps=steps,
        train_iter=train_iter,
        step_fn=None,
        loss_key="train/loss",
        tokens_per_step=t.batch_size * t.seq_len,
        perplexity=True,  # an LM loss: exp(loss) is the training perplexity
        init_params=init_params,
        meta=setup.checkpoint_meta(config, model_cfg, tok, config.stage),
    )
    graphdef, state, shardings, start, ckpt = loop.restore_or_init(s, rules)
    train_fn, eval_fn = compile_steps(
        graphdef, tx, shardings, mesh, rules, t.grad_accum, setup.is_packed(config)
    )
    s.step_fn = train_fn
    if eval_batches:
        s.evaluate = lambda params, step: evaluate(eval_fn, params, eval_batches, mesh, rules)
    if eval_demos and config.sft.eval_samples > 0:
        from rlhf_jax.stages import samples as samples_lib  # the sampler compiles lazily

        sampler = samples_lib.EvalSampler(
            graphdef, model_cfg, tok, config, mesh, eval_demos[: config.sft.eval_samples]
        )
        s.on_eval = lambda params, step, writer: writer.write_text(
            step, "eval/samples", sampler(params, step)
        )
    n_params = model_lib.param_count(state["params"])
    n_params_no_pos = model_lib.param_count(state["params"], model_cfg, exclude_positions=True)
    s.flops_per_token = setup.flops_per_token(model_cfg, n_params_no_pos, t.seq_len)
    print(
        f"{config.stage}: {model_cfg.family} {n_params / 1e6:.2f}M params; data: {info}; "
        f"{steps} steps; starting at step {start}",
        flush=True,
    )
    return loop.train(s, state, start, ckpt, schedule=state_lib.lr_schedule(optim_cfg))


def evaluate(eval_fn, params, batches, mesh, rules) -> dict:
    """Held-out loss and perplexity over a fixed list of host batches."""
    sums = [eval_fn(params, sharding.put_batch(b, mesh, rules)) for b in batches]
    total, count = (float(x) for x in np.sum(jax.device_get(sums), axis=0))
    loss = total / max(count, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
