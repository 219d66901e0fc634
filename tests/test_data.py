"""Tests for rlhf_jax.data.lm_data: readers, splitting, packing, tokenizing cache, grain
iterators."""

import json
import random

import numpy as np
import pytest

from rlhf_jax.data import iterators, lm_data
from rlhf_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, train_tokenizer


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def indexed_examples(n, seq_len=3):
    """Examples whose every entry identifies its row: inputs[i] = i*seq_len + [0, 1, ...]."""
    inputs = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)
    return {"inputs": inputs, "targets": inputs + 1, "mask": np.ones((n, seq_len), np.float32)}


def row_ids(batch, seq_len=3):
    return (batch["inputs"][:, 0] // seq_len).tolist()


# --- packing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 4, 7, 16])
@pytest.mark.parametrize("add_bos", [True, False])
def test_pack_documents_matches_naive_windows(seq_len, add_bos):
    rng = random.Random(seq_len)
    docs = [[rng.randrange(4, 50) for _ in range(rng.randint(0, 20))] for _ in range(9)]
    stream = []
    for doc in docs:
        stream += ([BOS_ID] if add_bos else []) + doc + [EOS_ID]
    out = lm_data.pack_documents(
        docs, seq_len, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, add_bos=add_bos
    )
    n = (len(stream) + seq_len - 1) // seq_len
    assert out["inputs"].shape == out["targets"].shape == out["mask"].shape == (n, seq_len)
    assert (out["inputs"].dtype, out["targets"].dtype) == (np.int32, np.int32)
    assert out["mask"].dtype == np.float32

    padded = stream + [PAD_ID] * (n * seq_len + 1 - len(stream))
    for i in range(n):
        assert out["inputs"][i].tolist() == padded[i * seq_len : (i + 1) * seq_len]
        assert out["targets"][i].tolist() == padded[i * seq_len + 1 : (i + 1) * seq_len + 1]
        real = [float(i * seq_len + j + 1 < len(stream)) for j in range(seq_len)]
        assert out["mask"][i].tolist() == real

    # Every stream token is an input exactly once: the masked inputs plus the final token.
    mask = out["mask"].astype(bool)
    assert out["inputs"][mask].tolist() + [out["inputs"].reshape(-1)[len(stream) - 1]] == stream
    assert out["targets"][mask].tolist() == stream[1:]


def test_pack_exact_multiple_keeps_last_token():
    # Stream [2, 5, 6, 3] with L=4: one window, the final eos is an input with no target.
    out = lm_data.pack_documents([[5, 6]], 4, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID)
    assert out["inputs"].tolist() == [[2, 5, 6, 3]]
    assert out["targets"].tolist() == [[5, 6, 3, PAD_ID]]
    assert out["mask"].tolist() == [[1, 1, 1, 0]]


# --- readers -----------------------------------------------------------------------------------


def test_read_jsonl_valid_with_blank_lines(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"text": "a", "n": 1, "x": 2}\n\n   \n{"text": "b", "n": 2, "x": 0.5}\n')
    records = lm_data.read_jsonl(str(path), {"text": str, "n": int, "x": float})
    assert records == [{"text": "a", "n": 1, "x": 2}, {"text": "b", "n": 2, "x": 0.5}]


@pytest.mark.parametrize(
    "bad_line, fields, message",
    [
        ('{"text": "unterminated}', {"text": str}, r"bad\.jsonl:3: not valid JSON"),
        ('{"other": "x"}', {"text": str}, r"bad\.jsonl:3: field 'text' is missing"),
        ('{"text": 5}', {"text": str}, r"bad\.jsonl:3: field 'text' must be str, got int"),
        ('{"n": true}', {"n": int}, r"bad\.jsonl:3: field 'n' must be int, got bool"),
        ('["text"]', {"text": str}, r"bad\.jsonl:3: expected a JSON object, got list"),
    ],
)
def test_read_jsonl_malformed_line_names_file_line_field(tmp_path, bad_line, fields, message):
    good = json.dumps({name: ("s" if typ is str else 1) for name, typ in fields.items()})
    path = tmp_path / "bad.jsonl"
    # Line 2 is blank: line numbers count every physical line.
    path.write_text(f"{good}\n\n{bad_line}\n{good}\n")
    with pytest.raises(ValueError, match=message):
        lm_data.read_jsonl(str(path), fields)


def test_read_jsonl_invalid_utf8(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"enc\.jsonl:2: not valid UTF-8"):
        lm_data.read_jsonl(str(path), {"text": str})
    txt = tmp_path / "enc.txt"
    txt.write_bytes(b"ok\n\n\xff")
    with pytest.raises(ValueError, match=r"enc\.txt: not valid UTF-8"):
        lm_data.read_documents(str(txt))


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        lm_data.read_jsonl(str(tmp_path / "missing.jsonl"), {"text": str})
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        lm_data.read_documents(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match=r"nothing-\*\.jsonl"):
        lm_data.read_documents(str(tmp_path / "nothing-*.jsonl"))


def test_unknown_extension(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unknown text data extension: '\.csv'"):
        lm_data.read_documents(str(path))


def test_txt_documents_split_on_blank_lines(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text(
        "\n\nfirst doc line 1\nfirst doc line 2\n\nsecond\n  \t \n\n\nthird  \r\n\r\nfourth\n\n"
    )
    assert lm_data.read_documents(str(path)) == [
        "first doc line 1\nfirst doc line 2",
        "second",
        "third",
        "fourth",
    ]


def test_read_documents_globs_are_sorted_and_mixed(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}])
    (tmp_path / "c.txt").write_text("c1\n\nc2")
    assert lm_data.read_documents(str(tmp_path / "*.jsonl")) == ["a1", "b1", "b2"]
    both = f"{tmp_path / 'c.txt'},{tmp_path / '*.jsonl'}"
    assert lm_data.read_documents(both) == ["c1", "c2", "a1", "b1", "b2"]
    assert lm_data.read_documents([str(tmp_path / "c.txt"), str(tmp_path / "a.jsonl")]) == [
        "c1",
        "c2",
        "a1",
    ]


# --- split -------------------------------------------------------------------------------------


def test_split_documents_deterministic_disjoint_complete():
    docs = [f"doc {i}" for i in range(50)]
    train, evals = lm_data.split_documents(docs, 0.2, seed=3)
    assert (train, evals) == lm_data.split_documents(docs, 0.2, seed=3)
    assert len(evals) == 10
    assert set(train).isdisjoint(evals) and sorted(train + evals) == sorted(docs)
    assert train == [d for d in docs if d in set(train)]  # original order kept
    assert lm_data.split_documents(docs, 0.2, seed=4)[1] != evals
    # Same partition for anything indexed like the documents (e.g. their token lists).
    _, eval_idx = lm_data.split_documents(list(range(50)), 0.2, seed=3)
    assert [docs[i] for i in eval_idx] == evals


def test_split_documents_edge_cases():
    assert lm_data.split_documents(["a", "b", "c"], 0.01, seed=0)[1] != []  # at least one eval doc
    assert len(lm_data.split_documents(["a", "b"], 0.9, seed=0)[0]) == 1  # at least one train doc
    assert lm_data.split_documents(["a", "b", "c"], 0.0, seed=0) == (["a", "b", "c"], [])
    assert lm_data.split_documents(["a"], 0.5, seed=0) == (["a"], [])
    with pytest.raises(ValueError, match="eval_fraction"):
        lm_data.split_documents(["a"], 1.0, seed=0)


# --- tokenizing --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    corpus = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)]
    path = str(tmp_path_factory.mktemp("tok") / "t.model")
    return Tokenizer.load(train_tokenizer(corpus, path, 320))


def test_tokenize_documents_cache(tok, tmp_path, monkeypatch):
    docs = ["alpha beta", "", "gamma delta ünï", "zeta"]
    cache = str(tmp_path / "cache" / "tokens.npz")
    expected = [tok.encode(d) for d in docs]
    assert lm_data.tokenize_documents(docs, tok) == expected
    assert lm_data.tokenize_documents(docs, tok, cache_path=cache) == expected

    def fail(texts):
        raise AssertionError("re-tokenized although the cache is valid")

    monkeypatch.setattr(tok, "encode_batch", fail)
    assert lm_data.tokenize_documents(docs, tok, cache_path=cache) == expected
    monkeypatch.undo()
    # Different documents (even only different boundaries) invalidate the cache.
    other = ["alpha", " beta", "gamma delta ünï", "zeta"]
    assert lm_data.tokenize_documents(other, tok, cache_path=cache) == [
        tok.encode(d) for d in other
    ]


# --- train iterator ----------------------------------------------------------------------------


def take(it, k):
    return [next(it) for _ in range(k)]


def test_train_iterator_seeded_epochs():
    n, b = 12, 4
    batches = take(iterators.make_train_iterator(indexed_examples(n), batch_size=b, seed=7), 12)
    for batch in batches:
        assert batch["inputs"].shape == (b, 3) and batch["inputs"].dtype == np.int32
        assert batch["mask"].dtype == np.float32
        np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
    order = [i for batch in batches for i in row_ids(batch)]
    epochs = [order[e * n : (e + 1) * n] for e in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
    assert epochs[0] != list(range(n))

    again = take(iterators.make_train_iterator(indexed_examples(n), batch_size=b, seed=7), 12)
    assert [row_ids(x) for x in again] == [row_ids(x) for x in batches]
    other = take(iterators.make_train_iterator(indexed_examples(n), batch_size=b, seed=8), 12)
    assert [row_ids(x) for x in other] != [row_ids(x) for x in batches]


def test_train_iterator_drops_remainder_per_epoch():
    # 10 examples, batches of 4: two batches per epoch, 2 examples left out of each epoch.
    batches = take(iterators.make_train_iterator(indexed_examples(10), batch_size=4, seed=0), 12)
    epochs = [row_ids(batches[e]) + row_ids(batches[e + 1]) for e in range(0, 12, 2)]
    for epoch in epochs:
        assert len(set(epoch)) == 8
    # The left-out examples change with the reshuffle, so over epochs every example is used.
    assert set().union(*epochs) == set(range(10))


def test_train_iterator_without_shuffle_is_in_order():
    it = iterators.make_train_iterator(indexed_examples(6), batch_size=3, seed=0, shuffle=False)
    assert [row_ids(x) for x in take(it, 3)] == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]


def test_train_iterator_process_shards_form_global_batch():
    n, b, procs = 20, 3, 2
    single = take(
        iterators.make_train_iterator(indexed_examples(n), batch_size=b * procs, seed=1), 8
    )
    shards = [
        take(
            iterators.make_train_iterator(
                indexed_examples(n), batch_size=b, seed=1, process_index=p, process_count=procs
            ),
            8,
        )
        for p in range(procs)
    ]
    for step, global_batch in enumerate(single):
        parts = [row_ids(shards[p][step]) for p in range(procs)]
        assert all(len(part) == b for part in parts)
        assert set(parts[0]).isdisjoint(parts[1])
        assert set(parts[0]) | set(parts[1]) == set(row_ids(global_batch))


@pytest.mark.parametrize("skip", [0, 3, 11])
def test_train_iterator_state_resumes_bitwise(skip):
    examples = indexed_examples(10)
    examples["mask"] = np.random.default_rng(0).random((10, 3)).astype(np.float32)
    it = iterators.make_train_iterator(
        examples, batch_size=4, seed=5, process_index=1, process_count=2
    )
    take(it, skip)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 6)

    resumed = iterators.make_train_iterator(
        examples, batch_size=4, seed=5, process_index=1, process_count=2
    )
    take(resumed, 2)  # a fresh iterator's position must not matter after set_state
    resumed.set_state(state)
    for want, got in zip(expected, take(resumed, 6), strict=True):
        assert want.keys() == got.keys()
        for name in want:
            assert want[name].dtype == got[name].dtype
            np.testing.assert_array_equal(want[name], got[name])


def test_train_iterator_too_few_examples():
    with pytest.raises(ValueError, match=r"only 5 training examples.*needs 6"):
        iterators.make_train_iterator(indexed_examples(5), batch_size=3, seed=0, process_count=2)


# --- eval batches ------------------------------------------------------------------------------


def test_eval_batches_drop_remainder_in_order():
    batches = iterators.eval_batches(indexed_examples(10), batch_size=4)
    assert [row_ids(x) for x in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    again = iterators.eval_batches(indexed_examples(10), batch_size=4)
    for x, y in zip(batches, again, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert len(iterators.eval_batches(indexed_examples(10), batch_size=4, max_batches=1)) == 1


def test_eval_batches_shards_cover_global_batches():
    per_proc = [
        iterators.eval_batches(indexed_examples(11), batch_size=2, process_index=p, process_count=2)
        for p in range(2)
    ]
    assert len(per_proc[0]) == len(per_proc[1]) == 2
    for step in range(2):
        parts = [row_ids(per_proc[p][step]) for p in range(2)]
        assert set(parts[0]).isdisjoint(parts[1])
        assert sorted(parts[0] + parts[1]) == list(range(4 * step, 4 * step + 4))


def test_eval_batches_pad_tiny_sets_with_masked_rows():
    examples = indexed_examples(3)
    per_proc = [
        iterators.eval_batches(examples, batch_size=2, process_index=p, process_count=2)
        for p in range(2)
    ]
    assert [len(x) for x in per_proc] == [1, 1]
    rows = {name: np.concatenate([x[0][name] for x in per_proc]) for name in examples}
    for name in examples:
        np.testing.assert_array_equal(rows[name][:3], examples[name])
    assert rows["inputs"][3].tolist() == [PAD_ID] * 3
    assert rows["mask"][3].tolist() == [0.0] * 3
    assert iterators.eval_batches({k: v[:0] for k, v in examples.items()}, batch_size=2) == []


# --- end to end --------------------------------------------------------------------------------


def test_build_text_data(tok, tmp_path):
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(40)]
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": d} for d in docs])
    kwargs = dict(seq_len=16, batch_size=2, eval_fraction=0.25, seed=0, process_count=2)

    train_it, evals, info = lm_data.build_text_data(
        path, tok, process_index=0, cache_dir=str(tmp_path / "cache"), **kwargs
    )
    n_tokens = sum(len(tok.encode(d)) for d in docs)
    assert info["documents"] == 40 and info["tokens"] == n_tokens
    assert (info["train_documents"], info["eval_documents"]) == (30, 10)
    # Documents are split before packing; each adds bos and eos to its split's stream.
    train_docs, eval_docs = lm_data.split_documents(docs, 0.25, seed=0)
    for split, split_docs in [("train", train_docs), ("eval", eval_docs)]:
        stream_len = sum(len(tok.encode(d)) + 2 for d in split_docs)
        assert info[f"{split}_sequences"] == -(-stream_len // 16)
    assert info["eval_batches"] == len(evals) == info["eval_sequences"] // 4
    assert (tmp_path / "cache" / "text_tokens.npz").is_file()

    batch = next(train_it)
    assert batch["inputs"].shape == (2, 16) and batch["inputs"].dtype == np.int32
    assert evals[0]["mask"].shape == (2, 16) and evals[0]["mask"].dtype == np.float32

    # Process 1 gets the other half of the same global batch.
    train_it1, _, info1 = lm_data.build_text_data(
        path, tok, process_index=1, cache_dir=str(tmp_path / "cache"), **kwargs
    )
    assert info1 == info
    batch1 = next(train_it1)
    assert not np.array_equal(batch["inputs"], batch1["inputs"])
