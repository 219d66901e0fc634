"""The rollout engine: continuous batching over a paged KV cache, with multi-turn rows.

This module owns the engine's entry points: `make_engine` (the call signature and result of
`sampler.make_sampler`, so a stage switches with one line), `generate` (memoised, as
`sampler.generate`) and `Rollout`, the host handle of multi-turn rows. The compiled loop is
engine_loop.py's, the page bookkeeping page_pool.py's, the paged cache models/paged.py's.

Rows of a queue (prompts in the caller's order; k samples of a prompt are k rows with distinct
row keys, as for the static sampler) run in a fixed number of decode slots. When a row ends (a
stop id or its token limit) the next queued row takes its slot without leaving the compiled
`while_loop`. Keys and values live in fixed-size pages that rows take as they grow and give back
when they end, so KV memory follows the tokens in flight, not slots x max length. The engine
runs the trainer's own model code and the static sampler's rules (`sampler.sampling_logits`,
`_draw`, `is_stop`, the per-row stream `fold_in(row_key, t)`), so a row's tokens and log-probs
do not depend on its slot or on the rows beside it, and equal the static sampler's (the
reference) for the same prompt and key.

Prompt consumption: chunked prefill, the default (`prefill_chunk` tokens of up to
`prefill_rows` rows per model call, a whole prompt by default), or token by token
(`prefill_chunk=0`: prompt tokens ride in the decode batch, one per slot per step).
Both measured by `python -m rlhf_jax.tools.bench rollout [--prefill-chunk 0]` on the 2-core CPU
(BENCHMARKS.md, "Rollout engine"): level on skewed lengths (3.0x and 2.9x the static sampler),
but on short uniform rows token by token spends each row's prompt in decode slot-steps (useful
fraction 0.59 against 1.07) and its lead over the static sampler fell to 1.17x in one run and
to a 12% loss in another, where chunked prefill kept 1.28x. Chunked prefill is the default; it is
also what an accelerator wants, where a decode step costs a read of the weights whatever its
batch, so a prompt token per step costs a weight read per prompt token.

Multi-turn (`Rollout`, from `sample.start`): a row that samples one of `yield_ids` parks (its
slot and pages kept) and the loop returns to the host once any row parked, nothing else can
move, or a step budget ran out. The host appends tokens to parked rows (a tool's output, the
next user turn), which the loop prefills into the row's cache when it resumes, or ends them.
`generated` marks the tokens the policy sampled, the only ones with log-probs (0 at inserted
ones); inserted tokens count towards the row's `max_new_tokens` and its stream index t.

Sharding: with a mesh, slots and pages split over the `act_batch` mesh axes (each shard's slots
use its own pages) and kv heads over `act_heads`; `num_slots` and `num_pages` must divide over
the data-parallel shards. Queue-sized arrays ([N, ...], small) are replicated inside the loop.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlhf_jax.infra import sharding
from rlhf_jax.sampling import engine_loop as loop
from rlhf_jax.sampling import sampler

QUEUED, ACTIVE, PARKED, DONE = loop.QUEUED, loop.ACTIVE, loop.PARKED, loop.DONE
_FOREVER = 2**30
_ROW_KEYS = ("tokens", "response", "response_mask", "logprobs", "generated")
_STAT_KEYS = ("steps", "prefill_calls", "slot_steps", "useful_slot_steps", "peak_pages",
              "preemptions")  # fmt: skip


def _active_rules(mesh, rules):
    return contextlib.nullcontext() if mesh is None else sharding.use_rules(mesh, rules)


def _check_model(cfg, p: int, t_max: int):
    if cfg.head != "lm":
        raise ValueError(f"cannot sample from a model with a {cfg.head!r} head")
    if cfg.family == "gpt2" and p + t_max > cfg.max_len:
        raise ValueError(
            f"prompt length {p} + max_new_tokens {t_max} exceeds the model's learned "
            f"positions (max_len={cfg.max_len})"
        )


def make_engine(
    graphdef,
    *,
    max_new_tokens: int,
    eos_id: int | tuple[int, ...],
    pad_id: int,
    mesh=None,
    rules=None,
    num_slots: int | None = None,
    page_size: int = 16,
    num_pages: int | None = None,
    prefill_chunk: int | None = None,
    prefill_rows: int | None = None,
    yield_ids: int | tuple[int, ...] = (),
):
    """Builds the engine's generation function; it compiles once per (prompt shape, mode).

    Args:
      graphdef, max_new_tokens, eos_id, pad_id, mesh, rules: as `sampler.make_sampler`.
      num_slots: S decode slots (default: one per row, i.e. no queue); a multiple of the
        data-parallel shards.
      page_size: tokens per page.
      num_pages: pages in the pool (default: every slot at full length, so no row ever waits
        for pages); at least one row of P + T tokens per shard, or a ValueError.
      prefill_chunk: prompt (and inserted) tokens per row per prefill call (default: P);
        0 consumes them token by token in the decode steps.
      prefill_rows: the most rows per prefill call, a multiple of the shards (default: every
        slot); calls of 1, 2, 4, ... rows per shard up to it are compiled, and each call
        takes the smallest that holds the waiting rows.
      yield_ids: ids at which a row parks for the host (`Rollout`, from `sample.start`; the
        one-shot `sample` then refuses to run); none by default.

    Returns:
      `sample(params, prompts, prompt_mask, row_keys, *, temperature=1.0, top_k=0, top_p=1.0,
      greedy=False) -> dict`: `make_sampler`'s keys and meanings (tokens [N, P + T],
      response, response_mask, logprobs, lengths, finished; `steps` counts loop iterations)
      plus generated [N, T] bool and the statistics prefill_calls, slot_steps (S x steps),
      useful_slot_steps (sampled tokens), peak_pages and preemptions. Rows come back in the
      caller's order. `sample.start(...)` (same arguments) returns a `Rollout` for multi-turn
      use; `sample.jitted` is the compiled one-shot function, `sample.sizes(n, p)` the sizes.
    """
    rules = sharding.normalize_rules(rules if rules is not None else sharding.DEFAULT_RULES)
    shards = 1 if mesh is None else sharding.data_parallel_size(mesh, rules)
    opts = dict(shards=shards, num_slots=num_slots, page_size=page_size, num_pages=num_pages,
                prefill_chunk=prefill_chunk, prefill_rows=prefill_rows)  # fmt: skip
    eos, yields = sampler.stop_ids(eos_id), sampler.stop_ids(yield_ids)
    sizes = lambda n, p: loop.sizes(n, p, max_new_tokens, yields=bool(yields), **opts)

    def ctx(params, knobs, mode, z):
        return loop.Ctx(z, graphdef, params, knobs, mode, eos, yields, pad_id)

    def start(params, prompts, prompt_mask, row_keys):
        with _active_rules(mesh, rules):
            cfg = nnx.merge(graphdef, params).cfg
            _check_model(cfg, prompts.shape[1], max_new_tokens)
            z = sizes(*prompts.shape)
            return loop.init(prompts, prompt_mask, row_keys, cfg=cfg, z=z, pad_id=pad_id)

    def run(params, state, knobs, max_steps, mode):
        with _active_rules(mesh, rules):
            z = sizes(*state["prompt"].shape)
            return loop.run(state, ctx(params, knobs, mode, z), max_steps)

    def result(state):
        return loop.result(state, sizes(*state["prompt"].shape))

    def one_shot(params, prompts, prompt_mask, row_keys, knobs, mode):
        state = start(params, prompts, prompt_mask, row_keys)
        return result(run(params, state, knobs, _FOREVER, mode))

    if mesh is None:
        jitted = jax.jit(one_shot, static_argnums=5)
    else:
        rows = lambda ndim: sharding.batch_sharding(mesh, rules, ndim)
        rep = sharding.replicated(mesh)
        jitted = jax.jit(
            one_shot,
            static_argnums=5,  # mode
            in_shardings=(None, rows(2), rows(2), rows(1), rep),
            out_shardings={
                **{k: rows(2) for k in _ROW_KEYS},
                **{k: rows(1) for k in ("lengths", "finished")},
                **{k: rep for k in _STAT_KEYS},
            },
        )
    fns = {
        "start": jax.jit(start),
        "run": jax.jit(run, static_argnums=4, donate_argnums=1),
        "append": jax.jit(functools.partial(_append, sizes=sizes), donate_argnums=0),
        "end": jax.jit(functools.partial(_end, sizes=sizes), donate_argnums=0),
        "result": jax.jit(result),
    }

    def sample(
        params, prompts, prompt_mask, row_keys, *, temperature=1.0, top_k=0, top_p=1.0, greedy=False
    ):
        if yields:
            raise ValueError("an engine with yield_ids returns at parked rows: use sample.start")
        mode, knobs = sampler.sampling_knobs(temperature, top_k, top_p, greedy)
        return jitted(params, prompts, prompt_mask, row_keys, knobs, mode)

    def start_rollout(
        params, prompts, prompt_mask, row_keys, *, temperature=1.0, top_k=0, top_p=1.0, greedy=False
    ):
        mode, knobs = sampler.sampling_knobs(temperature, top_k, top_p, greedy)
        state = fns["start"](params, prompts, prompt_mask, row_keys)
        return Rollout(fns, params, state, knobs, mode, max_new_tokens, pad_id)

    sample.jitted = jitted
    sample.start = start_rollout
    sample.sizes = sizes
    return sample


def _rows_mask(state, rows):
    """[S] bool: the slots that hold one of rows [R] (out-of-range ids hold none)."""
    return jnp.any(state["slot_row"][None, :] == rows[:, None], axis=0)


def _append(state, rows, tokens, lengths, *, sizes):
    """Writes tokens [R, W] (the first lengths [R] of each row) after the responses of rows [R]
    (N: none) as inserted tokens and sets the rows running; a row left without room ends."""
    z = sizes(*state["prompt"].shape)
    ok = rows < z.rows
    row = jnp.where(ok, rows, 0)
    t = state["t"][row]
    put = ok[:, None] & (jnp.arange(tokens.shape[1])[None] < lengths[:, None])
    col = jnp.minimum(t[:, None] + jnp.arange(tokens.shape[1])[None], z.new - 1)
    at = jnp.where(put, row[:, None], z.rows)
    t = t + lengths
    full = ok & (t >= z.new)
    status = jnp.where(full, DONE, ACTIVE)
    state = {
        **state,
        "response": state["response"].at[at, col].set(tokens, mode="drop"),
        "t": state["t"].at[jnp.where(ok, row, z.rows)].set(t, mode="drop"),
        "status": state["status"].at[jnp.where(ok, row, z.rows)].set(status, mode="drop"),
    }
    return loop.free_slots(state, _rows_mask(state, jnp.where(full, row, -2)))


def _end(state, rows, *, sizes):
    """Ends parked rows [R] (N: none) for the caller: done, finished, slots and pages freed."""
    z = sizes(*state["prompt"].shape)
    at = jnp.where(rows < z.rows, rows, z.rows)
    state = {
        **state,
        "status": state["status"].at[at].set(DONE, mode="drop"),
        "finished": state["finished"].at[at].set(True, mode="drop"),
    }
    return loop.free_slots(state, _rows_mask(state, jnp.where(rows < z.rows, rows, -2)))


def _bucket(n: int) -> int:
    """The next power of two >= n (>= 1): few shapes for the host's append calls."""
    return 1 << max(n - 1, 0).bit_length()


class Rollout:
    """Host handle on a batch of rows being generated, for multi-turn use.

        r = sample.start(params, prompts, mask, keys, temperature=0.7)
        while not r.run().done:
            view = r.view()                      # numpy: status, lengths, response, ...
            r.append(r.parked, [tool(view["response"][i, : view["lengths"][i]])
                                for i in r.parked])   # or r.end(rows)
        out = r.result()                         # make_engine's dict

    `run` returns when a row parked, nothing can move (every running row parked), all rows are
    done, or after `max_steps` loop iterations.
    """

    def __init__(self, fns, params, state, knobs, mode, max_new_tokens, pad_id):
        self._fns, self._params, self.state = fns, params, state
        self._knobs, self._mode = knobs, mode
        self._t_max, self._pad = max_new_tokens, pad_id

    def run(self, max_steps: int | None = None) -> Rollout:
        budget = jnp.asarray(_FOREVER if max_steps is None else max_steps, jnp.int32)
        self.state = self._fns["run"](self._params, self.state, self._knobs, budget, self._mode)
        return self

    def view(self) -> dict:
        """numpy copies of the rows' status, lengths, response and generated mask."""
        keys = {"status": "status", "lengths": "t", "response": "response",
                "generated": "generated"}  # fmt: skip
        return sharding.to_host({k: self.state[v] for k, v in keys.items()})

    @property
    def parked(self) -> np.ndarray:
        """Ids of the rows waiting for the host."""
        return np.flatnonzero(sharding.to_host(self.state["status"]) == PARKED)

    @property
    def done(self) -> bool:
        return bool(np.all(sharding.to_host(self.state["status"]) == DONE))

    def append(self, rows, tokens) -> Rollout:
        """Appends tokens[i] (1-D ints, may be empty) to parked row rows[i] and sets it running.

        Raises ValueError for a row that is not parked or whose response would pass
        max_new_tokens."""
        rows = [int(r) for r in rows]
        seqs = [np.asarray(x, np.int32).reshape(-1) for x in tokens]
        if len(rows) != len(seqs):
            raise ValueError(f"{len(rows)} rows but {len(seqs)} token sequences")
        host = sharding.to_host({"status": self.state["status"], "t": self.state["t"]})
        for r, x in zip(rows, seqs, strict=True):
            if host["status"][r] != PARKED:
                raise ValueError(f"row {r} is not parked (status {int(host['status'][r])})")
            if host["t"][r] + len(x) > self._t_max:
                raise ValueError(
                    f"appending {len(x)} tokens to row {r} passes max_new_tokens="
                    f"{self._t_max} (it holds {int(host['t'][r])})"
                )
        n, width = _bucket(len(rows)), _bucket(max((len(x) for x in seqs), default=1))
        ids = np.full(n, len(host["t"]), np.int32)  # N: no row
        buf = np.full((n, width), self._pad, np.int32)
        lengths = np.zeros(n, np.int32)
        for i, (r, x) in enumerate(zip(rows, seqs, strict=True)):
            ids[i], buf[i, : len(x)], lengths[i] = r, x, len(x)
        self.state = self._fns["append"](self.state, ids, buf, lengths)
        return self

    def end(self, rows) -> Rollout:
        """Ends parked rows (the episode is over): done and finished, their pages freed."""
        n = len(sharding.to_host(self.state["t"]))
        ids = np.full(_bucket(len(rows)), n, np.int32)
        ids[: len(rows)] = rows
        self.state = self._fns["end"](self.state, ids)
        return self

    def result(self) -> dict:
        """`make_engine`'s dict for the rows as they stand."""
        return self._fns["result"](self.state)


# Memoised per (graphdef, T, ids, mesh, rules, engine sizes), so `generate` compiles once per
# shape and mode.
_cached_engine = functools.lru_cache(maxsize=16)(make_engine)


def generate(
    graphdef,
    params,
    prompts,
    prompt_mask,
    row_keys,
    *,
    max_new_tokens: int,
    eos_id: int | tuple[int, ...],
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    mesh=None,
    rules=None,
    **engine_options,
) -> dict:
    """`sampler.generate` through the engine: the same arguments and result, plus the engine's
    options (`make_engine`: num_slots, page_size, num_pages, prefill_chunk, prefill_rows)."""
    rules = sharding.normalize_rules(rules if rules is not None else sharding.DEFAULT_RULES)
    sample = _cached_engine(
        graphdef,
        max_new_tokens=max_new_tokens,
        eos_id=sampler.stop_ids(eos_id),  # hashable for the cache
        pad_id=pad_id,
        mesh=mesh,
        rules=rules,
        **engine_options,
    )
    knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    return sample(params, prompts, prompt_mask, row_keys, **knobs)
