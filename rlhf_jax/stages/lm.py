"""Language-model stage: pretraining (and, with a demonstrations dataset, SFT).

Owns the pure jitted `train_step` / `eval_step` and the `run(config, mesh, workdir)` loop:
tokenizer -> data -> sharded state (fresh, resumed from this workdir, or params from
`config.init_from`) -> steps with periodic logging, eval and checkpoints.

Host/device traffic: one batch in per step through `sharding.put_batch`; scalar metrics leave
once per log step (one `device_get` of the steps since the last log). A non-finite loss found
there stops the run naming the step, before any checkpoint of a later step is written.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import checkpoint, data, losses, metrics, sharding
from rlhf_jax import model as model_lib
from rlhf_jax import state as state_lib
from rlhf_jax import tokenizer as tok_lib

# Dense bf16 peak FLOP/s per chip, for MFU (vendor datasheets).
PEAK_FLOPS = {
    "H100": 989.4e12,
    "H200": 989.4e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops(device) -> float | None:
    kind = device.device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def flops_per_token(cfg: model_lib.ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12 L (N H) T for attention scores."""
    return 6 * n_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def model_config_from(config, vocab_size: int | None = None) -> model_lib.ModelConfig:
    """`config.model` -> ModelConfig. A zero vocab takes the tokenizer's, rounded up to 128."""
    m = config.model
    vocab = m.vocab_size or (128 * math.ceil(vocab_size / 128) if vocab_size else None)
    return model_lib.preset(
        m.size,
        family=m.family or None,
        vocab_size=vocab,
        max_len=m.max_len or None,
        n_kv_heads=m.n_kv_heads or None,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        scan_layers=m.scan_layers,
        remat=m.remat,
        attention=m.attention,
    )


def optim_config_from(train_cfg) -> state_lib.OptimConfig:
    t = train_cfg
    return state_lib.OptimConfig(
        lr=t.lr,
        warmup_steps=t.warmup_steps,
        total_steps=t.steps,
        min_lr_ratio=t.min_lr_ratio,
        weight_decay=t.weight_decay,
        b1=t.b1,
        b2=t.b2,
        grad_clip=t.grad_clip,
    )


def lm_loss(params, batch, graphdef):
    """(summed token NLL, token count) of `batch` {"inputs", "targets", "mask"} [B, T]."""
    model = state_lib.merge(graphdef, params)
    logits, _ = model(batch["inputs"])
    return losses.masked_xent(logits, batch["targets"], batch["mask"])


def train_step(state, batch, *, graphdef, tx, grad_accum: int, mesh, rules):
    """One optimizer step over `grad_accum` microbatches; tokens weighted equally.

    Args:
      state: {"step", "params", "opt_state"} (donated).
      batch: {"inputs", "targets", "mask"} each [B, T], B = global batch.

    Returns:
      (new state, {"train/loss", "train/grad_norm", "train/tokens"} scalars on device).
    """
    with sharding.use_rules(mesh, rules):
        grad_fn = jax.value_and_grad(functools.partial(lm_loss, graphdef=graphdef), has_aux=True)
        params = state["params"]
        if grad_accum == 1:
            (loss_sum, n), grads = grad_fn(params, batch)
        else:
            # [B, T] -> [A, B/A, T] keeping each device's rows local (row-major split, then swap).
            def split(x):
                x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])
                return jnp.swapaxes(x, 0, 1)

            micro = jax.tree.map(split, batch)

            def body(carry, mb):
                mb = jax.tree.map(lambda x: sharding.constrain(x, ("act_batch", None)), mb)
                (ls, cnt), g = grad_fn(params, mb)
                return jax.tree.map(jnp.add, carry, (ls, cnt, g)), None

            zero = (
                jnp.zeros((), jnp.float32),
                jnp.zeros((), jnp.float32),
                jax.tree.map(jnp.zeros_like, params),
            )
            (loss_sum, n, grads), _ = jax.lax.scan(body, zero, micro)
        n_safe = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / n_safe, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        out = {
            "train/loss": loss_sum / n_safe,
            "train/grad_norm": optax.global_norm(grads),
            "train/tokens": n,
        }
        return new_state, out


def eval_step(params, batch, *, graphdef, mesh, rules):
    """(summed NLL, token count) of one eval batch."""
    with sharding.use_rules(mesh, rules):
        return lm_loss(params, batch, graphdef)


def compile_steps(graphdef, tx, shardings, mesh, rules, grad_accum: int):
    """The jitted train and eval steps with explicit shardings; state donated."""
    batch_sh = {k: sharding.batch_sharding(mesh, rules) for k in ("inputs", "targets", "mask")}
    train = jax.jit(
        functools.partial(
            train_step, graphdef=graphdef, tx=tx, grad_accum=grad_accum, mesh=mesh, rules=rules
        ),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        functools.partial(eval_step, graphdef=graphdef, mesh=mesh, rules=rules),
        in_shardings=(shardings["params"], batch_sh),
        out_shardings=sharding.replicated(mesh),
    )
    return train, evaluate


def load_tokenizer(config, workdir: str) -> tok_lib.Tokenizer:
    """`config.tokenizer.path`, or one trained on `config.data.train` into the workdir."""
    path = config.tokenizer.path
    if path:
        return tok_lib.Tokenizer.load(path)
    path = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(path) and jax.process_index() == 0:
        docs = data.read_documents(config.data.train)
        tok_lib.train_tokenizer(
            docs,
            path,
            config.tokenizer.vocab_size,
            model_type=config.tokenizer.model_type,
            seed=config.seed,
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tokenizer")
    return tok_lib.Tokenizer.load(path)


def check_batch(config, mesh, rules):
    t = config.train
    dp = sharding.data_parallel_size(mesh, rules)
    if t.batch_size % (t.grad_accum * dp):
        raise ValueError(
            f"train.batch_size={t.batch_size} must be divisible by train.grad_accum="
            f"{t.grad_accum} x data-parallel size {dp}"
        )
    if t.batch_size % jax.process_count():
        raise ValueError(
            f"train.batch_size={t.batch_size} must be divisible by the "
            f"{jax.process_count()} processes"
        )


def _finite_or_raise(step_metrics, last_ckpt):
    for step, m in step_metrics:
        if not np.isfinite(m["train/loss"]):
            raise FloatingPointError(
                f"non-finite loss ({m['train/loss']}) at step {step}; stopping. The last "
                f"checkpoint is step {last_ckpt}, written before it."
            )


def run(config, mesh, workdir: str):
    """Pretraining loop; resumes from `<workdir>/checkpoints` when it holds a checkpoint."""
    rules = config.sharding.rules
    t = config.train
    check_batch(config, mesh, rules)
    tok = load_tokenizer(config, workdir)
    model_cfg = model_config_from(config, tok.vocab_size)
    tok.check_model_vocab(model_cfg.vocab_size)
    if model_cfg.family == "gpt2" and t.seq_len > model_cfg.max_len:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_len={model_cfg.max_len}")

    pc, pi = jax.process_count(), jax.process_index()
    train_iter, eval_batches, info = data.build_text_data(
        config.data.train,
        tok,
        seq_len=t.seq_len,
        batch_size=t.batch_size // pc,
        eval_fraction=config.data.eval_fraction,
        seed=config.seed,
        process_index=pi,
        process_count=pc,
        cache_dir=os.path.join(workdir, "cache") if config.data.cache else None,
    )
    eval_batches = eval_batches[: t.eval_batches]

    tx = state_lib.make_optimizer(optim_config_from(t))
    graphdef, abstract, shardings = state_lib.abstract_train_state(model_cfg, tx, mesh, rules)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=t.keep_ckpts)
    meta = {
        "config": config.to_dict(),
        "model": dataclasses.asdict(model_cfg),
        "tokenizer": os.path.abspath(tok.path),
    }
    start = ckpt.latest_step()
    if start is not None:
        restored, data_state, old_meta = ckpt.restore(
            start, {"params": abstract["params"], "opt_state": abstract["opt_state"]}
        )
        _check_same_model(old_meta, model_cfg, ckpt.directory)
        state = {
            "step": jax.device_put(jnp.asarray(start, jnp.int32), shardings["step"]),
            **restored,
        }
        train_iter.set_state(data_state)
    else:
        start = 0
        params = None
        if config.init_from:
            params = checkpoint.restore_params(config.init_from, abstract["params"])
        _, state, _ = state_lib.create_train_state(
            model_cfg, tx, mesh, rules, config.seed, params=params
        )
    train_fn, eval_fn = compile_steps(graphdef, tx, shardings, mesh, rules, t.grad_accum)

    n_params = model_lib.param_count(abstract["params"])
    fpt = flops_per_token(
        model_cfg,
        model_lib.param_count(abstract["params"], model_cfg, exclude_positions=True),
        t.seq_len,
    )
    peak = peak_flops(jax.devices()[0])
    schedule = state_lib.lr_schedule(optim_config_from(t))
    writer = metrics.MetricsWriter(workdir, total_steps=t.steps, start_step=start, desc="pretrain")
    writer.log(
        f"model {model_cfg.family} {config.model.size}: {n_params / 1e6:.2f}M params; "
        f"data: {info}; starting at step {start}"
    )

    pending, last_ckpt, t_last, untimed = [], (start or None), time.time(), 0
    try:
        for step in range(start, t.steps):
            batch = sharding.put_batch(next(train_iter), mesh, rules)
            state, m = train_fn(state, batch)
            s = step + 1
            pending.append((s, m))
            if step == start:
                # Time the first step (compilation) apart so tokens/s measures steady state.
                jax.block_until_ready(m)
                compile_s, t_last, untimed = time.time() - t_last, time.time(), 1
                writer.log(f"first step (compile + run) took {compile_s:.1f}s")
            is_log = s % t.log_every == 0 or s == t.steps
            is_ckpt = s % t.ckpt_every == 0 or s == t.steps
            is_eval = t.eval_every > 0 and (s % t.eval_every == 0 or s == t.steps)
            if is_ckpt and not is_log:
                _finite_or_raise(jax.device_get(pending), last_ckpt)  # never save a NaN state
            if is_log:
                host = jax.device_get(pending)
                _finite_or_raise(host, last_ckpt)
                dt = time.time() - t_last
                timed = max(len(host) - untimed, 1)
                tokens = sum(float(h["train/tokens"]) for _, h in host)
                tps = t.batch_size * t.seq_len * timed / dt
                loss = float(np.mean([h["train/loss"] for _, h in host]))
                out = {
                    "train/loss": loss,
                    "train/perplexity": math.exp(min(loss, 50.0)),
                    "train/grad_norm": float(host[-1][1]["train/grad_norm"]),
                    "train/lr": float(schedule(s - 1)),
                    "train/tokens_per_sec": tps,
                    "train/loss_tokens": tokens,
                    "train/step_time": dt / timed,
                }
                if peak:
                    out["train/mfu"] = tps * fpt / (peak * jax.device_count())
                writer.write(s, out)
                pending, t_last, untimed = [], time.time(), 0
            if is_eval and eval_batches:
                writer.write(s, evaluate(eval_fn, state["params"], eval_batches, mesh, rules))
                t_last = time.time()
            if is_ckpt:
                ckpt.save(
                    s,
                    {"params": state["params"], "opt_state": state["opt_state"]},
                    data=train_iter.get_state(),
                    meta=meta,
                )
                last_ckpt = s
    finally:
        # An exception (NaN, preemption signal, bug) still completes the checkpoint in flight.
        ckpt.close()
        writer.close()
    return state


def evaluate(eval_fn, params, batches, mesh, rules) -> dict:
    """Held-out loss and perplexity over a fixed list of host batches."""
    sums = [eval_fn(params, sharding.put_batch(b, mesh, rules)) for b in batches]
    total, count = (float(x) for x in np.sum(jax.device_get(sums), axis=0))
    loss = total / max(count, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}


def _check_same_model(meta, model_cfg, where):
    stored = (meta or {}).get("model")
    if stored is None:
        return
    current = dataclasses.asdict(model_cfg)
    # Numerics/layout options may change across a resume; shapes may not.
    ignore = {"dtype", "remat", "attention"}
    diff = {
        k: (stored.get(k), v) for k, v in current.items() if k not in ignore and stored.get(k) != v
    }
    if diff:
        k, (a, b) = next(iter(diff.items()))
        raise ValueError(
            f"checkpoint in {where} was written for a different model: "
            f"model.{k} is {a!r} there but {b!r} now"
        )
