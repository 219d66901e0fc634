"""Tests for rlhf_jax.data.tokenizer: training, exact round trips, special ids, checks, CLI."""

import json
import os
import random
import subprocess
import sys

import pytest

from rlhf_jax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    train_tokenizer,
)

VOCAB = 384


def make_corpus(n_docs=300, seed=0):
    """Sentences over a small ASCII word list; no digits, no non-ASCII characters."""
    rng = random.Random(seed)
    words = ["the", "cat", "dog", "sat", "ran", "on", "under", "a", "mat", "house", "tree"]
    words += ["river", "quickly", "slowly", "and", "then"]
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize() + "."
        for _ in range(n_docs)
    ]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_tokenizer(make_corpus(), str(tmp_path_factory.mktemp("tok") / "t.model"), VOCAB)


@pytest.fixture(scope="module")
def tok(tok_path):
    return Tokenizer.load(tok_path)


ROUND_TRIP = [
    "The cat sat on the mat.",
    "",
    "  leading and   inner  spaces, trailing ",
    "line one\nline two\n\n\ttabbed",
    "digits 0123456789 and symbols {}[]<>~|^",
    "Ünïcödé — 你好, мир 🙂",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Byte fallback: unseen characters become byte pieces, never <unk>.
    assert UNK_ID not in ids
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_unseen_characters_use_byte_pieces(tok):
    ids = tok.encode("你")
    # One CJK character is 3 UTF-8 bytes, each its own <0x..> piece.
    assert [tok.id_to_piece(i) for i in ids] == ["<0xE4>", "<0xBD>", "<0xA0>"]


def test_training_learned_merges(tok):
    text = "The cat sat on the mat and then the dog ran quickly under the house."
    # Learned pieces compress in-domain text well below one id per byte.
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 3


def test_special_ids(tok):
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    text = "The dog ran."
    ids = tok.encode(text)
    assert BOS_ID not in ids and EOS_ID not in ids and PAD_ID not in ids
    # pad is dropped and bos/eos decode to nothing, wherever they are.
    assert tok.decode([PAD_ID, BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == text


def test_concatenation_decodes_to_joined_text(tok):
    # No dummy prefix: joining prompt and response ids is joining their texts.
    for a, b in [("The cat", " sat."), ("x", "y"), ("Hello\n", "  world")]:
        assert tok.decode(tok.encode(a) + tok.encode(b)) == a + b


def test_vocab_size_is_soft_limit(tok, tmp_path):
    assert 260 < tok.vocab_size <= VOCAB
    big = Tokenizer.load(train_tokenizer(make_corpus(50), str(tmp_path / "big.model"), 5000))
    assert 260 < big.vocab_size < 5000


def test_training_is_deterministic_and_atomic(tok_path, tmp_path):
    out = tmp_path / "new" / "dir" / "again.model"
    assert train_tokenizer(make_corpus(), str(out), VOCAB) == str(out)
    with open(tok_path, "rb") as f1, open(out, "rb") as f2:
        assert f1.read() == f2.read()
    # Only the final file is left: no temp file from the atomic write.
    assert os.listdir(out.parent) == ["again.model"]


def test_unigram_model_round_trips(tmp_path):
    tok = Tokenizer.load(
        train_tokenizer(make_corpus(), str(tmp_path / "u.model"), VOCAB, model_type="unigram")
    )
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text


def test_train_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be at least 261"):
        train_tokenizer(make_corpus(), str(tmp_path / "a.model"), 100)
    with pytest.raises(ValueError, match="unknown model_type: 'wordpiece'"):
        train_tokenizer(make_corpus(), str(tmp_path / "b.model"), VOCAB, model_type="wordpiece")
    with pytest.raises(ValueError, match="no non-empty text"):
        train_tokenizer(["", "  \n "], str(tmp_path / "c.model"), VOCAB)
    assert not os.listdir(tmp_path)


def test_check_model_vocab(tok):
    v = tok.vocab_size
    tok.check_model_vocab(v)
    tok.check_model_vocab(v + 1000)  # padded embedding tables are fine
    with pytest.raises(ValueError, match=rf"{v} tokens but cfg\.vocab is {v - 1}"):
        tok.check_model_vocab(v - 1, where="cfg.vocab")


def test_load_missing_file_names_path(tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.load(missing)


def test_load_rejects_non_model_file(tmp_path):
    path = tmp_path / "junk.model"
    path.write_text("not a model")
    with pytest.raises(ValueError, match="not a valid sentencepiece model"):
        Tokenizer.load(str(path))


def test_foreign_special_ids_are_used_as_they_are(tmp_path):
    """A model with sentencepiece's default ids (unk 0, bos 1, eos 2, no pad), as LLaMA's."""
    import sentencepiece as spm  # only to build a foreign model with sentencepiece's default ids

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_corpus()),
        model_prefix=str(tmp_path / "foreign"),
        vocab_size=60,
        minloglevel=2,
    )
    tok = Tokenizer.load(str(tmp_path / "foreign.model"))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)  # no pad piece: pad = unk
    text = "the cat sat"
    assert tok.decode(tok.encode(text) + [tok.pad_id]) == text
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_corpus()),
        model_prefix=str(tmp_path / "noeos"),
        vocab_size=60,
        minloglevel=2,
        eos_id=-1,
    )
    with pytest.raises(ValueError, match="no bos or eos piece"):
        Tokenizer.load(str(tmp_path / "noeos.model"))


def test_cli_train_and_encode(tmp_path):
    corpus = make_corpus()
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[:200]))
    txt = tmp_path / "b.txt"
    txt.write_text("\n\n".join(corpus[200:]))
    out = tmp_path / "cli" / "tok.model"
    run = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.data.tokenizer", "train", "--input", str(jsonl), str(txt)]
        + ["--vocab-size", str(VOCAB), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert f"from {len(corpus)} documents" in run.stdout
    tok = Tokenizer.load(str(out))
    assert tok.decode(tok.encode("The mat.")) == "The mat."

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_jax.data.tokenizer",
            "encode",
            "--model",
            str(out),
            "The mat.",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert str(tok.encode("The mat.")) in run.stdout


def test_cli_missing_input_is_one_line_error(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_jax.data.tokenizer",
            "train",
            "--input",
            str(tmp_path / "x.txt"),
        ]
        + ["--vocab-size", "300", "--out", str(tmp_path / "t.model")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode != 0
    assert "x.txt" in run.stderr and "Traceback" not in run.stderr
