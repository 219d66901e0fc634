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
