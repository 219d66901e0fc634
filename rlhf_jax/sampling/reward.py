"""Scoring sequences with a scalar-head model: the RM read-out, shared by RM training, the score
command and PPO.

The score of a sequence is the scalar head's output at its LAST REAL token (the EOS that ends a
response, or the last kept token of a cut one). Positions count real tokens only and padding is
masked out of attention, so the score does not depend on the padding side or amount. After RM
training a normalisation bias (`meta["reward_bias"]` of the RM checkpoint) makes the reference
responses score 0 on average; `score_texts` and PPO add it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import sft_data
from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib


def last_index(mask):
    """Index of the last True in each row. mask: [B, T] -> [B] int32 (0 for an empty row)."""
    t = mask.shape[-1]
    return (t - 1 - jnp.argmax(mask[..., ::-1], axis=-1)).astype(jnp.int32)


def sequence_scores(graphdef, params, tokens, mask, *, right_padded: bool = False):
    """Scores [B] of sequences tokens [B, T] with real-token mask [B, T].

    `right_padded=True` is a fast path for data known to be right-padded: causal attention
    already keeps padding out of every real token's state, so no attention mask is needed (and
    cuDNN flash attention stays usable).
    """
    model = state_lib.merge(graphdef, params)
    mask = mask.astype(bool)
    if right_padded:
        per_pos, _ = model(tokens)  # [B, T]
    else:
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
        per_pos, _ = model(tokens, positions=positions, key_mask=mask)
    return jnp.take_along_axis(per_pos, last_index(mask)[:, None], axis=-1)[:, 0]


def comparison_scores(graphdef, params, tokens, mask):
    """Scores [P, K] of a comparison batch tokens [P, K, L] (right-padded, one pass each)."""
    p, k, n = tokens.shape
    flat = sequence_scores(
        graphdef, params, tokens.reshape(p * k, n), mask.reshape(p * k, n), right_padded=True
    )
    return flat.reshape(p, k)


def batch_scores(graphdef, params, batch):
    """(scores, ranks, kmask) [P, K] of a comparison batch: unpacked ({"tokens", "mask"
    [P, K, L], "ranks", "kmask" [P, K]}) or packed (data/packing.py `pack_comparisons`: tokens,
    segments, positions [M, T]; ranks, kmask, seg_of [M, C, K], read as P = M C).

    Packed, each sequence is a segment the model attends within, positions restarting, so its
    last token's score is its unpacked row's; absent slots read segment 0 (kmask 0)."""
    if "segments" not in batch:
        scores = comparison_scores(graphdef, params, batch["tokens"], batch["mask"])
        return scores, batch["ranks"], batch["kmask"]
    segments, seg_of = batch["segments"], batch["seg_of"]
    m, c, k = seg_of.shape
    model = state_lib.merge(graphdef, params)
    per_pos, _ = model(batch["tokens"], positions=batch["positions"], key_mask=segments)  # [M, T]
    at = jnp.arange(segments.shape[1], dtype=jnp.int32)
    mine = segments[:, :, None] == jnp.arange(c * k + 1)[None, None, :]  # [M, T, CK+1]
    last = jnp.max(jnp.where(mine, at[None, :, None], 0), axis=1)  # [M, CK+1]
    per_seg = jnp.take_along_axis(per_pos, last, axis=1)
    scores = jnp.take_along_axis(per_seg, seg_of.reshape(m, c * k), 1).reshape(m * c, k)
    flat = lambda a: a.reshape(m * c, k)  # noqa: E731
    return scores, flat(batch["ranks"]), flat(batch["kmask"])


@functools.lru_cache(maxsize=8)
def jitted_scorer(graphdef, mesh, rules):
    """jit of (params, tokens [B, T], mask [B, T]) -> scores [B] of right-padded rows, one per
    (graphdef, mesh, rules): every RM of one graph shares its trace and compile."""

    def fn(params, tokens, mask):
        with sharding.use_rules(mesh, rules):
            return sequence_scores(graphdef, params, tokens, mask, right_padded=True)

    return jax.jit(fn)


def encode_scored(
    pairs: Sequence[tuple[str, str]], finished: Sequence[bool], tok, template: str, seq_len: int
):
    """(tokens int32 [N, L], mask bool [N, L]), right-padded: [bos] + template(prompt) +
    response, + [eos] only where `finished`, cut at the right to L = seq_len.

    A response cut at a length limit is scored where it was cut, as PPO scores its rollouts:
    appending an EOS the policy never emitted would score a different, finished, sequence.
    """
    tokens = np.full((len(pairs), seq_len), tok.pad_id, np.int32)
    mask = np.zeros((len(pairs), seq_len), bool)
    for i, ((prompt, response), done) in enumerate(zip(pairs, finished, strict=True)):
        # Finished: the ids the RM was trained on (sft_data.response_ids, chat templates too).
        r = sft_data.response_ids(tok, template, prompt, response) if done else tok.encode(response)
        ids = (sft_data.prompt_ids(tok, template, prompt) + r)[:seq_len]
        tokens[i, : len(ids)], mask[i, : len(ids)] = ids, True
    return tokens, mask


def score_texts(
    graphdef,
    params,
    tokenizer,
    pairs,
    *,
    template: str,
    seq_len: int,
    mesh,
    rules,
    batch_size: int = 32,
    bias: float = 0.0,
    progress=None,
    finished: Sequence[bool] | None = None,
) -> np.ndarray:
    """Scores of `(prompt, response)` pairs, plus `bias`, as float64 [N].

    Each is tokenized as SFT does: [bos] + template(prompt) + response + [eos], cut to seq_len;
    with `finished` [N], the [eos] only where `finished[i]` (`encode_scored`).
    """
    rules = sharding.normalize_rules(rules)  # hashable, for the compile cache
    fn = jitted_scorer(graphdef, mesh, rules)
    dp = sharding.data_parallel_size(mesh, rules)
    batch_size = max(dp, batch_size - batch_size % dp)
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        if finished is None:
            tokens, mask = sft_data.encode_sequences(chunk, tokenizer, template, seq_len)
        else:
            done = finished[i : i + batch_size]
            tokens, mask = encode_scored(chunk, done, tokenizer, template, seq_len)
        pad = (-len(chunk)) % batch_size  # fill the last batch with 1-token dummy rows
        if pad:
            tokens = np.concatenate([tokens, np.full((pad, seq_len), tokenizer.pad_id, np.int32)])
            mask = np.concatenate([mask, np.zeros((pad, seq_len), bool)])
            mask[-pad:, 0] = True
        # Every process holds all pairs: one global batch in, gathered back (multi-process safe).
        batch = sharding.put_global({"t": tokens, "m": mask}, mesh, rules)
        scores = sharding.to_host(fn(params, batch["t"], batch["m"])).astype(np.float64)
        out.append(scores[: len(chunk)])
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(out) + bias if out else np.zeros(0)
