"""The training loop every trainable stage shares (LM, SFT, RM, DPO, GRPO, PPO).

A stage brings its step and its data; this module owns what is the same for all of them:
restoring or creating the state, the step loop, one `device_get` of scalar metrics per log step,
the NaN/Inf stop (before any later checkpoint is written), eval hooks, async checkpoints with the
data-iterator position, and progress/metrics output (JSONL, TensorBoard, wandb when
config.log.wandb is on).

Hooks for a stage that is more than one model and one optimizer (PPO):
  `layout`      the train state and its checkpoint items (PPO: policy as "params", "value",
                "opt_state" of both), with its own fresh-state builder;
  `host_state`  host-side state saved in each checkpoint's meta and restored on resume
                (PPO: the adaptive KL coefficient), `get_state() -> dict` / `set_state(meta)`;
  `after_step`  `(n, step metrics, is_log, writer)` run on the host after every step, before
                the NaN check, evals and checkpoints (PPO: the KL controller, the sample table);
  `train_iter`  any iterator with `get_state`/`set_state` (PPO and GRPO: prompts and ptx text,
                rl_data.RolloutData).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.infra import checkpoint, metrics, plan, preemption, sharding, tracking
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import lora
from rlhf_jax.stages import setup as setup_lib


def _one_model_items(state) -> dict:
    return {"params": state["params"], "opt_state": state["opt_state"]}


def _same(items) -> dict:
    return dict(items)


@dataclasses.dataclass
class Layout:
    """A train state other than one model + one optimizer, and how it maps to checkpoint items.

    `to_items` must be a pure restructuring: applied to `abstract` it gives the restore target.
    """

    abstract: dict  # the state without "step": abstract arrays carrying their shardings
    shardings: dict  # the state's shardings, "step" included
    init: Callable  # () -> a fresh state without "step" (a run with no checkpoint yet)
    to_items: Callable = _one_model_items  # state -> {item name: tree} written to a checkpoint
    from_items: Callable = _same  # restored {item name: tree} -> the state without "step"


@dataclasses.dataclass
class Setup:
    """What a stage hands to `train`. `init_params` builds params for a fresh (not resumed) run."""

    config: object
    mesh: object
    workdir: str
    model_cfg: object
    tx: object
    steps: int
    train_iter: object
    step_fn: Callable  # (state, device batch) -> (state, metrics dict of scalars)
    loss_key: str  # the metric checked for NaN/Inf, e.g. "train/loss"
    tokens_per_step: int  # for tokens/s
    flops_per_token: float | None = None  # for MFU
    evaluate: Callable | None = None  # (params, step) -> dict of metrics, or None
    on_eval: Callable | None = None  # (params, step, writer) -> None, e.g. log samples
    init_params: Callable | None = None  # (abstract_params) -> sharded params, or None
    final_meta: Callable | None = None  # (params) -> dict merged into the last checkpoint's meta
    meta: dict = dataclasses.field(default_factory=dict)
    perplexity: bool = False  # log <ns>/perplexity = exp(loss): LM losses only (pretrain, SFT)
    layout: Layout | None = None  # None: one model from model_cfg with the optimizer tx
    host_state: object | None = None  # get_state() -> dict in each meta; set_state(meta)
    after_step: Callable | None = None  # (n, metrics, is_log, writer) -> None, on the host
    # Logged once with a fresh run's first training row (packing.info_metrics: rows, padding).
    data_info: dict = dataclasses.field(default_factory=dict)


def _finite_or_raise(step_metrics, key, last_ckpt):
    for step, m in step_metrics:
        if not np.isfinite(m[key]):
            where = (
                f"the last checkpoint is step {last_ckpt}, written before it"
                if last_ckpt
                else "no checkpoint was written before it"
            )
            raise FloatingPointError(
                f"non-finite loss ({m[key]}) at step {step}; stopping: {where}"
            )


def restore_or_init(s: Setup, rules):
    """(graphdef, state, shardings, start step, checkpointer): resumed from the workdir, or
    fresh. graphdef is None with a custom `s.layout` (the stage holds its own)."""
    graphdef, layout = None, s.layout
    if layout is None:
        graphdef, abstract, shardings = state_lib.abstract_train_state(
            s.model_cfg, s.tx, s.mesh, rules
        )
        rest = {k: v for k, v in abstract.items() if k != "step"}
        layout = _one_model_layout(s, rules, rest, shardings)
    s.layout = layout
    t = s.config.train
    ckpt = checkpoint.Checkpointer(os.path.join(s.workdir, "checkpoints"), max_to_keep=t.keep_ckpts)
    start = ckpt.latest_step()
    if start is not None:
        # The model first: a checkpoint of another model (or LoRA setting) is one sentence.
        meta = checkpoint.read_meta(str(ckpt.directory), start)  # a plain file read
        setup_lib.check_same_model(meta, s.model_cfg, ckpt.directory)
        restored, data_state, old_meta = ckpt.restore(start, layout.to_items(layout.abstract))
        state = layout.from_items(restored)
        s.train_iter.set_state(data_state)
        if s.host_state is not None:
            s.host_state.set_state(old_meta)
    else:
        start = 0
        state = layout.init()
    step = jax.device_put(jnp.asarray(start, jnp.int32), layout.shardings["step"])
    cfg = s.model_cfg
    if getattr(cfg, "lora_rank", 0) and jax.process_index() == 0:
        n = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
        trainable = n(lora.split_trainable(state["params"])[0])
        print(
            f"lora: rank {cfg.lora_rank} on {cfg.lora_targets}; {trainable / 1e6:.3f}M of "
            f"{n(state['params']) / 1e6:.2f}M params train, the base held in "
            f"{state_lib.base_dtype(cfg).name}",
            flush=True,
        )
    return graphdef, {"step": step, **state}, layout.shardings, start, ckpt


def _one_model_layout(s: Setup, rules, abstract, shardings) -> Layout:
    """One model and one optimizer. With LoRA the checkpoint holds only the trainable params
    (and their optimizer state); the frozen base is rebuilt from its source on resume, as a fresh
    run builds it (`s.init_params`, or the seeded init), so a resume is bitwise."""
    cfg = s.model_cfg
    base_cfg = lora.base_config(cfg)

    def base():  # the params of the model without adapters: init_from's, or None (seeded)
        if s.init_params is None:
            return None
        target = state_lib.abstract_params(base_cfg, s.mesh, rules) if cfg.lora_rank else None
        return s.init_params(abstract["params"] if target is None else target)

    def init():
        _, st, _ = state_lib.create_train_state(
            cfg, s.tx, s.mesh, rules, s.config.seed, params=base()
        )
        return {k: v for k, v in st.items() if k != "step"}

    if not cfg.lora_rank:
        return Layout(abstract=abstract, shardings=shardings, init=init)

    def to_items(state):
        trainable = lora.split_trainable(state["params"])[0]
        return {"params": trainable, "opt_state": state["opt_state"]}

    def from_items(items):
        full = state_lib.lora_params(cfg, s.config.seed, shardings["params"], base=base())
        params = lora.combine(items["params"], lora.split_trainable(full)[1])
        return {"params": params, "opt_state": items["opt_state"]}

    return Layout(abstract=abstract, shardings=shardings, init=init, to_items=to_items,
                  from_items=from_items)  # fmt: skip


def train(s: Setup, state, start: int, ckpt, schedule=None):
    """Runs steps `start..s.steps`; returns the final state."""
    t = s.config.train
    rules = s.config.sharding.rules
    peak = _peak()
    writer = metrics.MetricsWriter(
        s.workdir, total_steps=s.steps, start_step=start, desc=s.config.stage,
        tracker=tracking.start(s.config, s.workdir),  # None unless config.log.wandb is on
    )  # fmt: skip
    pending, last_ckpt, t_last, untimed = [], (start or None), time.time(), 0
    first_row = start == 0  # a fresh run's first training row also carries s.data_info

    def do_eval(step):
        if s.evaluate is not None:
            writer.write(step, s.evaluate(state["params"], step))
        if s.on_eval is not None:
            s.on_eval(state["params"], step, writer)

    try:
        if start == 0 and t.eval_every > 0:  # the starting point of the curves
            do_eval(0)
            t_last = time.time()
        for step in range(start, s.steps):
            batch = sharding.put_batch(next(s.train_iter), s.mesh, rules)
            state, m = s.step_fn(state, batch)
            n = step + 1
            pending.append((n, m))
            if step == start:
                # Time the first step (compilation) apart so tokens/s measures steady state.
                jax.block_until_ready(m)
                compile_s, t_last, untimed = time.time() - t_last, time.time(), 1
                writer.log(f"first step (compile + run) took {compile_s:.1f}s")
            preempted = preemption.stop_requested()
            is_log = n % t.log_every == 0 or n == s.steps or preempted
            if s.after_step is not None:
                s.after_step(n, m, is_log, writer)
            is_ckpt = n % t.ckpt_every == 0 or n == s.steps or preempted
            is_eval = not preempted and t.eval_every > 0 and (n % t.eval_every == 0 or n == s.steps)
            if is_ckpt and not is_log:  # never save a NaN state
                _finite_or_raise(jax.device_get(pending), s.loss_key, last_ckpt)
            if is_log:
                host = jax.device_get(pending)
                _finite_or_raise(host, s.loss_key, last_ckpt)
                dt = time.time() - t_last
                timed = max(len(host) - untimed, 1)
                out = {k: float(np.mean([h[k] for _, h in host])) for k in host[0][1]}
                tps = s.tokens_per_step * timed / dt
                out[f"{_ns(s.loss_key)}/tokens_per_sec"] = tps
                out[f"{_ns(s.loss_key)}/step_time"] = dt / timed
                if schedule is not None:
                    out[f"{_ns(s.loss_key)}/lr"] = float(schedule(n - 1))
                if s.perplexity:
                    out[f"{_ns(s.loss_key)}/perplexity"] = math.exp(min(out[s.loss_key], 50.0))
                if peak and s.flops_per_token:
                    out[f"{_ns(s.loss_key)}/mfu"] = (
                        tps * s.flops_per_token / (peak * jax.device_count())
                    )
                if first_row:
                    out.update(s.data_info)
                    first_row = False
                writer.write(n, out)
                pending, t_last, untimed = [], time.time(), 0
            if is_eval:
                do_eval(n)
                t_last = time.time()
            if is_ckpt:
                meta = dict(s.meta)
                if s.host_state is not None:
                    meta.update(s.host_state.get_state())
                if n == s.steps and s.final_meta is not None:
                    meta.update(s.final_meta(state["params"]))
                ckpt.save(
                    n,
                    s.layout.to_items(state),
                    data=s.train_iter.get_state(),
                    meta=meta,
                )
                last_ckpt = n
            if preempted:
                raise preemption.Preempted(n, s.config.stage)
    finally:
        # An exception (NaN, preemption, bug) still completes the checkpoint in flight.
        ckpt.close()
        writer.close()
    return state


def _ns(key: str) -> str:
    return key.split("/")[0]


def _peak():
    return plan.peak_flops(jax.devices()[0])
