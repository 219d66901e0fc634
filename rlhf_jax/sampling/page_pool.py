"""The page pool's bookkeeping on device: free lists, per-slot page tables, allocation, release.

This module owns which pages a decode slot's row holds; what the pages contain and attention over
them are `models/paged.py`'s, when rows enter and leave slots the engine's. Pages are allocated
as rows grow (memory follows the tokens in flight, not slots x max length) and return to the free
list when a row ends or is preempted.

Shards: with D data-parallel shards the pool is D blocks of F = NP / D pages and slot s belongs
to shard s // (S / D); a slot takes pages of its own block only (ids local to the block, as
paged.py's per-shard attention reads them). Every function here works on [D, ...] views and is
vmapped over shards, so under a mesh it runs where the shard's slots and pages live.

State: {"free": [D, F] bool, "table": [S, R] int32 (a slot's pages in order; entries past
"held" are stale), "held": [S] int32 pages each slot holds}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def init(num_pages: int, shards: int, slots: int, pages_per_row: int) -> dict:
    return {
        "free": jnp.ones((shards, num_pages // shards), bool),
        "table": jnp.zeros((slots, pages_per_row), jnp.int32),
        "held": jnp.zeros((slots,), jnp.int32),
    }


def in_use(pool: dict):
    """[] int32: pages held by rows, all shards."""
    return jnp.sum(~pool["free"], dtype=jnp.int32)


def free_pages(pool: dict):
    """[D] int32: free pages per shard."""
    return jnp.sum(pool["free"], axis=1, dtype=jnp.int32)


def _by_shard(x, shards: int):
    return x.reshape(shards, x.shape[0] // shards, *x.shape[1:])


def allocate(pool: dict, want, priority, max_new: int):
    """Gives slots the pages they need for this call, oldest first.

    A slot whose deficit (want - held) does not fit in its shard's free pages gets none (it
    stalls this call), and neither does any slot of lower priority that needs pages: strict
    priority, so the oldest rows always finish and a stalled row is never overtaken.

    Args:
      pool: this module's state.
      want: [S] int32 pages each slot must hold after the call (0: not taking part).
      priority: [S] int32, lower first (the engine's admission stamps).
      max_new: static bound on any slot's deficit.

    Returns:
      (pool, granted [S] bool: the slot holds `want` pages now).
    """
    shards = pool["free"].shape[0]
    parts = [_by_shard(x, shards) for x in (pool["table"], pool["held"], want, priority)]
    free, table, held, granted = jax.vmap(_allocate_shard, in_axes=(0, 0, 0, 0, 0, None))(
        pool["free"], *parts, max_new
    )
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    return {"free": free, "table": flat(table), "held": flat(held)}, flat(granted)


def _allocate_shard(free, table, held, want, priority, max_new: int):
    """One shard: free [F], table [Sl, R], held / want / priority [Sl]."""
    f = free.shape[0]
    sl, r = table.shape
    deficit = jnp.maximum(want - held, 0)
    order = jnp.argsort(priority)
    cum = jnp.cumsum(deficit[order])  # pages needed by this slot and every older one
    fits = jnp.zeros(sl, bool).at[order].set(cum <= jnp.sum(free))
    start = jnp.zeros(sl, jnp.int32).at[order].set(cum - deficit[order])
    granted = (deficit == 0) | fits
    free_ids = jnp.nonzero(free, size=f, fill_value=0)[0]  # [F] ascending, valid up to the count
    j = jnp.arange(max_new)
    take = (fits & (deficit > 0))[:, None] & (j[None] < deficit[:, None])  # [Sl, max_new]
    page = free_ids[jnp.clip(start[:, None] + j, 0, f - 1)]
    col = jnp.where(take, held[:, None] + j, r)  # r: out of range, dropped
    table = table.at[jnp.arange(sl)[:, None], col].set(page, mode="drop")
    free = free.at[jnp.where(take, page, f)].set(False, mode="drop")
    held = jnp.where(granted, jnp.maximum(held, want), held)
    return free, table, held, granted


def release(pool: dict, mask) -> dict:
    """Returns the pages of the slots in mask [S] bool to their shards' free lists."""
    shards = pool["free"].shape[0]
    free = jax.vmap(_release_shard)(
        pool["free"], _by_shard(pool["table"], shards), _by_shard(pool["held"], shards),
        _by_shard(mask, shards),
    )  # fmt: skip
    return {**pool, "free": free, "held": jnp.where(mask, 0, pool["held"])}


def _release_shard(free, table, held, mask):
    f, r = free.shape[0], table.shape[1]
    drop = mask[:, None] & (jnp.arange(r)[None] < held[:, None])
    return free.at[jnp.where(drop, table, f)].set(True, mode="drop")
