"""Data: reading and writing JSONL/text files, tokenizing and packing LM text.

This module owns everything between files on disk and the packed LM examples, which
`build_text_data` cuts into batches with iterators.py. It serves LM pretraining text; demos,
comparisons and prompts reuse `read_jsonl`.

Text formats (DESIGN.md section 4):
  * `.jsonl`: one `{"text": "..."}` object per line. Blank lines are ignored; any other malformed
    line is a ValueError naming the file, line number and field.
  * `.txt`: documents are separated by one or more blank (whitespace-only) lines; each document is
    stripped of surrounding whitespace. A file with no blank lines is a single document.

Batch format of every LM stage, where b is the per-process batch size and L the sequence length:
  {"inputs": int32 [b, L], "targets": int32 [b, L], "mask": float32 [b, L]}
with targets[t] the token after inputs[t] and mask 0 where there is no real target. Cutting
examples into per-process batches (grain iterators, eval batches) is iterators.py's.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from rlhf_jax.data import iterators
from rlhf_jax.data.tokenizer import Tokenizer

TEXT_EXTENSIONS = (".jsonl", ".txt")
_TYPE_NAMES = {str: "str", int: "int", float: "float", bool: "bool", list: "list", dict: "dict"}


def _type_ok(value: Any, typ: type) -> bool:
    # bool is a subclass of int in Python but not an integer in JSON; an int is a fine float.
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, typ)


def _check_exists(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")


def write_atomic(path: str, text: str) -> str:
    """Writes `text` to `path` via a temp file in the same directory and os.replace, so a killed
    write never leaves a partial file that a resumed step would take as done; -> path."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; outputs are meant to be read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_jsonl(path: str, rows: Sequence[dict]) -> str:
    """Writes rows as JSONL atomically; -> path."""
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json(path: str, obj) -> str:
    """Writes one JSON object atomically; -> path."""
    return write_atomic(path, json.dumps(obj, indent=1) + "\n")


def read_jsonl(path: str, fields: dict[str, type]) -> list[dict]:
    """Reads a JSONL file whose every non-blank line is an object with the given typed fields.

    Args:
      path: the .jsonl file.
      fields: required field name -> Python type (str, int, float, bool, list, dict). Other
        fields are allowed and kept.

    Returns:
      The parsed objects, one per non-blank line, in file order.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: `"{path}:{lineno}: ..."` for invalid UTF-8, invalid JSON, a non-object line, or
        a missing or mistyped field.
    """
    _check_exists(path)
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            for name, typ in fields.items():
                if name not in record:
                    raise ValueError(f"{path}:{lineno}: field {name!r} is missing")
                if not _type_ok(record[name], typ):
                    raise ValueError(
                        f"{path}:{lineno}: field {name!r} must be {_TYPE_NAMES.get(typ, typ)}, "
                        f"got {type(record[name]).__name__}"
                    )
            records.append(record)
    return records


def _read_txt(path: str) -> list[str]:
    _check_exists(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    blocks = re.split(r"\n[ \t\r\f\v]*\n", text)
    return [block.strip() for block in blocks if block.strip()]


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Expands paths and globs to files; each glob's matches are sorted, entries keep their order.

    Args:
      paths: a path, a glob, a comma-separated string of them, or a sequence of them.

    Returns:
      File paths.
    """
    entries = paths.split(",") if isinstance(paths, str) else list(paths)
    files = []
    for entry in (os.fspath(e).strip() for e in entries):
        if not entry:
            continue
        if glob.has_magic(entry):
            matches = sorted(m for m in glob.glob(entry) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"no data files match the pattern {entry!r}")
            files.extend(matches)
        else:
            _check_exists(entry)
            files.append(entry)
    if not files:
        raise FileNotFoundError(f"no data files given (paths={paths!r})")
    return files


def read_documents(paths: str | Sequence[str]) -> list[str]:
    """Reads text documents from .jsonl (`{"text": ...}`) and .txt files.

    Args:
      paths: files or globs, as accepted by `expand_paths`.

    Returns:
      The documents, file by file in `expand_paths` order.
    """
    docs = []
    for path in expand_paths(paths):
        ext = os.path.splitext(path)[1].lower()
        if ext == ".jsonl":
            docs.extend(record["text"] for record in read_jsonl(path, {"text": str}))
        elif ext == ".txt":
            docs.extend(_read_txt(path))
        else:
            raise ValueError(
                f"unknown text data extension: {ext!r} ({path}); expected one of {TEXT_EXTENSIONS}"
            )
    return docs


def split_documents(docs: Sequence, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded held-out split by document.

    The split depends only on len(docs), eval_fraction and seed, so splitting the token lists of
    the same documents gives the same partition.

    Args:
      docs: documents (or anything per document, e.g. token lists).
      eval_fraction: fraction of documents held out, in [0, 1).
      seed: split seed.

    Returns:
      (train_docs, eval_docs), each in original order. With eval_fraction > 0 and at least 2
      documents there is at least one eval and one train document.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(docs)
    # At least one eval document when asked for any, and always at least one train document.
    n_eval = min(max(round(n * eval_fraction), 1), n - 1) if eval_fraction > 0 and n >= 2 else 0
    perm = np.random.default_rng(seed).permutation(n)
    is_eval = np.zeros(n, dtype=bool)
    is_eval[perm[:n_eval]] = True
    train = [d for d, e in zip(docs, is_eval, strict=True) if not e]
    evals = [d for d, e in zip(docs, is_eval, strict=True) if e]
    return train, evals


def pack_documents(
    token_lists: Sequence[Sequence[int]],
    seq_len: int,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    add_bos: bool = True,
) -> dict[str, np.ndarray]:
    """Packs documents into fixed-length next-token-prediction windows.

    The stream is `[bos] + doc + [eos]` for each document, concatenated. Window i has
    inputs = stream[i*L:(i+1)*L] and targets = stream[i*L+1:(i+1)*L+1], so every stream token is
    an input exactly once and a target at most once (the first token never is). The last window is
    padded with pad_id; mask is 1 exactly where the target is a real stream token.

    Args:
      token_lists: token ids per document.
      seq_len: L.
      bos_id, eos_id, pad_id: special ids.
      add_bos: whether each document starts with bos.

    Returns:
      {"inputs": int32 [N, L], "targets": int32 [N, L], "mask": float32 [N, L]} with
      N = ceil(len(stream) / L).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    bos = [bos_id] if add_bos else []
    stream = np.fromiter(  # [S]
        itertools.chain.from_iterable([*bos, *tokens, eos_id] for tokens in token_lists), np.int32
    )
    n = -(-len(stream) // seq_len)
    # One extra slot so the last window's targets can be a plain slice.
    buf = np.full([n * seq_len + 1], pad_id, np.int32)
    buf[: len(stream)] = stream
    target_pos = np.arange(1, n * seq_len + 1)
    return {
        "inputs": buf[:-1].reshape(n, seq_len),
        "targets": buf[1:].reshape(n, seq_len),
        "mask": (target_pos < len(stream)).astype(np.float32).reshape(n, seq_len),
    }


def _cache_key(docs: Sequence[str], tokenizer: Tokenizer) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.fingerprint())
    for doc in docs:
        data = doc.encode("utf-8")
        # Length-prefixed so that document boundaries are part of the key.
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def tokenize_documents(
    docs: Sequence[str], tokenizer: Tokenizer, cache_path: str | None = None
) -> list[list[int]]:
    """Tokenizes documents (no bos/eos), optionally through an on-disk cache.

    Args:
      docs: documents.
      tokenizer: the tokenizer.
      cache_path: optional .npz cache of the concatenated ids and per-document offsets, keyed by a
        hash of the tokenizer's files and the documents; a stale one is recomputed and atomically
        replaced, so a restarted run skips tokenizing a large corpus.

    Returns:
      Token ids per document.
    """
    key = _cache_key(docs, tokenizer) if cache_path else None
    if cache_path and os.path.isfile(cache_path):
        with np.load(cache_path, allow_pickle=False) as cached:
            if str(cached["key"]) == key:
                ids, offsets = cached["ids"], cached["offsets"]
                return [ids[offsets[i] : offsets[i + 1]].tolist() for i in range(len(docs))]
    token_lists = tokenizer.encode_batch(docs)
    if cache_path:
        lengths = np.array([len(t) for t in token_lists], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])  # [n_docs + 1]
        ids = np.fromiter((i for t in token_lists for i in t), np.int32, count=int(offsets[-1]))
        _save_npz_atomically(cache_path, key=np.array(key), ids=ids, offsets=offsets)
    return token_lists


def _save_npz_atomically(path: str, **arrays: np.ndarray) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Unique temp name: several processes on one host may write the same cache at once.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def build_text_data(
    paths: str | Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    eval_fraction: float,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    cache_dir: str | None = None,
) -> tuple[grain.DatasetIterator, list[dict[str, np.ndarray]], dict[str, int]]:
    """Text files -> packed train iterator and eval batches for LM pretraining (or ptx).

    Documents are split into train/eval before packing, so no eval text is ever trained on.

    Args:
      paths: text files or globs (see `read_documents`).
      tokenizer: the tokenizer.
      seq_len: L.
      batch_size: per-process batch size b.
      eval_fraction: fraction of documents held out for eval.
      seed: split and shuffle seed.
      process_index, process_count: this process and the number of processes.
      cache_dir: if set, token ids are cached in `<cache_dir>/text_tokens.npz`.

    Returns:
      (train_iterator, eval_batch_list, info) where info holds the counts documents,
      train_documents, eval_documents, tokens, train_sequences, eval_sequences, eval_batches.
    """
    docs = read_documents(paths)
    cache_path = os.path.join(cache_dir, "text_tokens.npz") if cache_dir else None
    token_lists = tokenize_documents(docs, tokenizer, cache_path=cache_path)
    train_tokens, eval_tokens = split_documents(token_lists, eval_fraction, seed)
    specials = dict(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    specials["add_bos"] = tokenizer.add_bos  # as the model's own tokenizer frames a document
    train = pack_documents(train_tokens, seq_len, **specials)
    evals = pack_documents(eval_tokens, seq_len, **specials)
    procs = dict(process_index=process_index, process_count=process_count)
    train_iter = iterators.make_train_iterator(train, batch_size=batch_size, seed=seed, **procs)
    eval_list = iterators.eval_batches(evals, batch_size=batch_size, **procs)
    info = {
        "documents": len(docs),
        "train_documents": len(train_tokens),
        "eval_documents": len(eval_tokens),
        "tokens": sum(len(t) for t in token_lists),
        "train_sequences": len(train["inputs"]),
        "eval_sequences": len(evals["inputs"]),
        "eval_batches": len(eval_list),
    }
    return train_iter, eval_list, info
