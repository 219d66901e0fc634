"""The rollout engine's compiled loop: admission, prefill, decode, page allocation, preemption.

This module owns the state of one engine program and the `while_loop` that advances it; the entry
points (`make_engine`, `generate`, the multi-turn `Rollout`) and the design are engine.py's, the
page bookkeeping page_pool.py's, the paged cache and its attention models/paged.py's.

One iteration (nothing crosses to the host until the loop exits):
  admit    free slots take the next queued rows while their shard has free pages
  prefill  once enough rows wait (`_prefill_due`), rows with more than one token not in their
           cache (a new prompt, inserted tokens, a preempted row's history) run through the
           model `chunk` tokens per call,
           up to `prefill_rows` rows per call (the smallest of the compiled sizes 1, 2, 4, ...
           that holds the waiting rows: on a CPU a call costs its tokens, on an accelerator a
           read of the weights, so neither padding rows nor one call per row is free), until
           none is left; a row whose last pending token went in samples its next token from
           that call's logits
  decode   one token per decoding slot ([S, 1]); record it, end rows at a stop id or the token
           limit (their pages go back to the free list), park rows at a yield id
  preempt  a shard where no row could get a page frees the pages of its youngest row, which
           recomputes its history later (the same tokens: its stream depends on t only)

A row's sequence is its prompt's real tokens then its response (generated and inserted tokens);
a slot holds `c` of them in its pages, and its pending tokens are those after c. Positions are
sequence indices, as the static sampler's (a row's real tokens counted from 0).

Shapes: N rows, P prompt columns, T response tokens, S slots, D shards, V vocab.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.infra import sharding
from rlhf_jax.models import paged
from rlhf_jax.sampling import page_pool, sampler

QUEUED, ACTIVE, PARKED, DONE = 0, 1, 2, 3  # a row's status
_FOREVER = 2**30  # more than any step budget or admission stamp
_STATS = ("steps", "prefill_calls", "tokens", "peak_pages", "preemptions")


class Sizes(NamedTuple):
    """The static sizes of one engine program."""

    rows: int  # N queued rows
    prompt: int  # P prompt columns
    new: int  # T response tokens per row (generated and inserted)
    slots: int  # S decode slots
    shards: int  # D data-parallel shards (slots and pages split evenly)
    page_size: int  # PS tokens per page
    num_pages: int  # NP pages in the pool, all shards
    chunk: int  # prefill tokens per row per call; 0: token by token
    prefill_rows: int  # most rows per prefill call, all shards
    one_wave: bool = False  # every row enters at once and none returns for more prefill

    @property
    def pages_per_row(self) -> int:
        return -(-(self.prompt + self.new) // self.page_size)

    @property
    def max_new_pages(self) -> int:  # pages one call can add to a slot
        return -(-max(self.chunk, 1) // self.page_size)

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        """Rows per shard of the prefill calls compiled: 1, 2, 4, ... up to the most; only the
        most in one wave (each size compiles a model: 9 sizes for 256 slots made the engine's
        compile 22 s against the static sampler's 2.5 s on the 2-core CPU, one size 4 s)."""
        most = self.prefill_rows // self.shards
        if self.one_wave:
            return (most,)
        return tuple(2**i for i in range(most.bit_length()) if 2**i < most) + (most,)


def sizes(rows, prompt, new, *, shards=1, num_slots=None, page_size=16, num_pages=None,
          prefill_chunk=None, prefill_rows=None, yields=False) -> Sizes:  # fmt: skip
    """The engine's sizes for N rows of P prompt columns, checked; None picks the default.

    Defaults: one slot per row, a pool that holds every slot at full length (never stalls),
    a prompt per prefill call, up to every slot in one prefill call. `yields`: rows may park
    and come back with inserted tokens to prefill.

    One wave: with a slot for every row, a pool that holds every slot at full length, whole
    prompts per call, every slot per call and no yields, every row is admitted in the first
    iteration, its prompt goes in one prefill call and no row ever waits for pages or is
    preempted: that call has every slot, so only that size is compiled (the static sampler's
    single dense prefill). Any later prefill (tokens a `Rollout` appends) fits it too.
    """
    slots = num_slots or rows
    if slots % shards:
        raise ValueError(f"num_slots={slots} does not divide over {shards} data-parallel shards")
    r = -(-(prompt + new) // page_size)
    pages = num_pages or slots * r
    if pages % shards or pages // shards < r:
        raise ValueError(
            f"a page pool of {pages} pages over {shards} shard(s) cannot hold one row of max "
            f"length {prompt} + {new} tokens ({r} pages of {page_size}) per shard; use "
            f"num_pages >= {r * shards}, a multiple of {shards}"
        )
    chunk = prompt if prefill_chunk is None else prefill_chunk
    rows_per_call = prefill_rows or slots
    if rows_per_call % shards or rows_per_call > slots:
        raise ValueError(f"prefill_rows={rows_per_call}: a multiple of {shards}, at most {slots}")
    one_wave = (
        rows <= slots and pages >= slots * r and chunk >= prompt and rows_per_call == slots
        and not yields
    )  # fmt: skip
    return Sizes(rows, prompt, new, slots, shards, page_size, pages, chunk, rows_per_call,
                 one_wave)  # fmt: skip


class Ctx(NamedTuple):
    """What every step of one traced loop shares (static or closed over)."""

    z: Sizes
    graphdef: object
    params: object
    knobs: dict
    mode: str
    eos_id: tuple
    yield_ids: tuple
    pad_id: int


def init(prompts, prompt_mask, row_keys, *, cfg, z: Sizes, pad_id: int) -> dict:
    """The state of a fresh queue: every row queued, every slot free, every page free."""
    mask = prompt_mask.astype(bool)
    order = jnp.argsort(~mask, axis=1, stable=True)  # each row's real tokens first, in order
    zeros = lambda shape, dt=jnp.int32: jnp.zeros(shape, dt)
    return {
        "prompt": prompts.astype(jnp.int32),  # [N, P] as given (the output's first columns)
        "compact": jnp.take_along_axis(prompts.astype(jnp.int32), order, axis=1),  # [N, P]
        "plen": jnp.sum(mask, axis=1, dtype=jnp.int32),  # [N]
        "keys": row_keys,  # [N] typed PRNG keys
        "response": jnp.full((z.rows, z.new), pad_id, jnp.int32),  # [N, T]
        "logprobs": zeros((z.rows, z.new), jnp.float32),
        "generated": zeros((z.rows, z.new), bool),
        "t": zeros(z.rows),  # response tokens recorded
        "status": zeros(z.rows),  # QUEUED / ACTIVE / PARKED / DONE
        "finished": zeros(z.rows, bool),
        "slot_row": jnp.full((z.slots,), -1, jnp.int32),  # [S] the row in each slot, -1 free
        "c": zeros(z.slots),  # tokens of the slot's row in its pages
        "stamp": zeros(z.slots),  # admission order: allocation priority, preemption victim
        "stalled": zeros(z.slots, bool),  # wanted pages this iteration and got none
        "moved": zeros(z.slots, bool),  # fed tokens this iteration
        "pool": page_pool.init(z.num_pages, z.shards, z.slots, z.pages_per_row),
        "kv": paged.init_pool(cfg, z.num_pages, z.page_size),
        "next_row": zeros(()),
        "clock": zeros(()),
        "parks": zeros(()),
        "stuck": zeros((), bool),
        "stats": {k: zeros(()) for k in _STATS},
    }


def _constrain(s: dict) -> dict:
    c = sharding.constrain
    slot = lambda x: c(x, ("act_batch",) + (None,) * (x.ndim - 1))
    kv = {k: c(v, ("act_heads", None, "act_batch", None, None)) for k, v in s["kv"].items()}
    pool = {k: slot(v) for k, v in s["pool"].items()}
    slots = {k: slot(s[k]) for k in ("slot_row", "c", "stamp", "stalled", "moved")}
    return {**s, **slots, "kv": kv, "pool": pool}


def _pending(s, slots):
    """(tokens of each slot's row not in its pages [X], its row [X] (0 when free), whether the
    slot runs an active row [X]) for slot ids [X]."""
    row = s["slot_row"][slots]
    safe = jnp.maximum(row, 0)
    running = (row >= 0) & (s["status"][safe] == ACTIVE)
    return s["plen"][safe] + s["t"][safe] - s["c"][slots], safe, running


def _seq_tokens(s, rows, idx, z: Sizes):
    """Tokens at sequence indices idx [X, W] of rows [X]: the prompt's, then the response's."""
    plen = s["plen"][rows][:, None]
    prompt = jnp.take_along_axis(s["compact"][rows], jnp.clip(idx, 0, z.prompt - 1), axis=1)
    resp = jnp.take_along_axis(s["response"][rows], jnp.clip(idx - plen, 0, z.new - 1), axis=1)
    return jnp.where(idx < plen, prompt, resp)


def _advance(s, ctx: Ctx, slots, take, n, width: int):
    """One model call: feeds the next n [X] pending tokens of slots [X] where take [X], in
    `width` left-padded columns; rows whose last pending token went in sample their next."""
    z = ctx.z
    pending, row, _ = _pending(s, slots)
    c = s["c"][slots]
    # Every running slot asks for the pages of its next call, not only this call's: allocation
    # is oldest first over all of them, so a young row prefilling now cannot take the page an
    # older row needs for its decode step later in the iteration (that would livelock).
    all_pending, _, running = _pending(s, jnp.arange(z.slots))
    next_n = jnp.minimum(all_pending, z.chunk) if z.chunk else jnp.ones_like(all_pending)
    want = jnp.where(running, -(-(s["c"] + jnp.maximum(next_n, 1)) // z.page_size), 0)
    want = want.at[slots].set(jnp.where(take, -(-(c + n) // z.page_size), want[slots]))
    pool, granted = page_pool.allocate(s["pool"], want, s["stamp"], z.max_new_pages)
    go = take & granted[slots]
    cols = jnp.arange(width)[None]
    idx = c[:, None] + cols - (width - n)[:, None]  # [X, W] sequence index = position
    real = go[:, None] & (cols >= (width - n)[:, None])
    tokens = jnp.where(real, _seq_tokens(s, row, idx, z), ctx.pad_id)
    cache = {**s["kv"], "pages": pool["table"][slots], "lengths": c}
    model = nnx.merge(ctx.graphdef, ctx.params)
    hidden, cache = model(
        tokens, positions=jnp.maximum(idx, 0), key_mask=real, cache=cache, return_hidden=True
    )
    logits = model.unembed(hidden[:, -1:])[:, 0]  # left padding: the last column is real
    stats = s["stats"]
    s = {
        **s,
        "pool": pool,
        "kv": {"k": cache["k"], "v": cache["v"]},
        "c": s["c"].at[slots].add(jnp.where(go, n, 0)),
        "stalled": s["stalled"].at[slots].set(s["stalled"][slots] | (take & ~go)),
        "moved": s["moved"].at[slots].set(s["moved"][slots] | go),
        "stats": {**stats, "peak_pages": jnp.maximum(stats["peak_pages"], page_pool.in_use(pool))},
    }
    s, end = _record(s, ctx, row, go & (n == pending), logits)
    return free_slots(s, jnp.zeros(z.slots, bool).at[slots].set(end))


def _record(s, ctx: Ctx, row, sample, logits):
    """Samples response position t of rows [X] where sample [X] from logits [X, V]; ends rows at
    a stop id or the limit, parks them at a yield id. Returns (state, ended [X])."""
    z = ctx.z
    t = s["t"][row]
    step_keys = jax.vmap(jax.random.fold_in)(s["keys"][row], t)
    dist = sampler.sampling_logits(logits.astype(jnp.float32), ctx.knobs, ctx.mode)  # [X, V]
    tokens = sampler._draw(dist, step_keys, ctx.mode)
    logp = sampler._token_logprob(dist, tokens)
    stop = sample & sampler.is_stop(tokens, ctx.eos_id)
    end = stop | (sample & (t + 1 >= z.new))
    park = sample & ~end & sampler.is_stop(tokens, ctx.yield_ids)
    at = lambda m: jnp.where(m, row, z.rows)  # rows outside m: out of range, dropped
    col = jnp.minimum(t, z.new - 1)
    status = s["status"].at[at(end)].set(DONE, mode="drop").at[at(park)].set(PARKED, mode="drop")
    stats = s["stats"]
    return {
        **s,
        "response": s["response"].at[at(sample), col].set(tokens, mode="drop"),
        "logprobs": s["logprobs"].at[at(sample), col].set(logp, mode="drop"),
        "generated": s["generated"].at[at(sample), col].set(True, mode="drop"),
        "t": s["t"].at[at(sample)].add(1, mode="drop"),
        "finished": s["finished"].at[at(stop)].set(True, mode="drop"),
        "status": status,
        "parks": s["parks"] + jnp.sum(park, dtype=jnp.int32),
        "stats": {**stats, "tokens": stats["tokens"] + jnp.sum(sample, dtype=jnp.int32)},
    }, end


def free_slots(s, mask):
    """Slots in mask [S] give back their pages and take no row."""
    return {
        **s,
        "pool": page_pool.release(s["pool"], mask),
        "slot_row": jnp.where(mask, -1, s["slot_row"]),
        "c": jnp.where(mask, 0, s["c"]),
    }


def _admit(s, z: Sizes):
    """Free slots take the next queued rows; a shard takes no more rows than its free pages
    allow a first call for, and none while one of its rows is stalled. Returns (state, any)."""
    sl = z.slots // z.shards
    free = (s["slot_row"] < 0).reshape(z.shards, sl)
    blocked = jnp.any(s["stalled"].reshape(z.shards, sl), axis=1)
    room = jnp.where(blocked, 0, page_pool.free_pages(s["pool"]) // z.max_new_pages)  # [D]
    ok = (free & (jnp.cumsum(free, axis=1) <= room[:, None])).reshape(-1)
    rank = jnp.cumsum(ok) - 1
    admit = ok & (rank < z.rows - s["next_row"])
    row = s["next_row"] + rank
    count = jnp.sum(admit, dtype=jnp.int32)
    return {
        **s,
        "slot_row": jnp.where(admit, row, s["slot_row"]),
        "c": jnp.where(admit, 0, s["c"]),
        "stamp": jnp.where(admit, s["clock"] + rank, s["stamp"]),
        "status": s["status"].at[jnp.where(admit, row, z.rows)].set(ACTIVE, mode="drop"),
        "next_row": s["next_row"] + count,
        "clock": s["clock"] + count,
    }, count > 0


def _prefill_due(s, z: Sizes):
    """Whether this iteration prefills: once a shard has 4 rows waiting (or as many as a call
    takes), or the decode batch is half idle, or the queue is empty. Waiting a few
    steps for company costs the waiting slots those steps; one call per row would cost a call
    each (on the 2-core CPU a [1, P] call took 60% of the time of a [4, P] one, and a decode
    step of 16 slots about as long as the [1, P] call)."""
    pending, _, running = _pending(s, jnp.arange(z.slots))
    waiting = running & (pending > 1)
    company = min(4, z.prefill_buckets[-1])
    most = jnp.max(jnp.sum(waiting.reshape(z.shards, -1), axis=1))
    idle = 2 * jnp.sum(running & (pending == 1)) <= z.slots
    return jnp.any(waiting) & ((most >= company) | idle | (s["next_row"] >= z.rows))


def _prefill(s, ctx: Ctx):
    """Prefill calls, oldest rows of each shard first, until no row has more than one token
    pending (or every such row is stalled for pages); each call has the smallest compiled
    number of rows that holds the most waiting rows of any shard."""
    z = ctx.z
    sl = z.slots // z.shards
    offsets = (jnp.arange(z.shards) * sl)[:, None]
    buckets = z.prefill_buckets

    def eligible(s):
        pending, _, running = _pending(s, jnp.arange(z.slots))
        return running & (pending > 1) & ~s["stalled"], pending

    def call(rows, s, ok, pending):
        age = jnp.where(ok, s["stamp"], _FOREVER).reshape(z.shards, sl)
        slots = (jax.lax.top_k(-age, rows)[1] + offsets).reshape(-1)  # oldest of each shard
        return _advance(s, ctx, slots, ok[slots], jnp.minimum(pending[slots], z.chunk), z.chunk)

    def body(s):
        ok, pending = eligible(s)
        most = jnp.max(jnp.sum(ok.reshape(z.shards, sl), axis=1))
        pick = jnp.minimum(jnp.sum(most > jnp.asarray(buckets)), len(buckets) - 1)
        branches = [functools.partial(call, rows) for rows in buckets]
        s = (
            jax.lax.switch(pick, branches, s, ok, pending)
            if len(buckets) > 1
            else branches[0](s, ok, pending)
        )
        stats = {**s["stats"], "prefill_calls": s["stats"]["prefill_calls"] + 1}
        return _constrain({**s, "stats": stats})

    return jax.lax.while_loop(lambda s: jnp.any(eligible(s)[0]), body, s)


def _preempt(s, z: Sizes):
    """In each shard whose active rows all stalled, the youngest row holding pages frees them
    and restarts from its history. Returns (state, any preempted)."""
    sl = z.slots // z.shards
    _, _, running = _pending(s, jnp.arange(z.slots))
    by_shard = lambda x: x.reshape(z.shards, sl)
    stuck = jnp.any(by_shard(running), axis=1) & ~jnp.any(by_shard(s["moved"]), axis=1)  # [D]
    age = by_shard(jnp.where(running & (s["pool"]["held"] > 0), s["stamp"], -1))
    youngest = jnp.argmax(age, axis=1)
    hit = stuck & (jnp.max(age, axis=1) >= 0)
    victim = jnp.zeros((z.shards, sl), bool).at[jnp.arange(z.shards), youngest].set(hit)
    victim = victim.reshape(-1)
    stats = {**s["stats"], "preemptions": s["stats"]["preemptions"] + jnp.sum(hit)}
    s = {
        **s,
        "pool": page_pool.release(s["pool"], victim),
        "c": jnp.where(victim, 0, s["c"]),
        "stats": stats,
    }
    return s, jnp.any(hit)


def run(s, ctx: Ctx, max_steps):
    """Runs iterations until every row is done, a row parked, `max_steps` iterations ran, or
    nothing can move (only parked rows hold the slots or pages)."""
    z = ctx.z
    every = jnp.arange(z.slots)

    def cond(carry):
        s, k = carry
        work = jnp.any((s["status"] == QUEUED) | (s["status"] == ACTIVE))
        return work & (s["parks"] == 0) & (k < max_steps) & ~s["stuck"]

    def body(carry):
        s, k = carry
        s, admitted = _admit(s, z)
        s = {**s, "stalled": jnp.zeros_like(s["stalled"]), "moved": jnp.zeros_like(s["moved"])}
        if z.chunk:
            s = jax.lax.cond(_prefill_due(s, z), lambda s: _prefill(s, ctx), lambda s: s, s)
        pending, _, running = _pending(s, every)
        take = running & ((pending == 1) if z.chunk else (pending >= 1))
        s = _advance(s, ctx, every, take, jnp.ones_like(pending), 1)
        s, preempted = _preempt(s, z)
        stats = {**s["stats"], "steps": s["stats"]["steps"] + 1}
        stuck = ~(jnp.any(s["moved"]) | admitted | preempted)
        return _constrain({**s, "stuck": stuck, "stats": stats}), k + 1

    s = {**s, "parks": jnp.zeros((), jnp.int32), "stuck": jnp.zeros((), bool)}
    return jax.lax.while_loop(cond, body, (_constrain(s), jnp.zeros((), jnp.int32)))[0]


def result(s, z: Sizes) -> dict:
    """`make_sampler`'s dict (plus `generated` and the statistics) from a state."""
    st = s["stats"]
    return {
        "tokens": jnp.concatenate([s["prompt"], s["response"]], axis=1),
        "response": s["response"],
        "response_mask": jnp.arange(z.new)[None] < s["t"][:, None],
        "logprobs": s["logprobs"],
        "generated": s["generated"],
        "lengths": s["t"],
        "finished": s["finished"],
        "steps": st["steps"],
        "prefill_calls": st["prefill_calls"],
        "slot_steps": st["steps"] * z.slots,
        "useful_slot_steps": st["tokens"],
        "peak_pages": st["peak_pages"],
        "preemptions": st["preemptions"],
    }
