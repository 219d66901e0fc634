"""The `rollout` row of every sampling stage's plan: the static sampler's or the paged engine's.

PPO, GRPO (rlhf_jax/stages/aot_rl.py) and rsft (rlhf_jax/stages/aot.py) sample with what
`config.rollout` names (rlhf_jax/sampling/rollout.py): the static sampler (a batch of rows that
decodes until its slowest row ends, a dense KV cache of every row at full length) or the rollout
engine (decode slots over a queue of rows, a paged KV cache). `make` builds that generator as
the stages do (`rollout.make`) and `function` returns its `Function`: the same arguments (params,
prompts, prompt mask, row keys, sampling knobs), the model FLOPs of one call and the bytes of the
decode loop trips XLA's cost analysis does not count.

Rows are planned at full length (EOS never stops a row), so every row decodes T - 1 steps after
its prefill. The engine's page pool is one of its temporaries (the compiler's `temp`); the row
also names it (`page_pool_bytes` per chip, from the pool's shape and sharding).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlhf_jax.infra import plan, sharding
from rlhf_jax.models import paged
from rlhf_jax.sampling import rollout as rollout_lib
from rlhf_jax.sampling import sampler
from rlhf_jax.stages.aot_inputs import Function, key_dtype, rows, scalar

# The KV caches' logical layouts: sampling/sampler.py's dense [L, B, S, K, H] and the engine's
# page pool [K, L, NP, PS, H] (engine_loop._constrain).
_CACHE_AXES = (None, "act_batch", None, "act_heads", None)
_POOL_AXES = ("act_heads", None, "act_batch", None, None)


def make(graphdef, rollout_cfg, mesh, rules, max_new_tokens: int):
    """The generator `rollout_cfg` (`config.rollout`) names, as the stages build it
    (`rollout.make`), with a stop id no token matches: rows run to their full length."""
    return rollout_lib.make(
        graphdef,
        rollout_cfg,
        max_new_tokens=max_new_tokens,
        eos_id=-1,
        pad_id=0,
        mesh=mesh,
        rules=rules,
    )


def function(sample, rollout_cfg, cfg, params, mesh, rules, shape, knobs, resident=None):
    """The rollout `Function` of `sample` (`make`'s, or a stage's own `rollout.make` result),
    the generator `rollout_cfg` names, on B prompts of P tokens decoding T new ones each,
    `shape` = (B, P, T), at sampling `knobs` (temperature, top_k, top_p); `resident` stays in
    HBM while it runs."""
    if rollout_lib.resolve(rollout_cfg)["engine"] == "paged":
        return engine_function(sample, cfg, params, mesh, rules, shape, knobs, resident)
    return rollout_function(sample.jitted, cfg, params, mesh, rules, shape, knobs, resident)


def _inputs(mesh, rules, b: int, p: int):
    """(prompts, prompt mask, row keys) and the traced sampling knobs of one call."""
    prompts = (
        rows(mesh, rules, (b, p), jnp.int32),
        rows(mesh, rules, (b, p), jnp.bool_),
        rows(mesh, rules, (b,), key_dtype()),
    )
    knobs = {
        "temperature": scalar(mesh, jnp.float32),
        "top_k": scalar(mesh, jnp.int32),
        "top_p": scalar(mesh, jnp.float32),
    }
    return prompts, knobs


def rollout_function(jitted, cfg, params, mesh, rules, shape, knobs, resident=None) -> Function:
    """The static sampler's `jitted` function (`make_sampler(...).jitted`) on `shape` (B, P, T).

    FLOPs: prefill P tokens, then T - 1 decode steps of one token per row, all attending to the
    S = P + T cache slots. XLA counts the prefill and one trip of the decode loop; every trip
    reads the policy's weights (gathered from their FSDP shards, in the compute dtype) and this
    chip's rows of the KV cache from HBM.
    """
    b, p, t = shape
    s, n = p + t, mesh.devices.size
    prompts, abstract_knobs = _inputs(mesh, rules, b, p)
    prefill = plan.forward_flops(cfg, params, b * p, s, b)
    step = plan.forward_flops(cfg, params, b, s)
    kv_shape = (cfg.n_layers, b, s, cfg.n_kv_heads, cfg.head_dim)
    kv_spec = sharding.logical_to_spec(_CACHE_AXES, rules, mesh, kv_shape)
    kv = jax.ShapeDtypeStruct(
        kv_shape, jnp.dtype(cfg.dtype), sharding=jax.sharding.NamedSharding(mesh, kv_spec)
    )
    step_bytes = plan.gathered_bytes(params, cfg.dtype) + 2 * plan.chip_bytes(kv)
    temperature, top_k, top_p = knobs
    return Function(
        "rollout",
        jitted,
        (params, *prompts, abstract_knobs),
        {"params": params, "batch": prompts},
        prefill + (t - 1) * step,
        b * t,
        b,
        resident=resident,
        flops_seen=(prefill + step) / n,
        loop_bytes=max(t - 2, 0) * step_bytes,
        loop_trips=max(t - 1, 1),
        static=(sampler.sampling_mode(temperature, top_k, top_p, False),),
        calls=1,
        note=f"{b} rows of {p} prompt + {t} new tokens",
    )


def page_pool(cfg, mesh, rules, num_pages: int, page_size: int) -> dict:
    """The engine's pool {"k", "v"} [K, L, NP, PS, H] as abstract arrays with their shardings
    (pages over the data-parallel shards, kv heads over `act_heads`)."""
    shape = (cfg.n_kv_heads, cfg.n_layers, num_pages, page_size, cfg.head_dim)
    spec = sharding.logical_to_spec(_POOL_AXES, rules, mesh, shape)
    sh = jax.sharding.NamedSharding(mesh, spec)
    x = jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.dtype), sharding=sh)
    return {"k": x, "v": x}


def engine_function(sample, cfg, params, mesh, rules, shape, knobs, resident=None) -> Function:
    """The paged engine's one-shot call (`make_engine(...)`) on `shape` (B, P, T): B queued rows
    through S slots and a pool of NP pages of PS tokens (`sample.sizes`).

    Rows at full length each hold R = ceil((P + T) / PS) pages, so `live` = min(B, S, the rows
    whose R pages fit in each shard's share of the pool) decode at once, in ceil(B / live) waves
    of one prefill call ([live, P], every shard's rows) and T - 1 decode steps ([S, 1]: every
    slot runs). A tighter pool preempts rows that later recompute their history; that recompute
    is not counted (the bound stays optimistic).

    Per decode step, per chip: the policy's gathered weights, read once, and the KV pages of this
    chip's live rows: with the TPU kernel (`paged.choose`) a row's pages up to its length in the
    kernel's blocks, averaged over the T - 1 steps; with the XLA gather (sliding windows, heads
    the kernel refuses) all R pages of every slot. Model FLOPs are the static sampler's (B x P
    prefill tokens, B x (T - 1) decode tokens); `hw_factor` adds the idle slots' tokens. Bytes as
    the static sampler's row counts them: XLA counts one trip of each loop (a prefill call of
    every slot, a decode step; a scanned model's one layer), scaled to every trip by model FLOPs
    (plan.row), plus the weights and KV pages of the decode steps after the first.
    """
    b, p, t = shape
    s = p + t
    z = sample.sizes(b, p)
    prompts, abstract_knobs = _inputs(mesh, rules, b, p)
    r = z.pages_per_row
    live = min(b, z.slots, z.shards * (z.num_pages // z.shards // r))
    waves = math.ceil(b / live)
    steps = waves * (t - 1)

    pool = page_pool(cfg, mesh, rules, z.num_pages, z.page_size)
    pool_bytes = plan.chip_bytes(pool)
    page_chip = pool_bytes / pool["k"].sharding.shard_shape(pool["k"].shape)[2]
    with sharding.use_rules(mesh, rules):
        kernel = paged.choose(cfg.attention, 1, None, cfg.head_dim)[0]
    if kernel:  # the kernel stops at the block holding the row's last token
        block = paged.kernel_block(r) * z.page_size
        read = sum(math.ceil((p + j) / block) for j in range(1, t)) / max(t - 1, 1)
        pages_read = paged.kernel_block(r) * read
    else:  # the gather reads every page in the slot's table
        pages_read = r
    slots_chip = (live if kernel else z.slots) / z.shards
    step_bytes = plan.gathered_bytes(params, cfg.dtype) + slots_chip * pages_read * page_chip

    prefill = plan.forward_flops(cfg, params, b * p, s, b)
    flops = prefill + (t - 1) * plan.forward_flops(cfg, params, b, s)
    step_flops = plan.forward_flops(cfg, params, z.slots, s)
    hw = prefill + steps * step_flops
    seen = plan.forward_flops(cfg, params, z.prefill_rows * p, s, z.prefill_rows) + step_flops
    temperature, top_k, top_p = knobs
    attn = "paged_attention kernel" if kernel else "XLA gather"
    note = (
        f"{b} rows of {p} prompt + {t} new tokens; paged engine: {z.slots} slots, "
        f"{z.num_pages:,} pages of {z.page_size} tokens (page pool "
        f"{pool_bytes / plan.GiB:.3g} GiB per chip), {live} rows at once at full length, "
        f"{steps:,} decode steps ({attn})"
    )
    return Function(
        "rollout",
        sample.jitted,
        (params, *prompts, abstract_knobs),
        {"params": params, "batch": prompts},
        flops,
        b * t,
        b,
        resident=resident,
        hw_factor=hw / flops,
        flops_seen=seen / mesh.devices.size,
        loop_bytes=max(steps - 1, 0) * step_bytes,
        loop_trips=max(steps, 1),
        static=(sampler.sampling_mode(temperature, top_k, top_p, False),),
        calls=1,
        note=note,
        extra={
            "engine": "paged",
            "slots": z.slots,
            "pages": z.num_pages,
            "page_size": z.page_size,
            "page_pool_bytes": pool_bytes,
            "live_rows": live,
            "decode_steps": steps,
            "prefill_calls": waves,
            "decode_step_flops": step_flops,
            "decode_step_bytes": step_bytes,
            "decode_kernel": kernel,
        },
    )
