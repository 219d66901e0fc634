"""Paged KV cache: the page pool's layout, the writes into it, and attention over a row's pages.

This module owns the paged form of `Transformer.__call__`'s cache, which the rollout engine
(`rlhf_jax.sampling.engine`) builds; the dense form stays transformer.py's. Which page holds
what is the engine's business (its allocator); here a row simply names its pages.

Layout (a plain pytree, passed in and returned like the dense cache):
  {"k": [K, L, NP, PS, H], "v": [K, L, NP, PS, H],   the pool: NP pages of PS tokens per layer
   "pages": [B, R] int32,    row b's pages in order (ids local to its shard, below)
   "lengths": [B] int32}     tokens of each row already in the pool
Position p of row b lives in page pages[b, p // PS] at offset p % PS: slots and positions advance
together, so a sliding window in positions is one in slots, as in the dense cache. A call's new
tokens (those its key mask marks real) take positions lengths .. lengths + n - 1; padding tokens
are never written. Entries of `pages` past a row's length may hold any valid id: their keys are
masked.

Why [K, L, NP, PS, H] and not [L, NP, PS, K, H]: the TPU kernel takes one layer's pages as
[K, pages, PS, H]. Folding the layers into the page axis ([K, L * NP, PS, H], a free reshape) lets
it read layer l's page p in place as page l * NP + p; the other order would copy the whole layer's
pool (a transpose) per layer per decode step.

Sharding: kv heads follow `act_heads` and pages the `act_batch` mesh axes. With D batch shards the
pool splits into D blocks of NP / D pages and the rows on shard d use block d only (the engine
allocates per shard, page ids local to the block), so writes and attention run per shard in a
`shard_map` and no page crosses devices.

Attention (`attend`, the `impl` of the model config as attention.py reads it):
  xla     the reference, and the CPU / GPU path: gathers each row's R pages into [B, R * PS, K, H]
          and runs `attention.xla` with each query's position as its slot, so GQA, sliding
          windows and soft-capping are the dense path's.
  kernel  TPU (auto or splash): `jax.experimental.pallas.ops.tpu.paged_attention` for decode
          steps (one query per row) of global layers whose head dim is a multiple of 128 (on a
          TPU, Mosaic refuses the kernel's blocks otherwise: GPT-2's 64 falls back); prefill
          chunks and sliding-window layers (the kernel has no window) run xla. Off TPU it runs
          in Pallas interpret mode (parity tests). The kernel casts keys and values to bfloat16
          inside (its dequantize step), so a float32 pool attends bfloat16-rounded keys there.
          `ragged_paged_attention` (which mixes prefill and decode rows in one call) is not
          used: in jax 0.10.2 its interpret mode fails on CPU ("'ReshapeTransform' object has
          no attribute 'indices'"), so it could not be parity-tested here.

Shapes: B rows, T new tokens per row, N query heads, K kv heads, H head dim, L layers, NP pages,
PS page size, R pages per row.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from rlhf_jax.infra import sharding
from rlhf_jax.models import attention

_DROP = 2**30  # a page id past any pool: the write is dropped (padding tokens, idle rows)


def is_paged(cache) -> bool:
    return cache is not None and "pages" in cache


def init_pool(cfg, num_pages: int, page_size: int, dtype=None) -> dict:
    """An empty pool {"k", "v"} of `num_pages` pages of `page_size` tokens (zeros: finite)."""
    shape = (cfg.n_kv_heads, cfg.n_layers, num_pages, page_size, cfg.head_dim)
    dtype = jnp.dtype(dtype or cfg.dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def page_bytes(cfg, page_size: int, dtype=None) -> int:
    """Bytes of one page: keys and values of `page_size` tokens in every layer."""
    itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
    return 2 * cfg.n_layers * page_size * cfg.n_kv_heads * cfg.head_dim * itemsize


def index(cache: dict, positions, key_mask) -> dict:
    """What every layer of one call needs: where each new token goes, what each row attends.

    Args:
      cache: the paged cache (module docstring).
      positions: [B, T] int32 positions of the new tokens (lengths + their rank among the real).
      key_mask: [B, T] bool, True at the real new tokens.

    Returns:
      {"page": [B, T] page of each new token (out of range at padding: not written),
       "offset": [B, T], "pages": [B, R], "positions": [B, T], "kv_len": [B] tokens after it}.
    """
    pages = cache["pages"]
    ps = cache["k"].shape[3]
    col = jnp.clip(positions // ps, 0, pages.shape[1] - 1)
    page = jnp.take_along_axis(pages, col, axis=1)
    return {
        "page": jnp.where(key_mask, page, _DROP),
        "offset": positions % ps,
        "pages": pages,
        "positions": positions,
        "kv_len": cache["lengths"] + jnp.sum(key_mask, axis=1, dtype=jnp.int32),
    }


def write(pool, layer, new, idx: dict):
    """pool [K, L, NP, PS, H] with layer `layer`'s new keys or values new [B, T, K, H] written
    at the real tokens' pages (`index`)."""

    def local(pool, layer, new, page, offset):
        upd = new.astype(pool.dtype).transpose(2, 0, 1, 3)  # [K, B, T, H]
        return pool.at[:, layer, page, offset].set(upd, mode="drop")

    specs = _specs(new.shape[2])
    if specs is None:
        return local(pool, layer, new, idx["page"], idx["offset"])
    batch, heads = specs
    pool_spec = PartitionSpec(heads, None, batch, None, None)
    rows = PartitionSpec(batch, None)
    run = jax.shard_map(
        local,
        mesh=sharding.active()[0],
        in_specs=(pool_spec, PartitionSpec(), PartitionSpec(batch, None, heads, None), rows, rows),
        out_specs=pool_spec,
        check_vma=False,
    )
    return run(pool, jnp.asarray(layer, jnp.int32), new, idx["page"], idx["offset"])


def choose(impl: str, t: int, window, head_dim: int | None = None) -> tuple[bool, str]:
    """(whether the TPU kernel runs, why not when it was asked for) for T queries per row of
    `head_dim` (None: not checked)."""
    if impl not in attention.IMPLS:
        raise ValueError(f"unknown attention implementation: {impl!r}; expected {attention.IMPLS}")
    wanted = impl == "splash" or (impl == "auto" and attention._platform() == "tpu")
    if not wanted:
        return False, ""
    if t != 1:
        return False, f"{t} queries per row (a prefill chunk; the kernel takes decode steps)"
    if window is not None:
        return False, "a sliding-window layer (paged_attention has no window)"
    if head_dim is not None and head_dim % 128 and attention._platform() == "tpu":
        # Mosaic refuses the kernel's [.., 1] statistics blocks of width H unless 128 divides H
        # (GPT-2's H = 64: "last two dimensions ... divisible by 8 and 128"); interpret mode
        # (the parity tests) does not lower through Mosaic.
        return False, f"head dim {head_dim} (the kernel's TPU blocks need a multiple of 128)"
    return True, ""


def attend(q, k_pool, v_pool, layer, idx: dict, *, impl="auto", window=None, softcap=None,
           scale=None):  # fmt: skip
    """Causal attention of new queries over their rows' pages (after `write`).

    Args:
      q: [B, T, N, H] queries of the new tokens.
      k_pool, v_pool: [K, L, NP, PS, H] pools, this call's tokens already written.
      layer: the layer (an int, or a traced int32 when layers are scanned).
      idx: `index`'s dict.
      impl, window, softcap, scale: as `attention.attend`.

    Returns:
      [B, T, N, H] in q's dtype; 0 at rows with no key.
    """
    h = q.shape[-1]
    scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
    kernel, _ = choose(impl, q.shape[1], window, h)
    interpret = attention._platform() != "tpu"

    def local(q, k_pool, v_pool, layer, pages, positions, kv_len):
        if kernel:
            return _kernel(q, k_pool, v_pool, layer, pages, kv_len, softcap, scale, interpret)
        k, v = _gather(k_pool, layer, pages), _gather(v_pool, layer, pages)
        key_mask = jnp.arange(k.shape[1]) < kv_len[:, None]  # [B, R * PS]
        return attention.xla(
            q, k, v, q_slot=positions, key_mask=key_mask, window=window, softcap=softcap,
            scale=scale,
        )  # fmt: skip

    args = (q, k_pool, v_pool, layer, idx["pages"], idx["positions"], idx["kv_len"])
    specs = _specs(k_pool.shape[0])
    if specs is None:
        return local(*args)
    batch, heads = specs
    pool_spec = PartitionSpec(heads, None, batch, None, None)
    q_spec = PartitionSpec(batch, None, heads, None)
    rows = PartitionSpec(batch, None)
    run = jax.shard_map(
        local,
        mesh=sharding.active()[0],
        in_specs=(q_spec, pool_spec, pool_spec, PartitionSpec(), rows, rows, PartitionSpec(batch)),
        out_specs=q_spec,
        check_vma=False,
    )
    return run(*args[:3], jnp.asarray(layer, jnp.int32), *args[4:])


def _specs(kv_heads: int):
    """(batch mesh axes, head mesh axes) of a per-shard call, or None without a multi-device mesh.

    Heads split over `act_heads` only when those axes divide K (and so N, a multiple of K)."""
    active = sharding.active()
    if active is None or active[0].devices.size == 1:
        return None
    mesh, rules = active
    batch = sharding.logical_to_spec(("act_batch",), rules, mesh)[0]
    heads = sharding.logical_to_spec(("act_heads",), rules, mesh, (kv_heads,))[0]
    return batch, heads


def _gather(pool, layer, pages):
    """[B, R * PS, K, H]: the pages of each row, in order, from pool [K, L, NP, PS, H]."""
    k, _, _, ps, h = pool.shape
    b, r = pages.shape
    x = pool[:, layer, pages]  # [K, B, R, PS, H]
    return x.transpose(1, 2, 3, 0, 4).reshape(b, r * ps, k, h)


def kernel_block(pages_per_row: int) -> int:
    """Pages per compute block of the TPU kernel: the most, up to 8, that divide R (as it
    requires); it reads a row's pages in whole blocks up to the row's length."""
    return max(d for d in range(1, min(pages_per_row, 8) + 1) if pages_per_row % d == 0)


def _kernel(q, k_pool, v_pool, layer, pages, kv_len, softcap, scale, interpret: bool):
    """The TPU paged-attention kernel on one decode query per row: q [B, 1, N, H]."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import paged_attention as pa

    k, n_layers, n_pages, ps, h = k_pool.shape
    flat = lambda pool: pool.reshape(k, n_layers * n_pages, ps, h)  # layers folded into pages
    r = pages.shape[1]
    block = kernel_block(r)
    scaled = (q[:, 0].astype(jnp.float32) * scale).astype(q.dtype)  # the kernel does not scale
    mode = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
    with mode:
        y = pa.paged_attention(
            scaled,
            flat(k_pool),
            flat(v_pool),
            kv_len,
            pages + layer * n_pages,
            attn_logits_soft_cap=softcap,
            pages_per_compute_block=block,
        )
    y = jnp.where((kv_len > 0)[:, None, None], y, 0)  # a row with no key: 0, as attention.py
    return y[:, None].astype(q.dtype)
