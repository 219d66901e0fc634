"""Comparisons for DPO: the reward model's K-way examples plus where each response starts.

DPO reads exactly the files, line forms, ranks and held-out split the reward model reads
(data/rm_data.py: reading, checking, encoding, the split on distinct prompt texts). It needs one
thing more: the log-probability of a response given its prompt sums over the response's tokens
only, so each example carries its prompt's length. Layout, N comparisons, K slots, L = seq_len:
  {"tokens": int32 [N, K, L], "mask": bool [N, K, L] (real tokens), "ranks": int32 [N, K]
   (-1 for absent slots), "kmask": float32 [N, K], "prompt_len": int32 [N]}
Response j's tokens are positions prompt_len .. of row (n, j) where `mask` is True (its EOS
included; a response cut at L keeps what fits). Every batching is per prompt: all ranked pairs
of a comparison are one element, as the RM's default.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence

import grain
import numpy as np

from rlhf_jax.data import iterators, packing, rm_data
from rlhf_jax.data.sft_data import prompt_ids
from rlhf_jax.data.tokenizer import Tokenizer

_log = logging.getLogger(__name__)


def encode(comps: Sequence[dict], tokenizer: Tokenizer, template: str, seq_len: int, k: int):
    """`rm_data.encode_comparisons` plus "prompt_len" [N]; returns (examples, info)."""
    ex, info = rm_data.encode_comparisons(comps, tokenizer, template, seq_len, k)
    ex["prompt_len"] = np.array(
        [len(prompt_ids(tokenizer, template, c["prompt"])) for c in comps], np.int32
    ).reshape(len(comps))
    return ex, info


def _pad_rows(examples: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    # All-zero rows have kmask 0: no response, no pair, so they weigh nothing in any sum.
    extra = -len(examples["kmask"]) % multiple
    return {
        key: np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)])
        for key, a in examples.items()
    }


def build_dpo_data(
    train_paths: str | Sequence[str],
    tokenizer: Tokenizer,
    *,
    template: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    k_max: int = 9,
    eval_paths: str | Sequence[str] = "",
    eval_fraction: float = 0.05,
    process_index: int = 0,
    process_count: int = 1,
    packed: bool = False,
) -> tuple[grain.DatasetIterator, list[dict[str, np.ndarray]], list, dict]:
    """Train iterator, eval batches, held-out prompts and counts for the DPO stage.

    Args:
      train_paths: comparison files or globs (any form `rm_data.read_comparisons` reads).
      tokenizer: the tokenizer.
      template: the SFT prompt template.
      seq_len: L.
      batch_size: per-process batch size, in comparisons (also the eval batch size).
      seed: split and shuffle seed.
      k_max: the most responses a comparison may have; K is the largest in the data.
      eval_paths: held-out comparison files; if empty, an `eval_fraction` split of the distinct
        prompts of `train_paths`.
      eval_fraction: fraction of distinct prompts held out when `eval_paths` is empty.
      process_index, process_count: this process and the number of processes.
      packed: rows of K L positions holding whole comparisons back to back (data/packing.py
        `pack_comparisons`, train rows in `seed`'s order); `batch_size` then counts rows.

    Returns:
      (train iterator of [b, K, L] batches; eval batches padded with kmask-0 rows so that no
       held-out comparison is dropped; the distinct held-out prompts in first-seen order (for
       the KL to the reference); info with counts).
    """
    skipped = collections.Counter()
    comps = rm_data.read_comparisons(train_paths, k_max, skipped)
    if not comps:
        raise ValueError(f"data.train: no comparisons in {train_paths!r}")
    if eval_paths:
        train_comps, eval_comps = comps, rm_data.read_comparisons(eval_paths, k_max, skipped)
    else:
        train_comps, eval_comps = rm_data.split_by_prompt(comps, eval_fraction, seed)
    if not train_comps:
        raise ValueError(
            f"data.eval_fraction={eval_fraction} holds out every prompt of {train_paths!r}, "
            "leaving no training comparisons"
        )
    k = max(len(c["ranks"]) for c in [*train_comps, *eval_comps])
    procs = dict(process_index=process_index, process_count=process_count)
    train_ex, train_info = encode(train_comps, tokenizer, template, seq_len, k)
    eval_ex, eval_info = (
        encode(eval_comps, tokenizer, template, seq_len, k) if eval_comps else (None, {})
    )
    pairs = rm_data.num_pairs(train_ex["ranks"], train_ex["kmask"])
    pads = {"pad_fraction": packing.comparison_pad_fraction(train_ex)}
    if packed:
        train_ex, eval_ex, pads = packing.pack_comparison_sets(train_ex, eval_ex, seed)
    train_iter = iterators.make_train_iterator(train_ex, batch_size=batch_size, seed=seed, **procs)
    eval_list, cut = [], train_info["cut_sequences"]
    if eval_comps:
        cut += eval_info["cut_sequences"]
        eval_ex = _pad_rows(eval_ex, batch_size * process_count)
        eval_list = iterators.eval_batches(eval_ex, batch_size=batch_size, **procs)
    info = {
        "train_comparisons": len(train_comps),
        "eval_comparisons": len(eval_comps),
        "train_pairs": pairs,
        "k": k,
        "cut_sequences": cut,
        "all_tie_skipped": skipped["all_tie"],
        "eval_batches": len(eval_list),
        **pads,
    }
    n_seq = sum(len(c["ranks"]) for c in [*train_comps, *eval_comps])
    if cut > rm_data.CUT_WARN_FRACTION * n_seq:
        _log.warning(
            "%.0f%% of comparison sequences (%d of %d) are cut at train.seq_len=%d",
            100 * cut / n_seq,
            cut,
            n_seq,
            seq_len,
        )
    eval_prompts = list(dict.fromkeys(c["prompt"] for c in eval_comps))
    return train_iter, eval_list, eval_prompts, info
