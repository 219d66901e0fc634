"""Published preference forms (transcripts, message-list pairs, scored rows; JSONL and Parquet)
read into comparisons, their errors, and the convert_data tool."""

import collections
import json
import math
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax.data import chat, pref_formats, rm_data, sft_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.tools import convert_data

EXTS = ["jsonl", "parquet"]


def write(path, rows):
    """Rows as JSONL ("" is a blank line) or Parquet, by the path's extension."""
    if str(path).endswith(".parquet"):
        columns = dict.fromkeys(k for r in rows for k in r)  # a row without a field has a null
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows]), path)
    else:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def read(paths, **kw):
    return rm_data.read_comparisons(paths, **kw)


def hh(*turns):
    """A transcript in HH-RLHF's layout from alternating Human / Assistant turns."""
    roles = ("Human", "Assistant")
    return "".join(f"\n\n{roles[i % 2]}: {t}" for i, t in enumerate(turns))


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# --- transcripts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", EXTS)
def test_transcript_pairs_split_at_the_last_assistant_turn(tmp_path, ext):
    rows = [
        {
            "chosen": hh("What is 7 plus 5?", "12.", "And plus 3?", "15."),
            "rejected": hh("What is 7 plus 5?", "12.", "And plus 3?", "14."),
        },
        # No leading blank line; a response with blank lines of its own.
        {
            "chosen": "Human: Write two lines.\n\nAssistant: One.\n\nTwo.",
            "rejected": "Human: Write two lines.\n\nAssistant: One.",
        },
        # The copies that split the dialogue off into a transcript `prompt`.
        {
            "prompt": hh("What is 7 plus 5?", "12.", "And plus 3?") + "\n\nAssistant:",
            "response": " 15.",
            "chosen": " 15.",
            "rejected": " 14.",
        },
    ]
    path = write(tmp_path / f"hh.{ext}", rows)
    comps = read(path)
    assert comps[0]["prompt"] == (
        ("user", "What is 7 plus 5?"),
        ("assistant", "12."),
        ("user", "And plus 3?"),
    )
    assert comps[0]["responses"] == ["15.", "14."] and comps[0]["ranks"] == [0, 1]
    assert comps[1]["prompt"] == (("user", "Write two lines."),)
    assert comps[1]["responses"] == ["One.\n\nTwo.", "One."]
    assert comps[2]["prompt"] == comps[0]["prompt"] and comps[2]["responses"] == ["15.", "14."]
    assert [c["source"] for c in comps] == [f"{path}:1", f"{path}:2", f"{path}:3"]


# --- message lists --------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", EXTS)
def test_message_list_pairs_take_the_shared_prefix_as_prompt(tmp_path, ext):
    ultrafeedback = {
        "prompt": "hi",
        "prompt_id": "abc",
        "chosen": msgs(("user", "hi"), ("assistant", "hello")),
        "rejected": msgs(("user", "hi"), ("assistant", "go away")),
        "messages": msgs(("user", "hi"), ("assistant", "hello")),
        "score_chosen": 8.0,
        "score_rejected": 2.0,
    }
    continuation = {  # the prompt apart, the lists hold only the answer
        "prompt": msgs(("system", "be brief."), ("user", "2+2?")),
        "chosen": msgs(("assistant", "4")),
        "rejected": msgs(("assistant", "5")),
    }
    answer_only = {
        "prompt": "name a colour",
        "chosen": msgs(("assistant", "red")),
        "rejected": msgs(("assistant", "seven")),
    }
    whole = {
        "chosen": msgs(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "good")),
        "rejected": msgs(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "bad")),
    }
    # One file per row: Parquet columns have one type, and these rows differ in `prompt`'s.
    rows = [ultrafeedback, continuation, answer_only, whole]
    paths = [write(tmp_path / f"m{i}.{ext}", [r]) for i, r in enumerate(rows)]
    comps = read(paths)
    assert [c["prompt"] for c in comps] == [
        (("user", "hi"),),
        (("system", "be brief."), ("user", "2+2?")),
        (("user", "name a colour"),),
        (("user", "a"), ("assistant", "b"), ("user", "c")),
    ]
    assert [c["responses"] for c in comps] == [
        ["hello", "go away"],
        ["4", "5"],
        ["red", "seven"],
        ["good", "bad"],
    ]
    assert all(c["ranks"] == [0, 1] for c in comps)


@pytest.mark.parametrize("ext", EXTS)
def test_project_rows_still_read_and_a_prompt_may_be_a_message_list(tmp_path, ext):
    plain = write(tmp_path / f"p.{ext}", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    # Parquet columns hold one type, so each ranking entry is a list there.
    row = {"prompt": msgs(("user", "q")), "responses": ["x", "y", "z"], "ranking": [[2], [0, 1]]}
    listed = write(tmp_path / f"l.{ext}", [row])
    comps = read([plain, listed], k_max=3)
    assert comps[0]["prompt"] == "q" and comps[0]["responses"] == ["a", "b"]
    assert comps[1]["prompt"] == (("user", "q"),) and comps[1]["ranks"] == [1, 1, 0]


# --- scored rows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", EXTS)
def test_scored_rows_become_rankings_with_ties(tmp_path, ext):
    scored = {"prompt": "p", "responses": ["a", "b", "c", "d"], "scores": [1.0, 3.0, 1.0, 2.5]}
    completions = {
        "instruction": "q",
        "completions": [
            {"response": "x", "overall_score": 7.0, "model": "m1"},
            {"response": "y", "overall_score": 9.0, "model": "m2"},
            {"response": "z", "overall_score": 7.0, "model": "m3"},
        ],
    }
    chat_scored = {"messages": msgs(("user", "hi")), "responses": ["u", "v"], "scores": [0.5, 1.5]}
    # One file: in Parquet each row has nulls for the other rows' fields.
    comps = read(write(tmp_path / f"scored.{ext}", [scored, completions, chat_scored]))
    # Dense ranks, 0 = best: higher score is better, equal scores share a rank.
    assert [c["ranks"] for c in comps] == [[2, 0, 2, 1], [1, 0, 1], [1, 0]]
    # A published row's string prompt is a chat's user turn: a conversation, so the model's chat
    # template renders it (as a plain prompt it would silently skip that template).
    assert [c["prompt"] for c in comps] == [(("user", "p"),), (("user", "q"),), (("user", "hi"),)]
    assert comps[1]["responses"] == ["x", "y", "z"]


def test_ranking_from_scores_matches_counting_better_scores():
    rng = random.Random(0)
    for _ in range(200):
        scores = [rng.choice([0.0, 0.5, 1.0, 2.0, -1.0]) for _ in range(rng.randint(1, 7))]
        ranks = [-1] * len(scores)
        for rank, entry in enumerate(pref_formats.ranking_from_scores(scores)):
            for i in entry if isinstance(entry, list) else [entry]:
                ranks[i] = rank
        # The dense rank of a response is the number of distinct scores above its own.
        want = [len({t for t in scores if t > s}) for s in scores]
        assert ranks == want, scores


@pytest.mark.parametrize("ext", EXTS)
def test_all_equal_scores_are_skipped_and_counted(tmp_path, ext, caplog):
    rows = [
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [2.0, 2.0, 2.0]},
        {"prompt": "q", "responses": ["a", "b", "c"], "scores": [1.0, 0.0, 1.0]},
        {"prompt": "r", "responses": ["a", "b", "c"], "scores": [0.5, 0.5, 0.5]},
    ]
    path = write(tmp_path / f"ties.{ext}", rows)
    skipped = collections.Counter()
    comps = read(path, skipped=skipped)
    assert [c["source"] for c in comps] == [f"{path}:2"]
    assert comps[0]["ranks"] == [0, 1, 0]
    assert skipped["all_tie"] == 2
    assert "skipped 2 comparison(s) that tie every response" in caplog.text


# --- errors ---------------------------------------------------------------------------------------

TWO = hh("hi", "hello")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"chosen": hh("hi"), "rejected": TWO}, r"field 'chosen' has no '\\n\\nAssistant:' turn"),
        (
            {"chosen": TWO, "rejected": hh("bye", "hello")},
            "field 'rejected' does not share the prompt of 'chosen'.* from turn 0",
        ),
        ({"chosen": TWO, "rejected": 5}, "field 'rejected' must be str .*got int"),
        ({"chosen": TWO}, "field 'rejected' is missing"),
        ({"chosen": "\n\nAssistant: x", "rejected": TWO}, "field 'chosen' has no 'Human:' turn"),
        (
            {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": TWO},
            r"field 'chosen', the turns before its answer: messages\[1\] is a user turn",
        ),
        (
            {"prompt": "\n\nHuman: a\n\nHuman: b\n\nAssistant:", "chosen": "x", "rejected": "y"},
            r"field 'prompt', the turns before its answer: messages\[1\] is a user turn",
        ),
        (
            {"chosen": msgs(("user", "a"), ("assistant", "b")), "rejected": "b"},
            "field 'rejected' must be a list of {role, content} messages, got str",
        ),
        ({"rejected": msgs(("user", "a"), ("assistant", "b"))}, "field 'chosen' is missing"),
        (
            {"chosen": msgs(("user", "a")), "rejected": msgs(("user", "a"), ("assistant", "b"))},
            "field 'chosen' must end with the assistant's answer, but is a 'user' message",
        ),
        (
            {
                "chosen": msgs(("user", "a"), ("assistant", "b")),
                "rejected": msgs(("user", "z"), ("assistant", "b")),
            },
            "field 'rejected' does not share the prompt of 'chosen'",
        ),
        (
            {"chosen": [{"role": "user"}], "rejected": msgs(("assistant", "b"))},
            "field 'chosen' entry 0 is not an object with 'role' and 'content'",
        ),
        (
            {"chosen": msgs(("assistant", "b")), "rejected": msgs(("assistant", "c"))},
            "field 'chosen' has no user turn before its answer",
        ),
        (
            {"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 2]},
            r"field 'scores' has 2 score\(s\) for 3 responses",
        ),
        (
            {"prompt": "p", "responses": ["a", "b"], "scores": [1, math.nan]},
            "field 'scores' entry 1 is nan, not a finite number",
        ),
        (
            {"prompt": "p", "responses": ["a", "b"], "scores": [True, 0]},
            "field 'scores' entry 0 is True",
        ),
        (
            {"prompt": "p", "responses": "ab", "scores": [1, 0]},
            "field 'responses' must be a list of strings, got str",
        ),
        ({"prompt": "p", "scores": [1, 0]}, "field 'responses' is missing"),
        ({"responses": ["a", "b"], "scores": [1, 0]}, "field 'prompt' is missing"),
        (
            {"prompt": "p", "responses": ["a", "b"], "scores": [1, 0], "ranking": [0, 1]},
            "the line has both 'ranking' and 'scores'",
        ),
        (
            {"instruction": "q", "completions": [{"response": "x", "overall_score": 1}, {}]},
            "field 'completions' entry 1 has no 'response' string",
        ),
        (
            {"instruction": "q", "completions": [{"response": "x"}, {"response": "y"}]},
            "field 'completions' entry 0 has no 'overall_score'",
        ),
        (
            {"instruction": "q", "completions": [{"response": "x", "overall_score": "7"}] * 2},
            "field 'completions' entry 0 score is '7', not a finite number",
        ),
        (
            {"completions": [{"response": "x", "overall_score": 1}] * 2},
            "field 'instruction' is missing",
        ),
    ],
)
def test_a_bad_row_is_one_error_naming_file_row_and_field(tmp_path, row, message):
    good = {"chosen": TWO, "rejected": hh("hi", "go away")}
    path = write(tmp_path / "bad.jsonl", [good, "", row, good])
    with pytest.raises(ValueError, match=r"^\S*bad\.jsonl:3: " + message) as err:
        read(path)
    assert "\n" not in str(err.value)


def test_parquet_errors_name_the_row(tmp_path):
    rows = [{"chosen": TWO, "rejected": hh("hi", "ok")}] * 2
    rows.append({"chosen": TWO, "rejected": hh("other", "ok")})
    path = write(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError, match=r"bad\.parquet:3: field 'rejected' does not share"):
        read(path)
    missing = write(tmp_path / "none.parquet", [{"chosen": TWO, "rejected": TWO}, {"chosen": TWO}])
    with pytest.raises(ValueError, match=r"none\.parquet:2: field 'rejected' is missing"):
        read(missing)  # the null its column holds in row 2 is no field
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ValueError, match=r"fake\.parquet: not a readable Parquet file"):
        read(str(fake))


# --- the stage reads a published file directly --------------------------------------------------


def test_rm_data_encodes_a_parquet_transcript_file(tmp_path):
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "what", "is", "red", "blue"]
    docs = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)]
    tok = tok_lib.Tokenizer.load(
        tok_lib.train_tokenizer(docs, str(tmp_path / "t.model"), 300, reserved=chat.DEFAULT.markers)
    )
    rows = [
        {"chosen": hh(f"what is {w}", "the cat"), "rejected": hh(f"what is {w}", "a mat")}
        for w in words
    ]
    path = write(tmp_path / "hh.parquet", rows)
    _, _, info = rm_data.build_rm_data(
        path, tok, template="{prompt}", seq_len=32, batch_size=2, seed=0, eval_fraction=0.2
    )
    assert info["k"] == 2 and info["distinct_prompts"] == len(words)
    assert info["train_comparisons"] + info["eval_comparisons"] == len(words)
    comps = read(path)
    ex, _ = rm_data.encode_comparisons(comps[:1], tok, "{prompt}", seq_len=32, k_max=2)
    context = chat.prompt_ids((("user", "what is the"),), tok)  # the rendered conversation
    for j, response in enumerate(["the cat", "a mat"]):
        got = ex["tokens"][0, j][ex["mask"][0, j]]
        np.testing.assert_array_equal(got, context + tok.encode(response) + [tok.eos_id])


# --- convert_data ---------------------------------------------------------------------------------


def test_convert_data_writes_what_the_reader_reads(tmp_path, capsys):
    hh_path = write(
        tmp_path / "hh.parquet",
        [
            {
                "chosen": hh("hi", "hello", "how are you?", "fine"),
                "rejected": hh("hi", "hello", "how are you?", "bad"),
            }
        ],
    )
    scored_path = write(
        tmp_path / "scored.jsonl",
        [
            {"prompt": "p", "responses": ["a", "b", "c"], "scores": [0.0, 2.0, 0.0]},
            {"prompt": "tie", "responses": ["a", "b"], "scores": [1.0, 1.0]},
            {"prompt": "q", "responses": ["worse", "better"], "scores": [1.0, 2.0]},
        ],
    )
    out = tmp_path / "out" / "comparisons.jsonl"
    counts = convert_data.main(["--in", hh_path, "--in", scored_path, "--out", str(out)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == [
        {
            "messages": msgs(("user", "hi"), ("assistant", "hello"), ("user", "how are you?")),
            "chosen": "fine",
            "rejected": "bad",
        },
        {"messages": msgs(("user", "p")), "responses": ["a", "b", "c"], "ranking": [1, [0, 2]]},
        {"messages": msgs(("user", "q")), "chosen": "better", "rejected": "worse"},
    ]
    assert counts["comparisons"] == 3 and counts["all_tie_skipped"] == 1
    printed = capsys.readouterr().out
    assert "wrote 3 comparisons (K=2: 2, K=3: 1)" in printed and "skipped 1 all-tie rows" in printed
    # Read back, the converted file is the same data as the published files (in ranked order).
    again = read(str(out))
    orig = read([hh_path, scored_path])
    for a, b in zip(again, orig, strict=True):
        best = lambda c: [c["responses"][i] for i in np.argsort(c["ranks"], kind="stable")]
        assert a["prompt"] == b["prompt"] and best(a) == best(b)
        assert sorted(a["ranks"]) == sorted(b["ranks"])


def test_convert_data_demos_are_the_best_responses(tmp_path, capsys):
    hh_path = write(
        tmp_path / "hh.parquet", [{"chosen": hh("hi", "hello"), "rejected": hh("hi", "bye")}]
    )
    scored_path = write(
        tmp_path / "scored.jsonl",
        [{"prompt": "p", "responses": ["a", "b", "c"], "scores": [2.0, 5.0, 5.0]}],
    )
    out = tmp_path / "demos.jsonl"
    convert_data.main(["--in", hh_path, "--in", scored_path, "--out", str(out), "--demos"])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    # The first of the responses tied for best.
    assert written == [
        {"messages": msgs(("user", "hi"), ("assistant", "hello"))},
        {"messages": msgs(("user", "p"), ("assistant", "b"))},
    ]
    demos = sft_data.read_demos(str(out))  # what SFT trains on
    assert [d["response"] for d in demos] == ["hello", "b"]
    assert "wrote 2 demonstrations" in capsys.readouterr().out


def test_convert_data_bad_row_exits_with_one_line(tmp_path, capsys):
    path = write(tmp_path / "bad.jsonl", [{"chosen": TWO, "rejected": hh("bye", "x")}])
    out = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exit_:
        convert_data.main(["--in", path, "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:1: field 'rejected'") and "\n" not in err
    assert not out.exists()
