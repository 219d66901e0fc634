"""On-device sampling: one jitted prefill + `lax.while_loop` decode, and teacher-forced logprobs.

This module owns autoregressive generation from a `model.Transformer` given as (graphdef, params):
the sampling rules (greedy, temperature, top-k, top-p), EOS stopping, left-padded prompts, the
per-row PRNG streams. `sequence_logprobs` names, beside the rules that define the distribution,
its teacher-forced scorer: `likelihood.teacher_forced_logprobs`, the one log-prob function that
every trainer (PPO's and GRPO's logp_old / logp_ref, DPO's sums) and likelihood calls, so the
log-probs they train on are those of the distribution that sampled the tokens. It stays one
piece (about 400 lines): the sampling rules and the decode loop define that distribution.

Layout of one call (everything inside ONE compiled function; nothing crosses to the host):

    prompts [B, P] left-padded --prefill (one model call, KV cache of P + T slots)--> token 0
    while t < T and not every row has emitted EOS:       (one model call + sampling ops per step)
        feed token t-1 at position len(prompt) + t - 1 --> logits [B, V] --> token t

Padding invariance: a row's positions count its real tokens only and padded slots are masked out
of attention, so a row's completion does not depend on how much padding it carries. Its PRNG
stream is `fold_in(row_key, t)`, so it does not depend on which other rows share the batch.

Static vs traced (see `make_sampler`): shapes, graphdef, max_new_tokens, eos/pad ids, the mesh
and rules, and the sampling *mode* (greedy / plain sampling / filtered sampling) are static; the
values of temperature, top_k and top_p are traced, so changing them never recompiles.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.infra import sharding
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.sampling import likelihood

MODES = ("greedy", "sample", "filter")

# Logical names of the cache arrays (see model.py): batch rows follow the activations' batch
# sharding and kv heads the query heads' tensor sharding, so attention needs no resharding.
_CACHE_KV_AXES = (None, "act_batch", None, "act_heads", None)  # [L, B, S, K, H]
_CACHE_MASK_AXES = ("act_batch", None)  # [B, S]


def sampling_mode(temperature: float, top_k: int, top_p: float, greedy: bool) -> str:
    """Validates the sampling knobs and returns the static mode they need.

    temperature == 0 means greedy. Filtering (a sort over the vocabulary per step) is compiled
    in only when top_k > 0 or top_p < 1.

    Returns:
      "greedy", "sample" or "filter".
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")
    if greedy or temperature == 0:
        return "greedy"
    return "filter" if top_k > 0 or top_p < 1.0 else "sample"


def sampling_knobs(temperature, top_k, top_p, greedy) -> tuple[str, dict]:
    """(the static mode, the traced knobs dict) of a call's sampling arguments (`sampling_mode`);
    a greedy call's temperature becomes 1 (unused)."""
    mode = sampling_mode(temperature, top_k, top_p, greedy)
    return mode, {
        "temperature": jnp.asarray(temperature if temperature > 0 else 1.0, jnp.float32),
        "top_k": jnp.asarray(top_k, jnp.int32),
        "top_p": jnp.asarray(top_p, jnp.float32),
    }


def filter_logits(scaled, top_k, top_p):
    """Keeps the top-k tokens, then the nucleus of them; everything else becomes -inf.

    The nucleus is the smallest prefix of the tokens sorted by probability (after top-k,
    renormalised) whose mass reaches top_p: a token is kept when the mass strictly before it is
    below top_p, so the most likely token is always kept. Tokens tied with the last kept logit
    are kept too.

    Args:
      scaled: [B, V] float32 logits, already divided by the temperature.
      top_k: int32 scalar; 0 disables it.
      top_p: float32 scalar in (0, 1]; 1 disables it.

    Returns:
      [B, V] float32: `scaled` where allowed, -inf elsewhere.
    """
    v = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)  # [B, V] sorted high to low
    rank = jnp.arange(v)
    in_k = rank < jnp.where(top_k > 0, jnp.minimum(top_k, v), v)  # [V]
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
    keep = (in_k & ((mass_before < top_p) | (top_p >= 1.0))) | (rank == 0)
    n_keep = jnp.sum(keep, axis=-1)  # the kept set is a prefix of the sorted order
    threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)  # [B, 1]
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sampling_logits(logits, knobs: dict, mode: str):
    """The logits of the distribution tokens are drawn from.

    Args:
      logits: [B, V] float32, the model's unmodified logits.
      knobs: {"temperature": f32 [], "top_k": i32 [], "top_p": f32 []} (traced).
      mode: "greedy" (the logits unchanged), "sample" (divided by the temperature) or
        "filter" (divided, then outside top-k / top-p set to -inf, i.e. renormalised over the
        kept tokens by any softmax of the result).

    Returns:
      [B, V] float32.
    """
    if mode == "greedy":
        return logits
    scaled = logits / knobs["temperature"]
    if mode == "filter":
        return filter_logits(scaled, knobs["top_k"], knobs["top_p"])
    if mode != "sample":
        raise ValueError(f"unknown sampling mode: {mode!r}; expected one of {MODES}")
    return scaled


def sample_tokens(logits, step_keys, knobs: dict, mode: str):
    """Picks one token per row.

    Args:
      logits: [B, V] float32, the model's unmodified logits.
      step_keys: [B] typed PRNG keys, one per row for this step (unused when greedy).
      knobs: {"temperature": f32 [], "top_k": i32 [], "top_p": f32 []} (traced).
      mode: "greedy" (argmax), "sample" (temperature only) or "filter" (+ top-k / top-p).

    Returns:
      [B] int32 tokens.
    """
    return _draw(sampling_logits(logits, knobs, mode), step_keys, mode)


def _draw(dist_logits, step_keys, mode: str):
    """[B] int32 tokens from the sampling distribution's logits [B, V]."""
    if mode == "greedy":
        return jnp.argmax(dist_logits, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(step_keys, dist_logits).astype(jnp.int32)


def _active_rules(mesh, rules):
    return contextlib.nullcontext() if mesh is None else sharding.use_rules(mesh, rules)


def _constrain_cache(cache: dict) -> dict:
    return {
        "k": sharding.constrain(cache["k"], _CACHE_KV_AXES),
        "v": sharding.constrain(cache["v"], _CACHE_KV_AXES),
        "mask": sharding.constrain(cache["mask"], _CACHE_MASK_AXES),
        "index": cache["index"],
    }


def prefill(model, prompts, prompt_mask, cache_len: int):
    """Runs the whole left-padded prompt through the model in one call, filling a fresh cache.

    Args:
      model: the merged `Transformer`.
      prompts: [B, P] int32, left-padded.
      prompt_mask: [B, P] bool, False at padding; every row needs at least one real token.
      cache_len: S, the number of cache slots (P + max new tokens).

    Returns:
      (logits [B, V] float32 for the token after the prompt; the cache; prompt lengths [B]
       int32).
    """
    b, _ = prompts.shape
    prompt_mask = prompt_mask.astype(bool)
    lengths = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)  # [B]
    # Position = index among the row's real tokens; padding slots get 0 and are masked anyway.
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1, dtype=jnp.int32) - 1, 0)  # [B, P]
    cache = _constrain_cache(model_lib.init_cache(model.cfg, b, cache_len))
    hidden, cache = model(
        prompts, positions=positions, key_mask=prompt_mask, cache=cache, return_hidden=True
    )
    # Left padding puts every row's last real token in the last column.
    logits = model.unembed(hidden[:, -1:])[:, 0]  # never builds [B, P, V] prompt logits
    return logits, _constrain_cache(cache), lengths


def decode_step(model, cache: dict, tokens, positions):
    """Feeds one token per row through the model, appending to the cache.

    Args:
      model: the merged `Transformer`.
      cache: the KV cache; the token is written at slot `cache["index"]`.
      tokens: [B] int32.
      positions: [B] int32 position ids of `tokens`.

    Returns:
      (logits [B, V] float32, the updated cache).
    """
    logits, cache = model(tokens[:, None], positions=positions[:, None], cache=cache)
    return logits[:, 0], _constrain_cache(cache)


def _token_logprob(logits, tokens):
    """log softmax(logits)[token] in float32: logits [B, V], tokens [B] -> [B]."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def stop_ids(eos_id) -> tuple[int, ...]:
    """An `eos_id` argument as a tuple: one id or a sequence of them (LLaMA 3 Instruct stops at
    `<|eot_id|>` and `<|end_of_text|>`); a negative id never matches."""
    if isinstance(eos_id, int) or hasattr(eos_id, "__index__"):
        return (int(eos_id),)
    return tuple(int(i) for i in eos_id)


def is_stop(tokens, eos_id):
    """tokens [...] int -> bool [...]: the token is one of the stop ids (`stop_ids`)."""
    hit = jnp.zeros(tokens.shape, bool)
    for i in stop_ids(eos_id):
        hit = hit | (tokens == i)
    return hit


def _generate(
    params,
    prompts,
    prompt_mask,
    row_keys,
    knobs,
    mode: str,
    *,
    graphdef,
    max_new_tokens: int,
    eos_id: tuple[int, ...],
    pad_id: int,
    mesh,
    rules,
):
    """The traced body of `make_sampler`'s function (arguments documented there)."""
    with _active_rules(mesh, rules):
        model = nnx.merge(graphdef, params)
        cfg = model.cfg
        b, p = prompts.shape
        t_max = max_new_tokens
        if cfg.head != "lm":
            raise ValueError(f"cannot sample from a model with a {cfg.head!r} head")
        if cfg.family == "gpt2" and p + t_max > cfg.max_len:
            raise ValueError(
                f"prompt length {p} + max_new_tokens {t_max} exceeds the model's learned "
                f"positions (max_len={cfg.max_len})"
            )
        logits, cache, prompt_len = prefill(model, prompts, prompt_mask, p + t_max)

        def pick(logits, t):
            """Token [B] for response position t, and its logprob [B] under the distribution
            that drew it (the unmodified model's when greedy)."""
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, t)
            dist = sampling_logits(logits.astype(jnp.float32), knobs, mode)  # [B, V]
            tokens = _draw(dist, step_keys, mode)
            return tokens, _token_logprob(dist, tokens)

        def record(s, tokens, logp):
            """Writes response position s["t"]; rows already done get pad, logprob 0."""
            done, t = s["done"], s["t"]
            tokens = jnp.where(done, pad_id, tokens)
            logp = jnp.where(done, 0.0, logp)
            return {
                **s,
                "t": t + 1,
                "token": tokens,
                "done": done | is_stop(tokens, eos_id),
                "lengths": s["lengths"] + (~done).astype(jnp.int32),
                "response": jax.lax.dynamic_update_slice(s["response"], tokens[:, None], (0, t)),
                "logprobs": jax.lax.dynamic_update_slice(s["logprobs"], logp[:, None], (0, t)),
            }

        batch_2d = lambda x: sharding.constrain(x, ("act_batch", None))
        state = {
            "t": jnp.zeros((), jnp.int32),
            "cache": cache,
            "token": jnp.zeros((b,), jnp.int32),
            "done": jnp.zeros((b,), bool),
            "lengths": jnp.zeros((b,), jnp.int32),
            "response": batch_2d(jnp.full((b, t_max), pad_id, jnp.int32)),
            "logprobs": batch_2d(jnp.zeros((b, t_max), jnp.float32)),
        }
        state = record(state, *pick(logits, 0))

        def cond(s):
            return (s["t"] < t_max) & ~jnp.all(s["done"])

        def body(s):
            # Token t-1 sits at position len(prompt) + t - 1 and goes into slot P + t - 1.
            step_model = nnx.merge(graphdef, params)
            logits, cache = decode_step(step_model, s["cache"], s["token"], prompt_len + s["t"] - 1)
            return record({**s, "cache": cache}, *pick(logits, s["t"]))

        s = jax.lax.while_loop(cond, body, state)
        response_mask = jnp.arange(t_max)[None, :] < s["lengths"][:, None]  # [B, T]
        return {
            "tokens": jnp.concatenate([prompts.astype(jnp.int32), s["response"]], axis=1),
            "response": s["response"],
            "response_mask": response_mask,
            "logprobs": s["logprobs"],
            "lengths": s["lengths"],
            "finished": s["done"],
            "steps": s["t"],
        }


def make_sampler(
    graphdef,
    *,
    max_new_tokens: int,
    eos_id: int | tuple[int, ...],
    pad_id: int,
    mesh=None,
    rules=None,
):
    """Builds the generation function; it compiles once per (prompt shape, sampling mode).

    Static (bound here): the model graph, `max_new_tokens`, `eos_id` (an id or a sequence of
    ids, any of which ends a row; a negative id never matches, so every row decodes all tokens),
    `pad_id`, the mesh and the rules. The sampling
    mode (greedy / sample / filter, from `sampling_mode`) is a static argument of the jitted
    function; temperature, top_k and top_p are traced scalars.

    Per-step work is one model call on [B, 1] tokens plus the sampling ops on [B, V]. The KV
    cache is created inside the compiled function and carried by the `while_loop`, so there is
    nothing to donate: the loop's buffers are reused across steps and the new token's keys and
    values are written with `dynamic_update_slice`. With a mesh, rows are sharded over
    `act_batch` and the cache is constrained to (layers, act_batch, len, act_heads, head_dim);
    params keep whatever sharding they arrive with (e.g. from `state.param_shardings`).

    Returns:
      `sample(params, prompts, prompt_mask, row_keys, *, temperature=1.0, top_k=0, top_p=1.0,
      greedy=False) -> dict` with
        tokens [B, P + T] int32: the prompt followed by the response,
        response [B, T] int32: pad after EOS,
        response_mask [B, T] bool: True up to and including EOS,
        logprobs [B, T] float32: log-probability of each sampled token under the distribution
          that drew it (logits / temperature, renormalised over the top-k / top-p set; the
          unmodified model's when greedy), 0 where masked. PPO recomputes logp_old
          teacher-forced under the same temperature (`sequence_logprobs`), and gets these,
        lengths [B] int32: response tokens including EOS,
        finished [B] bool: the row emitted EOS,
        steps [] int32: response positions decoded before the loop stopped (< T when every row
          finished early).
      prompts [B, P] are left-padded, prompt_mask [B, P] is False at padding, row_keys [B] are
      typed PRNG keys (`jax.random.key`), e.g. `fold_in(root, example_id)`. The jitted
      function itself is `sample.jitted`.
    """
    rules = sharding.normalize_rules(rules if rules is not None else sharding.DEFAULT_RULES)
    impl = functools.partial(
        _generate,
        graphdef=graphdef,
        max_new_tokens=max_new_tokens,
        eos_id=stop_ids(eos_id),
        pad_id=pad_id,
        mesh=mesh,
        rules=rules,
    )
    if mesh is None:
        jitted = jax.jit(impl, static_argnums=5)
    else:
        rows = lambda ndim: sharding.batch_sharding(mesh, rules, ndim)
        rep = sharding.replicated(mesh)
        jitted = jax.jit(
            impl,
            static_argnums=5,  # mode
            # None: params keep the sharding they were restored / created with.
            in_shardings=(None, rows(2), rows(2), rows(1), rep),
            out_shardings={
                **{k: rows(2) for k in ("tokens", "response", "response_mask", "logprobs")},
                **{k: rows(1) for k in ("lengths", "finished")},
                "steps": rep,
            },
        )

    def sample(
        params, prompts, prompt_mask, row_keys, *, temperature=1.0, top_k=0, top_p=1.0, greedy=False
    ):
        mode, knobs = sampling_knobs(temperature, top_k, top_p, greedy)
        return jitted(params, prompts, prompt_mask, row_keys, knobs, mode)

    sample.jitted = jitted
    return sample


# Memoised per (graphdef, T, ids, mesh, rules), so `generate` compiles once per shape and mode.
_cached_sampler = functools.lru_cache(maxsize=16)(make_sampler)


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
) -> dict:
    """Samples completions of left-padded prompts: `make_sampler` with its function memoised.

    Args:
      graphdef: the model's NNX graphdef.
      params: the model's params pure dict (sharded or not).
      prompts: [B, P] int32, left-padded with pad_id.
      prompt_mask: [B, P] bool, False at padding.
      row_keys: [B] typed PRNG keys, one stream per row.
      max_new_tokens: T.
      eos_id: stops a row once emitted (and is kept in the response): an id or a sequence of
        ids (a tokenizer's `eos_ids`); -1 never stops.
      pad_id: fills the response after EOS.
      temperature, top_k, top_p, greedy: see `sampling_mode` and `filter_logits`.
      mesh, rules: shard rows over `act_batch` (rules default to sharding.DEFAULT_RULES).

    Returns:
      The dict described in `make_sampler`.
    """
    rules = sharding.normalize_rules(rules if rules is not None else sharding.DEFAULT_RULES)
    sample = _cached_sampler(
        graphdef,
        max_new_tokens=max_new_tokens,
        eos_id=stop_ids(eos_id),  # hashable for the cache
        pad_id=pad_id,
        mesh=mesh,
        rules=rules,
    )
    knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    return sample(params, prompts, prompt_mask, row_keys, **knobs)


def sequence_logprobs(graphdef, params, tokens, mask, *, start: int = 0, temperature=1.0):
    """The teacher-forced log-probs of this sampler's distribution at `temperature` (no top-k /
    top-p): `likelihood.teacher_forced_logprobs`, the one log-prob function, which see.

    Returns:
      [B, S-1-start] float32: entry t scores tokens[:, start+t+1]; 0 at padding.
    """
    return likelihood.teacher_forced_logprobs(
        graphdef, params, tokens, mask, start=start, temperature=temperature
    )
