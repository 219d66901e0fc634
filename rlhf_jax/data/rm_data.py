"""Comparisons for the reward model: ranked responses JSONL -> padded [N, K, L] examples.

Two line formats (DESIGN.md section 4), which may be mixed within a file:
  * K-way: `{"prompt", "responses": [str, ...], "ranking": [...]}`; `ranking` lists response
    indices best first, and an entry that is a list of indices marks a tie, e.g. `[2, [0, 3], 1]`.
  * pairwise: `{"prompt", "chosen", "rejected"}`, read as K = 2 with `chosen` ranked first.
Either may give a conversation instead of a prompt: `{"messages": [... ending with a user turn],
...}` (rlhf_jax/data/chat.py); its responses are the final assistant turn, and its "prompt" is
then the hashable `chat.Messages`, so splitting, pairing and encoding treat both forms alike.
Published forms (HH-RLHF transcripts, message-list pairs, scored K-way rows) and Parquet files are
read too: data/pref_formats.py turns each row into one of the two forms above.
Every comparison is normalised to `{"prompt", "responses", "ranks", "source"}` where `ranks[j]` is
the dense rank of response j (0 = best, tied responses share a rank) and `source` is "file:line".

Response j of a comparison is tokenized as
    data_demos.prompt_ids(tokenizer, template, prompt) + encode(response) + [eos]
so the RM sees exactly the prefix SFT trained the response to follow, and right-padded to L (for a
conversation the prefix is its rendered context plus the assistant marker, and the EOS after the
response is its end of turn, so the score is read at the same kind of token).
Example layout, with N comparisons, K = k_max response slots and L = seq_len:
  {"tokens": int32 [N, K, L], "mask": bool [N, K, L] (real tokens),
   "ranks": int32 [N, K] (-1 for absent slots), "kmask": float32 [N, K] (1 for real responses)}
The score of a response is read at its last real token. A sequence longer than L is cut at the
right (losing its tail and its EOS); cut sequences are counted in `info`, never silent.

Batching (`rm.batching`):
  * "per_prompt" (InstructGPT): one example is one comparison with all its ranked pairs, so each
    response is scored once and the loss averages over a prompt's pairs (`losses.rm_loss`).
  * "per_pair" (the ablation, as other codebases do): every ranked pair is its own K = 2 example,
    shuffled independently of its siblings (`losses.rm_loss_per_pair`).
The held-out split is made on distinct prompt texts before any pair expansion, so eval is the
same K-way set in both modes and no prompt is in both train and eval.

It stays one piece (a little over 400 lines): reading, encoding, splitting and both batchings
share the one [N, K, L] example layout above.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence

import grain
import numpy as np

from rlhf_jax.data import iterators, lm_data, packing, pref_formats
from rlhf_jax.data.sft_data import prompt_ids, response_ids, row_prompt
from rlhf_jax.data.tokenizer import Tokenizer

_log = logging.getLogger(__name__)
# More than this fraction of sequences cut at seq_len is worth a warning: the RM then reads its
# score off a truncated response (a run that cut 72% reached 0.75 accuracy instead of 0.92).
CUT_WARN_FRACTION = 0.05


class AllTie(ValueError):
    """A comparison whose ranking ties every response: no ranked pair, no training signal."""


BATCHINGS = ("per_prompt", "per_pair")
_KWAY_KEYS = ("responses", "ranking")
_PAIR_KEYS = ("chosen", "rejected")


def _is_index(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _kway_ranks(record: dict, k_max: int) -> tuple[list[str], list[int]]:
    """Checks a K-way record and returns (responses, dense ranks); errors omit the location."""
    for key in _KWAY_KEYS:
        if key not in record:
            raise ValueError(f"field {key!r} is missing")
    responses, ranking = record["responses"], record["ranking"]
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise ValueError("field 'responses' must be a list of strings")
    k = len(responses)
    if k < 2:
        raise ValueError(f"field 'responses' has {k} response(s); a comparison needs at least 2")
    if k > k_max:
        raise ValueError(f"field 'responses' has {k} responses, more than k_max={k_max}")
    if not isinstance(ranking, list):
        raise ValueError(f"field 'ranking' must be a list, got {type(ranking).__name__}")
    ranks = [-1] * k
    for rank, entry in enumerate(ranking):
        group = entry if isinstance(entry, list) else [entry]
        if not group or not all(_is_index(i) for i in group):
            raise ValueError(
                f"field 'ranking' entry {entry!r} is not a response index or a non-empty list "
                "of tied indices"
            )
        for i in group:
            if not 0 <= i < k:
                raise ValueError(f"field 'ranking' index {i} is out of range for {k} responses")
            if ranks[i] != -1:
                raise ValueError(f"field 'ranking' mentions response {i} more than once")
            # Entries are non-empty, so the entry position already is a dense rank.
            ranks[i] = rank
    missing = [i for i, r in enumerate(ranks) if r == -1]
    if missing:
        raise ValueError(f"field 'ranking' does not mention response(s) {missing}")
    if len(ranking) < 2:
        raise AllTie(f"field 'ranking' ties all {k} responses, so there is no ranked pair")
    return responses, ranks


def _normalise(record: dict, k_max: int) -> dict:
    prompt = row_prompt(record)
    has_kway = any(key in record for key in _KWAY_KEYS)
    has_pair = any(key in record for key in _PAIR_KEYS)
    if has_kway and has_pair:
        raise ValueError(
            "the line mixes K-way fields ('responses', 'ranking') with pairwise fields "
            "('chosen', 'rejected'); use one form per line"
        )
    if has_kway:
        responses, ranks = _kway_ranks(record, k_max)
    elif has_pair:
        for key in _PAIR_KEYS:
            if key not in record:
                raise ValueError(f"field {key!r} is missing")
            if not isinstance(record[key], str):
                raise ValueError(f"field {key!r} must be str, got {type(record[key]).__name__}")
        responses, ranks = [record["chosen"], record["rejected"]], [0, 1]
    else:
        raise ValueError(
            "the line is neither a K-way comparison ('responses', 'ranking') nor a pairwise one "
            "('chosen', 'rejected')"
        )
    return {"prompt": prompt, "responses": responses, "ranks": ranks}


def read_comparisons(
    paths: str | Sequence[str], k_max: int = 9, skipped: collections.Counter | None = None
) -> list[dict]:
    """Reads and checks comparisons from JSONL or Parquet files in any form (pref_formats.py).

    A row that ties every response (real labelled data has them) carries no ranked pair: it is
    skipped and counted in `skipped["all_tie"]`, with one warning per file, never silently.

    Args:
      paths: files or globs, as accepted by `lm_data.expand_paths`.
      k_max: the most responses a comparison may have (the K axis of the examples).
      skipped: a Counter that receives the skip counts (optional).

    Returns:
      Comparisons `{"prompt": str | chat.Messages, "responses": [str] * K, "ranks": [int] * K,
      "source": str}` in file order, with dense ranks (0 = best, ties share a rank) and source
      "file:line".

    Raises:
      ValueError: `"{path}:{lineno}: ..."` for invalid JSON, a missing or mistyped field, a bad
        `messages` context (see chat.parse_messages), fewer than 2 or more than k_max responses,
        a ranking with a duplicate, out-of-range, missing or non-integer index, or a line of
        neither form.
    """
    if k_max < 2:
        raise ValueError(f"k_max must be at least 2, got {k_max}")
    skipped = collections.Counter() if skipped is None else skipped
    comps = []
    for path in lm_data.expand_paths(paths):
        ties = []
        for lineno, record in pref_formats.read_rows(path):
            try:
                comp = _normalise(pref_formats.to_comparison(record), k_max)
            except AllTie:
                ties.append(lineno)
                continue
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            comps.append({**comp, "source": f"{path}:{lineno}"})
        if ties:
            skipped["all_tie"] += len(ties)
            _log.warning(
                "%s: skipped %d comparison(s) that tie every response (no ranked pair), "
                "first at line %d",
                path,
                len(ties),
                ties[0],
            )
    return comps


def ranked_pairs(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """(winner, loser) index pairs with winner ranked strictly better, in (winner, loser) order."""
    k = len(ranks)
    return [(w, lo) for w in range(k) for lo in range(k) if 0 <= ranks[w] < ranks[lo]]


def expand_pairs(comps: Sequence[dict]) -> list[dict]:
    """Per-pair mode: each ranked pair of each comparison becomes a K = 2 comparison.

    Args:
      comps: normalised comparisons (see `read_comparisons`).

    Returns:
      `{"prompt", "responses": [winner, loser], "ranks": [0, 1], ...}` per ranked pair, in the
      order of `ranked_pairs` within each comparison; ties yield no pair.
    """
    out = []
    for c in comps:
        for w, lo in ranked_pairs(c["ranks"]):
            out.append({**c, "responses": [c["responses"][w], c["responses"][lo]], "ranks": [0, 1]})
    return out


def encode_comparisons(
    comps: Sequence[dict], tokenizer: Tokenizer, template: str, seq_len: int, k_max: int
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Tokenizes comparisons into fixed-shape K-way examples.

    Args:
      comps: normalised comparisons (see `read_comparisons`), each with at most k_max responses.
      tokenizer: the tokenizer.
      template: prompt format string with a `{prompt}` field (the SFT template).
      seq_len: L.
      k_max: K, the number of response slots; absent slots are all pad with kmask 0, ranks -1.

    Returns:
      ({"tokens": int32 [N, K, L], "mask": bool [N, K, L], "ranks": int32 [N, K],
        "kmask": float32 [N, K]}, {"sequences": responses encoded, "cut_sequences": of them cut
        at the right to fit L}).
    """
    n, k_slots, L = len(comps), k_max, seq_len
    tokens = np.full((n, k_slots, L), tokenizer.pad_id, np.int32)
    mask = np.zeros((n, k_slots, L), bool)
    ranks = np.full((n, k_slots), -1, np.int32)
    kmask = np.zeros((n, k_slots), np.float32)
    flat = [r for c in comps for r in c["responses"]]
    batch_ids = tokenizer.encode_batch(flat) if flat else []
    pos = cut = longest = 0
    for i, c in enumerate(comps):
        where = c.get("source", f"comparison {i}")
        k = len(c["responses"])
        if not 2 <= k <= k_slots or len(c["ranks"]) != k:
            raise ValueError(
                f"{where}: {k} responses with {len(c['ranks'])} ranks do not fit k_max={k_slots}"
            )
        prefix = prompt_ids(tokenizer, template, c["prompt"])
        if len(prefix) >= L:
            raise ValueError(
                f"{where}: the prompt alone is {len(prefix)} tokens, leaving no room for a "
                f"response within seq_len={L}"
            )
        for j in range(k):
            if isinstance(c["prompt"], str):
                ids = prefix + batch_ids[pos + j] + [tokenizer.eos_id]
            else:  # a conversation: its template renders the answer (data/chat_template.py)
                ids = prefix + response_ids(tokenizer, template, c["prompt"], c["responses"][j])
            longest = max(longest, len(ids))
            if len(ids) > L:
                cut += 1
                ids = ids[:L]
            tokens[i, j, : len(ids)] = ids
            mask[i, j, : len(ids)] = True
        ranks[i, :k] = c["ranks"]
        kmask[i, :k] = 1.0
        pos += k
    examples = {"tokens": tokens, "mask": mask, "ranks": ranks, "kmask": kmask}
    return examples, {"sequences": len(flat), "cut_sequences": cut, "longest": longest}


def pair_examples(examples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """K-way examples -> per-pair examples [P, 2, ...], gathered without re-tokenizing.

    The rows equal `encode_comparisons(expand_pairs(comps), ..., k_max=2)` for the same
    comparisons, in the same order.

    Args:
      examples: the output of `encode_comparisons`.

    Returns:
      {"tokens": int32 [P, 2, L], "mask": bool [P, 2, L], "ranks": int32 [P, 2] (all [0, 1]),
       "kmask": float32 [P, 2] (all 1)} with P the number of ranked pairs.
    """
    ranks, real = examples["ranks"], examples["kmask"] > 0
    both = real[:, :, None] & real[:, None, :]
    # C-order nonzero walks rows, then winners, then losers: the order of `ranked_pairs`.
    src, w, lo = np.nonzero(both & (ranks[:, :, None] < ranks[:, None, :]))
    slots = np.stack([w, lo], axis=1)  # [P, 2]
    p = len(src)
    return {
        "tokens": examples["tokens"][src[:, None], slots],
        "mask": examples["mask"][src[:, None], slots],
        "ranks": np.tile(np.array([0, 1], np.int32), (p, 1)),
        "kmask": np.ones((p, 2), np.float32),
    }


def split_by_prompt(
    comps: Sequence[dict], eval_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Seeded held-out split on distinct prompt texts; all comparisons of a prompt go together.

    Returns:
      (train_comps, eval_comps), each in the original order.
    """
    prompts = list(dict.fromkeys(c["prompt"] for c in comps))  # first-appearance order
    _, eval_prompts = lm_data.split_documents(prompts, eval_fraction, seed)
    held = set(eval_prompts)
    return [c for c in comps if c["prompt"] not in held], [c for c in comps if c["prompt"] in held]


def _pad_rows(examples: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    # All-zero rows have kmask 0, so they hold no response and no pair; padding to a whole number
    # of global batches means `eval_batches` drops no held-out comparison.
    n = len(examples["kmask"])
    extra = -n % multiple
    return {
        k: np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)])
        for k, a in examples.items()
    }


def num_pairs(ranks: np.ndarray, kmask: np.ndarray) -> int:
    """Number of ranked pairs in examples with ranks [N, K] and kmask [N, K]."""
    real = kmask > 0
    better = ranks[:, :, None] < ranks[:, None, :]
    return int((better & real[:, :, None] & real[:, None, :]).sum())


def build_rm_data(
    train_paths: str | Sequence[str],
    tokenizer: Tokenizer,
    *,
    template: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    batching: str = "per_prompt",
    k_max: int = 9,
    eval_paths: str | Sequence[str] = "",
    eval_fraction: float = 0.05,
    eval_batch_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    packed: bool = False,
) -> tuple[grain.DatasetIterator, list[dict[str, np.ndarray]], dict]:
    """Train iterator, eval batches and counts for the reward-model stage.

    Args:
      train_paths: comparison files or globs.
      tokenizer: the tokenizer.
      template: the SFT prompt template.
      seq_len: L.
      batch_size: per-process training batch size, in comparisons ("per_prompt") or pairs
        ("per_pair").
      seed: split and shuffle seed.
      batching: "per_prompt" or "per_pair" (see the module docstring).
      k_max: K of the per-prompt and eval examples; more responses is an error.
      eval_paths: held-out comparison files; if empty, an `eval_fraction` split of the distinct
        prompts of `train_paths`.
      eval_fraction: fraction of distinct prompts held out when `eval_paths` is empty.
      eval_batch_size: per-process eval batch size in comparisons; defaults to `batch_size`.
      process_index, process_count: this process and the number of processes.
      packed: whole comparisons (pairs, "per_pair") back to back in rows of K L positions
        (data/packing.py `pack_comparisons`); batch sizes then count rows.

    Returns:
      (train_iterator yielding [b, K, L] batches with K = k_max, or 2 in "per_pair" mode;
       eval batches, always K-way [b_eval, k_max, L] whatever `batching`, padded with kmask-0 rows
       so that no held-out comparison is dropped; info with counts of comparisons, distinct
       prompts, ranked pairs, training examples, a histogram of K, cut sequences, eval batches).
    """
    if batching not in BATCHINGS:
        raise ValueError(f"unknown rm.batching: {batching!r}; expected 'per_prompt' or 'per_pair'")
    skipped = collections.Counter()

    def read(paths, key):
        ties = skipped["all_tie"]
        comps = read_comparisons(paths, k_max, skipped)
        if not comps:
            why = (
                f" ({skipped['all_tie'] - ties} all-tie rows skipped)"
                if skipped["all_tie"] > ties
                else ""
            )
            raise ValueError(f"{key}: no {key.split('.')[1]} comparisons in {paths!r}{why}")
        return comps

    comps = read(train_paths, "data.train")
    if eval_paths:
        train_comps, eval_comps = comps, read(eval_paths, "data.eval")
    else:
        train_comps, eval_comps = split_by_prompt(comps, eval_fraction, seed)
    if not train_comps:
        raise ValueError(
            f"data.eval_fraction={eval_fraction} holds out every prompt of {train_paths!r}, "
            "leaving no training comparisons"
        )
    procs = dict(process_index=process_index, process_count=process_count)
    # K from the data, not k_max: pairwise data padded to 9 slots would run the model on 7 empty
    # responses per row (4.5x the work). One K per run, so the steps still compile once.
    k_max = max(len(c["ranks"]) for c in [*train_comps, *eval_comps])

    train_ex, train_info = encode_comparisons(train_comps, tokenizer, template, seq_len, k_max)
    train_pairs = num_pairs(train_ex["ranks"], train_ex["kmask"])
    if batching == "per_pair":
        train_ex = pair_examples(train_ex)
    eval_ex, eval_info, eval_pairs = None, {"cut_sequences": 0, "sequences": 0, "longest": 0}, 0
    if eval_comps:
        eval_ex, eval_info = encode_comparisons(eval_comps, tokenizer, template, seq_len, k_max)
        eval_pairs = num_pairs(eval_ex["ranks"], eval_ex["kmask"])
    pads = {"pad_fraction": packing.comparison_pad_fraction(train_ex)}
    n_examples = len(train_ex["kmask"])
    if packed:
        train_ex, eval_ex, pads = packing.pack_comparison_sets(train_ex, eval_ex, seed)
    train_iter = iterators.make_train_iterator(train_ex, batch_size=batch_size, seed=seed, **procs)

    eval_list = []
    if eval_comps:
        eval_b = eval_batch_size or batch_size
        eval_ex = _pad_rows(eval_ex, eval_b * process_count)
        eval_list = iterators.eval_batches(eval_ex, batch_size=eval_b, **procs)

    all_comps = [*train_comps, *eval_comps]
    info = {
        "train_comparisons": len(train_comps),
        "eval_comparisons": len(eval_comps),
        "distinct_prompts": len({c["prompt"] for c in all_comps}),
        "train_pairs": train_pairs,
        "eval_pairs": eval_pairs,
        "train_examples": n_examples,
        "k_histogram": dict(
            sorted(collections.Counter(len(c["ranks"]) for c in all_comps).items())
        ),
        "cut_sequences": train_info["cut_sequences"] + eval_info["cut_sequences"],
        "all_tie_skipped": skipped["all_tie"],
        "k": k_max,
        "eval_batches": len(eval_list),
        **pads,
    }
    n_seq = train_info["sequences"] + eval_info["sequences"]
    if n_seq and info["cut_sequences"] > CUT_WARN_FRACTION * n_seq:
        _log.warning(
            "%.0f%% of comparison sequences (%d of %d) are cut at train.seq_len=%d; "
            "train.seq_len=%d would fit them all",
            100 * info["cut_sequences"] / n_seq,
            info["cut_sequences"],
            n_seq,
            seq_len,
            max(train_info["longest"], eval_info["longest"]),
        )
    info["cut_fraction"] = info["cut_sequences"] / max(n_seq, 1)
    return train_iter, eval_list, info
