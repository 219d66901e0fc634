"""Packed rows: several examples per row, each its own segment, for padding-free batches.

An unpacked batch holds one example per row, right-padded to `seq_len`; on data with a long tail
of lengths most of it is padding. Packing places examples back to back in rows of `seq_len`
positions and records, per position, which example it belongs to:

  segments  int32 [M, L]  k > 0 for the k-th example of the row, 0 at the padding after the last
  positions int32 [M, L]  0, 1, ... restarting at each example (RoPE or learned positions)

beside the example's own arrays (`inputs`, `targets`, the loss `mask`, copied unchanged). The
model reads `segments` as its key mask (models/attention.py): a query attends only keys of its
own example, so every example's logits are those of its unpacked row, and a loss summed over
tokens (the LM and SFT losses: summed NLL over the count of masked tokens) is the same number
on the packed batch as on the unpacked one with the same examples.

The packer is best fit: examples in a seeded random order (a file's neighbours are often alike:
packed in file order, a row, and so a batch, would hold one kind of example), each into the open
row with the least room that still holds it (the earliest such row on a tie), else a new row.
Deterministic in the seed, so a run and its resume (which rebuilds the rows) pack alike; the
training iterator then shuffles rows, not examples, so examples sharing a row stay together
every epoch.
"""

from __future__ import annotations

import bisect

import numpy as np

PACKED_FIELDS = ("segments", "positions")
# `pack_comparisons`' arrays: name -> (rank, dtype); rank 2 is [M, K L], rank 3 [M, C, K].
# "scored" exists only where the examples carry prompt_len (DPO's response tokens).
COMPARISON_FIELDS = {
    "tokens": (2, np.int32),
    "segments": (2, np.int32),
    "positions": (2, np.int32),
    "scored": (2, np.bool_),
    "ranks": (3, np.int32),
    "kmask": (3, np.float32),
    "seg_of": (3, np.int32),
}


def comparison_fields(scored: bool) -> dict:
    """COMPARISON_FIELDS of a packed RM (`scored` False) or DPO (True) batch."""
    return {k: v for k, v in COMPARISON_FIELDS.items() if scored or k != "scored"}


# A stage's data info keys logged once, at its first training row, as `data/<key>`
# (`info_metrics`): the rows an epoch visits and how much of them is padding.
INFO_KEYS = ("train_rows", "pad_fraction", "unpacked_pad_fraction")


def best_fit(lengths, capacity: int) -> list[list[int]]:
    """Example indices of each row: best fit in the given order (module docstring).

    Args:
      lengths: positions each example takes, each in [1, capacity].
      capacity: positions per row.
    """
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (positions left, row), sorted; full rows dropped
    for i, n in enumerate(int(x) for x in lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"example {i} takes {n} positions; a row holds 1 to {capacity}")
        j = bisect.bisect_left(room, (n, -1))
        if j == len(room):
            rows.append([i])
            left, row = capacity - n, len(rows) - 1
        else:
            left, row = room.pop(j)
            rows[row].append(i)
            left -= n
        if left:
            bisect.insort(room, (left, row))
    return rows


def pack(
    examples: dict[str, np.ndarray], lengths, seq_len: int, seed: int | None = None
) -> dict[str, np.ndarray]:
    """Packs right-padded examples into rows of `seq_len`, in a `seed`ed random order (None:
    the given order).

    Args:
      examples: name -> [N, L] arrays, example i's real positions first (`lengths[i]` of them),
        L >= those lengths; every array is packed, padded with what an example shorter than L
        holds past its end (e.g. the tokenizer's pad id; 0 when none is shorter).
      lengths: [N] real positions per example.
      seq_len: positions per packed row.

    Returns:
      name -> [M, seq_len] for every array of `examples`, plus `segments` and `positions` int32
      [M, seq_len]; positions past a row's last example hold the arrays' fill values, segment 0.
    """
    lengths = np.asarray(lengths, np.int64)
    order = np.arange(len(lengths))
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(lengths))
    rows = [[int(order[j]) for j in row] for row in best_fit(lengths[order], seq_len)]
    out = {}
    for name, a in examples.items():
        fill = _fill_value(a, lengths)
        out[name] = np.full((len(rows), seq_len), fill, a.dtype)
    segments = np.zeros((len(rows), seq_len), np.int32)
    positions = np.zeros((len(rows), seq_len), np.int32)
    for r, members in enumerate(rows):
        at = 0
        for k, i in enumerate(members, start=1):
            n = int(lengths[i])
            for name, a in examples.items():
                out[name][r, at : at + n] = a[i, :n]
            segments[r, at : at + n] = k
            positions[r, at : at + n] = np.arange(n)
            at += n
    out["segments"], out["positions"] = segments, positions
    return out


def _fill_value(a: np.ndarray, lengths: np.ndarray):
    """The padding value of an [N, L] array: what any example holds past its length (0 if
    every example fills its row)."""
    short = np.nonzero(lengths < a.shape[1])[0]
    if not len(short):
        return np.zeros((), a.dtype)
    i = short[0]
    return a[i, lengths[i]]


def pad_fraction(segments_or_lengths, seq_len: int | None = None) -> float:
    """The fraction of positions that are padding: of packed rows (their `segments` [M, L]), or
    of unpacked ones (`lengths` [N] of rows of `seq_len`)."""
    a = np.asarray(segments_or_lengths)
    if seq_len is None:
        return float(np.mean(a == 0)) if a.size else 0.0
    return 1.0 - float(a.sum()) / (len(a) * seq_len) if len(a) else 0.0


def pack_comparisons(ex: dict[str, np.ndarray], seed: int | None = None, per_row: int = 0):
    """Packs comparisons (data/rm_data.py layout: tokens and mask [N, K, L], ranks and kmask
    [N, K]; DPO's also prompt_len [N]) into rows of K * L positions, best fit in a `seed`ed
    order.

    A comparison is the unit: its present sequences (prompt + response k, for every slot with
    kmask 1) sit back to back in one row, each its own segment, so a row of K * L positions
    holds at least the one comparison an unpacked row holds and as many more as fit. Per row,
    the comparisons are listed in slots c < `per_row` (0: the most any row holds):

      tokens, segments, positions  int32 [M, K L]  (segments/positions as `pack`'s)
      scored     bool  [M, K L]    response tokens (positions >= prompt_len of their sequence;
                                   only where `ex` has prompt_len)
      ranks      int32 [M, C, K]   comparison c's ranks, -1 in absent slots and empty c
      kmask      float32 [M, C, K] 1 where present
      seg_of     int32 [M, C, K]   the segment id of comparison c's response k (0: absent)

    Everything a comparison's loss reads stays within its row, so rows split across devices
    and microbatches like unpacked ones. Returns (packed, per_row)."""
    tokens, mask = ex["tokens"], ex["mask"].astype(bool)
    n, k, length = tokens.shape
    present = ex["kmask"] > 0
    seq_len = np.where(present, mask.sum(axis=-1), 0)  # [N, K]
    order = np.arange(n)
    if seed is not None:
        order = np.random.default_rng(seed).permutation(n)
    sizes = np.maximum(seq_len.sum(axis=-1), 1)  # an all-absent comparison still takes a slot
    rows = [[int(order[j]) for j in row] for row in best_fit(sizes[order], k * length)]
    per_row = max(per_row, max((len(r) for r in rows), default=1))
    m, width = len(rows), k * length
    fill = _fill_value(tokens.reshape(n * k, length), mask.reshape(n * k, length).sum(axis=-1))
    out = {
        "tokens": np.full((m, width), fill, tokens.dtype),
        "segments": np.zeros((m, width), np.int32),
        "positions": np.zeros((m, width), np.int32),
        "ranks": np.full((m, per_row, k), -1, np.int32),
        "kmask": np.zeros((m, per_row, k), np.float32),
        "seg_of": np.zeros((m, per_row, k), np.int32),
    }
    prompt_len = ex.get("prompt_len")
    if prompt_len is not None:
        out["scored"] = np.zeros((m, width), bool)
    for r, members in enumerate(rows):
        at, seg = 0, 0
        for c, i in enumerate(members):
            out["ranks"][r, c], out["kmask"][r, c] = ex["ranks"][i], ex["kmask"][i]
            for j in np.nonzero(present[i])[0]:
                s = int(seq_len[i, j])
                seg += 1
                out["tokens"][r, at : at + s] = tokens[i, j, :s]
                out["segments"][r, at : at + s] = seg
                out["positions"][r, at : at + s] = np.arange(s)
                if prompt_len is not None:  # a first token is never scored, so no log-prob
                    # predicted from the segment before counts
                    out["scored"][r, at : at + s] = np.arange(s) >= max(prompt_len[i], 1)
                out["seg_of"][r, c, j] = seg
                at += s
    return out, per_row


def pack_comparison_sets(train_ex: dict, eval_ex: dict | None, seed: int):
    """(train rows, eval rows or None, info): `pack_comparisons` of a stage's train (in `seed`'s
    order) and eval comparisons with one comparison-slot count C for both, so each step compiles
    once; info has train_rows, pad_fraction and the unpacked_pad_fraction of the train set."""
    packed, per_row = pack_comparisons(train_ex, seed)
    packed_eval = None
    if eval_ex is not None:
        packed_eval, per_row = pack_comparisons(eval_ex, None, per_row)
        if per_row > packed["kmask"].shape[1]:
            packed, _ = pack_comparisons(train_ex, seed, per_row)
    info = {
        "train_rows": len(packed["tokens"]),
        "pad_fraction": pad_fraction(packed["segments"]),
        "unpacked_pad_fraction": comparison_pad_fraction(train_ex),
    }
    return packed, packed_eval, info


def comparison_pad_fraction(ex: dict) -> float:
    """Padding among all N K L positions of unpacked comparison rows (the model runs absent
    slots too)."""
    return 1.0 - float(ex["mask"].sum()) / max(ex["mask"].size, 1)


def info_metrics(info: dict) -> dict:
    """{"data/<key>": value} of the INFO_KEYS a stage's data info has (loop.Setup.data_info)."""
    return {f"data/{k}": float(info[k]) for k in INFO_KEYS if k in info}
