"""Unpaired examples for KTO: `{"prompt", "completion", "label"}` rows, or comparisons converted.

Two forms, per file (JSONL or Parquet):
  - KTO rows: `{"prompt": str, "completion": str, "label": bool}` (TRL's unpaired form; label
    true = desirable), or `{"messages": [...], "completion", "label"}` with a conversation
    ending in a user turn as the prompt, rendered with the model's chat template.
  - Any comparison form the reward model reads (data/rm_data.py): each comparison gives its
    best-ranked responses as desirable rows and its worst-ranked as undesirable ones (TRL's
    `unpair_preference_dataset` for K = 2). Responses ranked in between carry no unpaired
    label: they are counted (`middle_skipped`) and left out; all-tie rows are skipped and
    counted as the RM's reader does.

KTO's reference point needs each prompt with a MISMATCHED completion (rl/kto.py). Row i gets the
completion of the next row (cyclically, in file order) whose prompt differs, fixed when the data
are built, so a row's pair never depends on which batch, process or microbatch it lands in (the
1-process and N-process runs see the same pairs). Layout, N rows, L = seq_len:
  {"tokens": int32 [N, 2, L], "mask": bool [N, 2, L], "prompt_len": int32 [N],
   "label": float32 [N] (1 desirable), "weight": float32 [N] (0 for eval padding rows)}
slot 0 = prompt + completion, slot 1 = prompt + mismatched completion, each ending in EOS.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data import dpo_data, iterators, lm_data, pref_formats, rm_data, sft_data
from rlhf_jax.data.tokenizer import Tokenizer


def _is_kto_row(record: dict) -> bool:
    return "completion" in record and "label" in record


def _kto_row(record: dict, where: str) -> dict:
    try:
        prompt = sft_data.row_prompt(record)  # "prompt", or a "messages" context
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not isinstance(record["completion"], str):
        raise ValueError(f"{where}: field 'completion' must be a string")
    label = record["label"]
    if not isinstance(label, bool) and label not in (0, 1):
        raise ValueError(f"{where}: field 'label' must be true or false, got {label!r}")
    return {"prompt": prompt, "completion": record["completion"], "label": bool(label),
            "source": where}  # fmt: skip


def unpair(comps: Sequence[dict], skipped: collections.Counter) -> list[dict]:
    """Comparisons -> KTO rows: best-ranked responses desirable, worst-ranked undesirable."""
    rows = []
    for c in comps:
        best, worst = min(c["ranks"]), max(c["ranks"])
        for resp, rank in zip(c["responses"], c["ranks"], strict=True):
            if rank in (best, worst):
                rows.append({"prompt": c["prompt"], "completion": resp, "label": rank == best,
                             "source": c["source"]})  # fmt: skip
            else:
                skipped["middle"] += 1
    return rows


def read_kto_rows(paths: str | Sequence[str], k_max: int, skipped: collections.Counter):
    """KTO rows of every file, in file order (see the module docstring for the two forms)."""
    rows = []
    for path in lm_data.expand_paths(paths):
        records = pref_formats.read_rows(path)
        if records and _is_kto_row(records[0][1]):
            for lineno, record in records:
                where = f"{path}:{lineno}"
                if not _is_kto_row(record):
                    raise ValueError(f"{where}: a KTO file needs 'completion' and 'label' fields")
                rows.append(_kto_row(record, where))
        else:
            rows += unpair(rm_data.read_comparisons(path, k_max, skipped), skipped)
    return rows


def mismatched(rows: Sequence[dict]) -> list[int]:
    """For each row, the index of the next row (cyclically) with a different prompt; itself
    when every row has the same prompt (then z0 is that prompt's own log-ratio)."""
    n, out = len(rows), []
    for i in range(n):
        j = next((j % n for j in range(i + 1, i + n) if rows[j % n]["prompt"] != rows[i]["prompt"]),
                 i)  # fmt: skip
        out.append(j)
    return out


def encode(rows: Sequence[dict], tokenizer: Tokenizer, template: str, seq_len: int):
    """Tokenised KTO examples (the module docstring's layout) and the cut count."""
    other = mismatched(rows)
    comps = [
        {"prompt": r["prompt"], "responses": [r["completion"], rows[j]["completion"]],
         "ranks": [0, 1], "source": r["source"]}
        for r, j in zip(rows, other, strict=True)
    ]  # fmt: skip
    ex, info = dpo_data.encode(comps, tokenizer, template, seq_len, 2)
    out = {k: ex[k] for k in ("tokens", "mask", "prompt_len")}
    out["label"] = np.array([r["label"] for r in rows], np.float32).reshape(len(rows))
    out["weight"] = np.ones((len(rows),), np.float32)
    return out, info["cut_sequences"]


def build_kto_data(
    train_paths, tokenizer, *, template, seq_len, batch_size, seed, k_max=9, eval_paths="",
    eval_fraction=0.05, process_index=0, process_count=1,
):  # fmt: skip
    """(train iterator, eval batches, held-out prompts, info) for the KTO stage.

    The held-out split is on distinct prompt texts, as for the RM and DPO; eval batches are
    padded with weight-0 rows so no held-out row is dropped. Arguments as
    dpo_data.build_dpo_data's (batch_size in rows, per process).
    """
    skipped = collections.Counter()
    rows = read_kto_rows(train_paths, k_max, skipped)
    if not rows:
        raise ValueError(f"data.train: no KTO rows or comparisons in {train_paths!r}")
    if eval_paths:
        train_rows, eval_rows = rows, read_kto_rows(eval_paths, k_max, skipped)
    else:
        train_rows, eval_rows = rm_data.split_by_prompt(rows, eval_fraction, seed)
    if not train_rows:
        raise ValueError(
            f"data.eval_fraction={eval_fraction} holds out every prompt of {train_paths!r}"
        )
    procs = dict(process_index=process_index, process_count=process_count)
    train_ex, cut = encode(train_rows, tokenizer, template, seq_len)
    train_iter = iterators.make_train_iterator(train_ex, batch_size=batch_size, seed=seed, **procs)
    eval_list = []
    if eval_rows:
        eval_ex, eval_cut = encode(eval_rows, tokenizer, template, seq_len)
        cut += eval_cut
        extra = -len(eval_rows) % (batch_size * process_count)
        eval_ex = {k: np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)])
                   for k, a in eval_ex.items()}  # fmt: skip
        eval_list = iterators.eval_batches(eval_ex, batch_size=batch_size, **procs)
    n_good = sum(r["label"] for r in train_rows)
    info = {
        "train_rows": len(train_rows),
        "desirable": n_good,
        "undesirable": len(train_rows) - n_good,
        "eval_rows": len(eval_rows),
        "cut_sequences": cut,
        "middle_skipped": skipped["middle"],
        "all_tie_skipped": skipped["all_tie"],
    }
    eval_prompts = list(dict.fromkeys(r["prompt"] for r in eval_rows))
    return train_iter, eval_list, eval_prompts, info
