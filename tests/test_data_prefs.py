"""Comparisons for the RM: reading and checking rankings, token layout, pair expansion, batching."""

import collections
import json
import random

import numpy as np
import pytest

from rlhf_jax.data import rm_data, sft_data
from rlhf_jax.data.tokenizer import EOS_ID, PAD_ID, Tokenizer, train_tokenizer

TEMPLATE = "User: {prompt}\nAssistant: "
WORDS = ["the", "cat", "dog", "sat", "ran", "on", "under", "a", "mat", "house", "tree"]
WORDS += ["river", "quickly", "slowly", "and", "then"]


def sentence(rng, lo=2, hi=8):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    corpus = [sentence(rng, 3, 12).capitalize() + "." for _ in range(300)] + [TEMPLATE]
    path = str(tmp_path_factory.mktemp("tok") / "t.model")
    return Tokenizer.load(train_tokenizer(corpus, path, 384))


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def naive_pair_count(comps):
    return sum(
        1 for c in comps for a in c["ranks"] for b in c["ranks"] if a < b
    )  # ties are no pair


# --- reading ------------------------------------------------------------------------------------


def test_read_normalises_ties_and_pairwise_lines(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl",
        [
            {"prompt": "p0", "responses": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1]},
            "",
            {"prompt": "p1", "chosen": "good", "rejected": "bad", "extra": 1},
            {"prompt": "p2", "responses": ["x", "y", "z"], "ranking": [[1], 2, 0]},
        ],
    )
    comps = rm_data.read_comparisons(path)
    assert [c["ranks"] for c in comps] == [[1, 2, 0, 1], [0, 1], [2, 0, 1]]
    assert comps[1]["responses"] == ["good", "bad"]
    assert [c["prompt"] for c in comps] == ["p0", "p1", "p2"]
    # The blank line is skipped but still counted in the line numbers.
    assert [c["source"] for c in comps] == [f"{path}:1", f"{path}:3", f"{path}:4"]


KWAY = {"prompt": "p", "responses": ["a", "b", "c"]}


@pytest.mark.parametrize(
    "line, message",
    [
        ({**KWAY, "ranking": [0, [1, 0], 2]}, "response 0 more than once"),
        ({**KWAY, "ranking": [0, 1, 3]}, "index 3 is out of range for 3 responses"),
        ({**KWAY, "ranking": [0, -1, 2]}, "index -1 is out of range"),
        ({**KWAY, "ranking": [0, 1]}, r"does not mention response\(s\) \[2\]"),
        ({"prompt": "p", "responses": ["a"], "ranking": [0]}, "needs at least 2"),
        ({**KWAY, "ranking": [0, "1", 2]}, "entry '1' is not a response index"),
        ({**KWAY, "ranking": [0, True, 2]}, "entry True is not a response index"),
        ({**KWAY, "ranking": [0, [], 1, 2]}, r"entry \[\] is not a response index"),
        ({**KWAY, "ranking": [0, [1, [2]]]}, "is not a response index"),
        ({**KWAY, "ranking": "012"}, "'ranking' must be a list"),
        ({"prompt": "p", "responses": ["a", 1], "ranking": [0, 1]}, "list of strings"),
        ({"prompt": "p", "responses": list("abcd"), "ranking": [0, 1, 2, 3]}, "k_max=3"),
        ({"prompt": "p", "responses": ["a", "b"]}, "'ranking' is missing"),
        ({"prompt": "p", "chosen": "a"}, "'rejected' is missing"),
        ({"prompt": "p", "chosen": "a", "rejected": 2}, "'rejected' must be str"),
        ({"prompt": "p", "chosen": "a", "rejected": "b", "ranking": [0]}, "use one form"),
        ({"prompt": "p", "text": "a"}, "neither a K-way comparison"),
        ({"chosen": "a", "rejected": "b"}, "'prompt' is missing"),
        ("{not json", "not valid JSON"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    good = {"prompt": "ok", "chosen": "a", "rejected": "b"}
    path = write_lines(tmp_path / "bad.jsonl", [good, "  ", line, good])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*" + message):
        rm_data.read_comparisons(path, k_max=3)


# --- encoding -----------------------------------------------------------------------------------

COMPS = [
    {
        "prompt": "the cat sat",
        "responses": ["on a mat", "under a tree", "then ran"],
        "ranks": [1, 0, 1],
    },
    {"prompt": "a dog ran", "responses": ["quickly", "slowly and then"], "ranks": [0, 1]},
]


def test_encode_layout(tok):
    ex, info = rm_data.encode_comparisons(COMPS, tok, TEMPLATE, seq_len=32, k_max=4)
    assert ex["tokens"].shape == ex["mask"].shape == (2, 4, 32)
    assert (ex["tokens"].dtype, ex["mask"].dtype) == (np.int32, np.bool_)
    assert (ex["ranks"].dtype, ex["kmask"].dtype) == (np.int32, np.float32)
    assert info == {"sequences": 5, "cut_sequences": 0, "longest": int(ex["mask"].sum(-1).max())}
    for i, c in enumerate(COMPS):
        prefix = sft_data.prompt_ids(tok, TEMPLATE, c["prompt"])
        k = len(c["responses"])
        for j, response in enumerate(c["responses"]):
            want = prefix + tok.encode(response) + [EOS_ID]
            row, m = ex["tokens"][i, j], ex["mask"][i, j]
            assert row[: len(want)].tolist() == want
            assert (row[len(want) :] == PAD_ID).all()
            assert m.tolist() == [t < len(want) for t in range(32)]
            assert row[m][-1] == EOS_ID  # the score is read at the EOS
        assert ex["ranks"][i].tolist() == c["ranks"] + [-1] * (4 - k)
        assert ex["kmask"][i].tolist() == [1.0] * k + [0.0] * (4 - k)
        # Absent slots are all padding.
        assert (ex["tokens"][i, k:] == PAD_ID).all() and not ex["mask"][i, k:].any()


def test_long_sequences_are_cut_and_counted(tok):
    comps = [{"prompt": "hi", "responses": ["a", "the cat sat on the mat " * 10], "ranks": [0, 1]}]
    ex, info = rm_data.encode_comparisons(comps, tok, TEMPLATE, seq_len=24, k_max=2)
    assert info["cut_sequences"] == 1
    assert ex["mask"][0, 1].all() and ex["tokens"][0, 1, -1] != EOS_ID
    assert ex["tokens"][0, 0][ex["mask"][0, 0]][-1] == EOS_ID  # the short one is intact
    long_prompt = [{"prompt": "the cat " * 30, "responses": ["a", "b"], "ranks": [0, 1]}]
    long_prompt[0]["source"] = "x.jsonl:7"
    with pytest.raises(ValueError, match=r"x\.jsonl:7: the prompt alone is \d+ tokens"):
        rm_data.encode_comparisons(long_prompt, tok, TEMPLATE, seq_len=24, k_max=2)
    with pytest.raises(ValueError, match="k_max=2"):
        rm_data.encode_comparisons(COMPS, tok, TEMPLATE, seq_len=32, k_max=2)


def test_pair_expansion_count_and_gathered_rows(tok):
    comps = COMPS + [
        {"prompt": "p", "responses": list("abcde"), "ranks": [0, 2, 1, 2, 3]},
    ]
    pairs = rm_data.expand_pairs(comps)
    assert len(pairs) == naive_pair_count(comps) == 2 + 1 + 9
    assert all(p["ranks"] == [0, 1] for p in pairs)
    # Winner first: "under a tree" (rank 0) beats both rank-1 responses of the first comparison.
    assert [p["responses"] for p in pairs[:2]] == [
        ["under a tree", "on a mat"],
        ["under a tree", "then ran"],
    ]
    kway, _ = rm_data.encode_comparisons(comps, tok, TEMPLATE, seq_len=32, k_max=5)
    gathered = rm_data.pair_examples(kway)
    direct, _ = rm_data.encode_comparisons(pairs, tok, TEMPLATE, seq_len=32, k_max=2)
    for key in direct:
        np.testing.assert_array_equal(gathered[key], direct[key])
        assert gathered[key].dtype == direct[key].dtype


# --- building the pipeline ----------------------------------------------------------------------


def make_files(tmp_path, n=40, seed=0):
    """K-way lines with K in 2..6 and ties, pairwise lines, and repeated prompts."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        prompt = f"prompt {i % 30} " + sentence(random.Random(i % 30))
        if i % 4 == 3:
            lines.append({"prompt": prompt, "chosen": sentence(rng), "rejected": sentence(rng)})
            continue
        k = rng.randint(2, 6)
        order = rng.sample(range(k), k)
        ranking = [order[0], order[1:3] if k > 2 else order[1], *order[3:]]
        lines.append(
            {"prompt": prompt, "responses": [sentence(rng) for _ in range(k)], "ranking": ranking}
        )
    return write_lines(tmp_path / "train.jsonl", lines)


def build(path, tok, batching, **kw):
    kw = {"template": TEMPLATE, "seq_len": 48, "batch_size": 4, "seed": 3, "k_max": 6, **kw}
    return rm_data.build_rm_data(path, tok, batching=batching, eval_fraction=0.2, **kw)


def test_modes_share_eval_and_expand_train(tmp_path, tok):
    path = make_files(tmp_path)
    it_prompt, eval_prompt, info_prompt = build(path, tok, "per_prompt")
    it_pair, eval_pair, info_pair = build(path, tok, "per_pair")

    assert len(eval_prompt) == len(eval_pair) == info_prompt["eval_batches"] > 0
    for a, b in zip(eval_prompt, eval_pair, strict=True):
        assert a.keys() == b.keys() == {"tokens", "mask", "ranks", "kmask"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # Every held-out comparison is evaluated once; padding rows hold no response.
    kmask = np.concatenate([b["kmask"] for b in eval_prompt])
    assert (kmask.sum(1) > 0).sum() == info_prompt["eval_comparisons"]
    assert eval_prompt[0]["tokens"].shape == (4, 6, 48)

    comps = rm_data.read_comparisons(path, k_max=6)
    train, evals = rm_data.split_by_prompt(comps, 0.2, seed=3)
    assert info_prompt["train_comparisons"] == len(train) and len(evals) > 0
    assert not {c["prompt"] for c in train} & {c["prompt"] for c in evals}
    # The fraction is of distinct prompts (30 here), not of comparison lines (40).
    assert len({c["prompt"] for c in evals}) == round(0.2 * 30)
    assert info_pair["train_examples"] == info_pair["train_pairs"] == naive_pair_count(train)
    assert info_prompt["train_examples"] == len(train)
    want = collections.Counter(len(c["responses"]) for c in comps)
    assert info_prompt["k_histogram"] == info_pair["k_histogram"] == dict(want)
    assert set(want) == {2, 3, 4, 5, 6}

    batch = next(it_prompt)
    assert batch["tokens"].shape == (4, 6, 48) and batch["ranks"].shape == (4, 6)
    batch = next(it_pair)
    assert batch["tokens"].shape == (4, 2, 48)
    assert (batch["ranks"] == [0, 1]).all() and (batch["kmask"] == 1).all()


def test_train_iterator_is_deterministic(tmp_path, tok):
    path = make_files(tmp_path)
    for batching in rm_data.BATCHINGS:
        runs = [
            [next(it) for _ in range(8)] for it, _, _ in (build(path, tok, batching) for _ in "ab")
        ]
        for a, b in zip(*runs, strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
        other = next(build(path, tok, batching, seed=4)[0])
        assert not np.array_equal(other["tokens"], runs[0][0]["tokens"])


def test_eval_paths_and_unknown_batching(tmp_path, tok):
    path = make_files(tmp_path)
    held = write_lines(tmp_path / "eval.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    _, evals, info = build(path, tok, "per_pair", eval_paths=held)
    assert info["eval_comparisons"] == 1 and info["train_comparisons"] == 40
    assert len(evals) == 1 and evals[0]["kmask"].sum() == 2  # one real row, three padding rows
    with pytest.raises(ValueError, match="unknown rm.batching: 'pairs'; expected 'per_prompt'"):
        build(path, tok, "pairs")


# --- rows without signal, K from the data, cut sequences -----------------------------------------


def test_all_tie_rows_are_skipped_and_counted(tmp_path, caplog):
    rows = [
        {**KWAY, "ranking": [[0, 1, 2]]},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {**KWAY, "ranking": [[2, 0, 1]]},
    ]
    path = write_lines(tmp_path / "ties.jsonl", rows)
    skipped = collections.Counter()
    comps = rm_data.read_comparisons(path, k_max=3, skipped=skipped)
    assert [c["source"] for c in comps] == [f"{path}:2"]
    assert skipped["all_tie"] == 2
    assert "skipped 2 comparison(s) that tie every response" in caplog.text
    assert "first at line 1" in caplog.text


def test_pairwise_data_runs_with_two_slots_not_k_max(tmp_path, tok):
    rng = random.Random(1)
    rows = [{"prompt": f"p {i}", "chosen": sentence(rng), "rejected": sentence(rng)}
            for i in range(40)]  # fmt: skip
    rows.append({**KWAY, "ranking": [[0, 1, 2]]})  # skipped: does not widen K
    path = write_lines(tmp_path / "pairs.jsonl", rows)
    it, evals, info = build(path, tok, "per_prompt", k_max=9)
    assert info["k"] == 2 and info["all_tie_skipped"] == 1
    assert next(it)["tokens"].shape == (4, 2, 48)  # [b, K=2, L], not [b, 9, L]
    assert all(b["tokens"].shape[1] == 2 for b in evals)


def test_many_cut_sequences_warn_with_the_length_that_fits(tmp_path, tok, caplog):
    rng = random.Random(2)
    rows = [{"prompt": f"p {i}", "chosen": sentence(rng, 6, 10), "rejected": sentence(rng, 6, 10)}
            for i in range(20)]  # fmt: skip
    path = write_lines(tmp_path / "long.jsonl", rows)
    lengths = [
        len(sft_data.prompt_ids(tok, TEMPLATE, r["prompt"])) + len(tok.encode(resp)) + 1
        for r in rows
        for resp in (r["chosen"], r["rejected"])
    ]
    seq_len = sorted(lengths)[len(lengths) // 2]  # about half are cut
    cut = sum(n > seq_len for n in lengths)
    _, _, info = build(path, tok, "per_prompt", seq_len=seq_len)
    assert info["cut_sequences"] == cut and info["cut_fraction"] == cut / len(lengths)
    want = f"{round(100 * cut / len(lengths))}% of comparison sequences ({cut} of {len(lengths)})"
    assert want in caplog.text
    assert f"train.seq_len={max(lengths)} would fit them all" in caplog.text
    caplog.clear()
    build(path, tok, "per_prompt", seq_len=max(lengths))
    assert "cut at train.seq_len" not in caplog.text


def test_empty_comparisons_file_is_named(tmp_path, tok):
    path = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match=r"^data.train: no train comparisons in .*empty\.jsonl"):
        build(path, tok, "per_prompt")
    ties = write_lines(tmp_path / "ties.jsonl", [{**KWAY, "ranking": [[0, 1, 2]]}] * 3)
    with pytest.raises(ValueError, match=r"ties\.jsonl' \(3 all-tie rows skipped\)$"):
        build(ties, tok, "per_prompt")
    # An empty held-out file is named too, not silently an evaluation of nothing.
    good = write_lines(
        tmp_path / "good.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 8
    )
    with pytest.raises(ValueError, match=r"^data.eval: no eval comparisons in .*empty\.jsonl"):
        build(good, tok, "per_prompt", eval_paths=path)
