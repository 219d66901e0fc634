"""SentencePiece tokenizer: training, loading, and the fixed special ids.

This is the only module that imports sentencepiece. Every model trained by rlhf_jax uses the same
special ids, so padding, packing and masking code can rely on them without a tokenizer at hand:

    PAD_ID = 0, UNK_ID = 1, BOS_ID = 2, EOS_ID = 3     (pad is never -1)

Models are trained so that text round-trips exactly: identity normalization (no NFKC, no
whitespace collapsing), no dummy-prefix space, and byte fallback so characters never seen in
training still encode (as UTF-8 byte pieces) instead of becoming <unk>. Because there is no dummy
prefix, `decode(encode(a) + encode(b)) == a + b`, which later stages rely on when they join a
prompt and a response.

Reserved pieces (`reserved`, e.g. the chat role markers of rlhf_jax/data/chat.py) are trained as
user-defined symbols: each is one id (right after the special ids), is never split, and is
matched wherever its text occurs.

`load_tokenizer(path)` is the one entry the stages use: a `.model` file is a SentencePiece model
(`Tokenizer`), a directory or a `tokenizer.json` a Hugging Face tokenizer
(rlhf_jax/data/hf_tokenizer.py, which owns the prompt/response boundary rule both follow). Both
answer the same interface; what a SentencePiece model answers for the parts only foreign models
vary in: `add_bos` True, `eos_ids == (eos_id,)`, no `model_template`.

CLI:
    python -m rlhf_jax.data.tokenizer train --input corpus.jsonl --vocab-size 8000 --out tok.model \
        [--reserve '<|system|>' '<|user|>' '<|assistant|>']
    python -m rlhf_jax.data.tokenizer encode --model tok.model "some text"
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

# 256 byte pieces + the 4 special ids must fit, plus at least one learned piece.
_MIN_VOCAB = 256 + 4 + 1
# SentencePiece skips training sentences longer than max_sentence_length bytes, so long lines are
# cut into chunks of at most this many characters (<= 4 bytes each in UTF-8).
_MAX_CHUNK_CHARS = 2048
_MAX_SENTENCE_BYTES = 4 * _MAX_CHUNK_CHARS
# The thread count changes the trained model, so it is a constant, not os.cpu_count().
_TRAIN_THREADS = 4

MODEL_TYPES = ("bpe", "unigram")


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """Yields the non-empty lines of every document, long lines cut into chunks."""
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            for start in range(0, len(line), _MAX_CHUNK_CHARS):
                yield line[start : start + _MAX_CHUNK_CHARS]


def _sample(sentences: Iterator[str], max_sentences: int, seed: int) -> list[str]:
    """Seeded uniform sample of at most `max_sentences` sentences, in corpus order.

    SentencePiece's own sampling (input_sentence_size) is not reproducible across processes, so
    we sample here (reservoir sampling) and let SentencePiece use everything it is given.
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, sentence in enumerate(sentences):
        if i < max_sentences:
            reservoir.append((i, sentence))
        else:
            j = rng.randrange(i + 1)
            if j < max_sentences:
                reservoir[j] = (i, sentence)
    reservoir.sort()
    return [sentence for _, sentence in reservoir]


def _atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` via a temp file in the same directory and os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".model")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a model file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def train_tokenizer(
    texts: Iterable[str],
    out_path: str,
    vocab_size: int,
    model_type: str = "bpe",
    seed: int = 0,
    *,
    max_sentences: int = 5_000_000,
    reserved: Sequence[str] = (),
    source: str = "the documents",
) -> str:
    """Trains a SentencePiece model on documents and writes it atomically to `out_path`.

    The result is deterministic given the same texts, arguments and sentencepiece version.

    Args:
      texts: documents; each is split into lines, and every non-empty line is one training
        sentence.
      out_path: where to write the `.model` file; parent directories are created. A killed run
        never leaves a partial file there.
      vocab_size: requested vocabulary size, at least 261 (256 byte pieces + 4 special ids + 1).
        It is a soft limit: a tiny corpus yields a smaller vocabulary (see Tokenizer.vocab_size).
      model_type: "bpe" or "unigram".
      seed: seeds the sampling of training sentences when there are more than `max_sentences`.
      max_sentences: at most this many sentences (a seeded uniform sample) are used for training,
        which bounds memory on large corpora.
      reserved: pieces that become single ids 4, 5, ... (user-defined symbols), e.g. chat role
        markers; they count toward vocab_size. Empty gives exactly the tokenizer of before.
      source: where `texts` came from (the data files), named by the error when they hold no
        text, so an empty file is found without a search.

    Returns:
      out_path.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type: {model_type!r}; expected one of {MODEL_TYPES}")
    reserved = list(reserved)
    if any(not isinstance(r, str) or not r.strip() for r in reserved):
        raise ValueError(f"reserved pieces must be non-empty strings, got {reserved}")
    if len(set(reserved)) != len(reserved):
        raise ValueError(f"reserved pieces must be distinct, got {reserved}")
    min_vocab = _MIN_VOCAB + len(reserved)
    if vocab_size < min_vocab:
        extra = f" + {len(reserved)} reserved pieces" if reserved else ""
        raise ValueError(
            f"vocab_size must be at least {min_vocab} (256 byte-fallback pieces + 4 special ids"
            f"{extra} + 1 learned piece), got {vocab_size}"
        )
    sentences = _sample(_training_sentences(texts), max_sentences, seed)
    if not sentences:
        raise ValueError(f"cannot train a tokenizer: no non-empty text in {source}")

    model = io.BytesIO()
    # Passed only when given, so the default trains exactly the model it always did.
    extra = {"user_defined_symbols": reserved} if reserved else {}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        input_sentence_size=0,  # use every sentence given; sampling happened above
        max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=_TRAIN_THREADS,
        minloglevel=2,  # errors only; training chatter would drown the CLI summary
        **extra,
    )
    _atomic_write_bytes(out_path, model.getvalue())
    return out_path


def load_tokenizer(path: str, chat_template=None):
    """A tokenizer of either backend: `.model` -> `Tokenizer`, a directory or tokenizer.json ->
    `hf_tokenizer.HFTokenizer` (imported only then). `chat_template` is bound as the project's
    template (see `Tokenizer`)."""
    path = os.fspath(path)
    if os.path.isdir(path) or os.path.basename(path) == "tokenizer.json":
        from rlhf_jax.data import hf_tokenizer

        return hf_tokenizer.HFTokenizer.load(path, chat_template)
    return Tokenizer.load(path, chat_template)


class Tokenizer:
    """A loaded SentencePiece model with rlhf_jax's fixed special ids.

    Attributes:
      path: the `.model` file this tokenizer was loaded from.
      chat_template: how `messages` rows are rendered with this tokenizer (a
        `rlhf_jax.data.chat.ChatTemplate`; None means chat.DEFAULT). Stages bind it from
        config.chat, as a Hugging Face tokenizer carries its chat template, so every encoder
        sees one format.
    """

    WORKDIR_NAME = "tokenizer.model"  # a stage workdir keeps its copy as this file
    add_bos = True  # documents and prompts start with bos_id
    model_template = None  # a SentencePiece model carries no chat template of its own

    def __init__(self, processor: spm.SentencePieceProcessor, path: str, chat_template=None):
        self._sp = processor
        self.path = path
        self.chat_template = chat_template
        # Our tokenizers have pad 0, unk 1, bos 2, eos 3. A foreign model (e.g. LLaMA's: unk 0,
        # bos 1, eos 2, no pad) is used as is; without a pad piece, padding uses the unk id,
        # which is safe because padded slots are always masked out of attention and loss.
        pad = processor.pad_id()
        self._pad = pad if pad >= 0 else processor.unk_id()
        self.has_pad = pad >= 0

    @classmethod
    def load(cls, path: str, chat_template=None) -> Tokenizer:
        """Loads a `.model` file and checks its special ids.

        Args:
          path: a SentencePiece model file, e.g. written by `train_tokenizer`.
          chat_template: bound as `self.chat_template` (see the class docstring).

        Returns:
          The tokenizer.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model file {path!r} does not exist")
        processor = spm.SentencePieceProcessor()
        try:
            processor.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path!r} is not a valid sentencepiece model ({e})") from e
        if processor.bos_id() < 0 or processor.eos_id() < 0:
            raise ValueError(
                f"tokenizer {path!r} defines no bos or eos piece (bos id {processor.bos_id()}, "
                f"eos id {processor.eos_id()}); both are needed to frame documents and responses"
            )
        return cls(processor, path, chat_template)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special and byte pieces included (ids are 0..vocab_size-1)."""
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a response: the one eos."""
        return (self._sp.eos_id(),)

    def fingerprint(self) -> bytes:
        """Hash of the model file (keys token caches)."""
        with open(self.path, "rb") as f:
            return hashlib.sha256(f.read()).digest()

    def save(self, dest: str) -> None:
        """Copies the model file to `dest` atomically."""
        shutil.copyfile(self.path, dest + ".tmp")
        os.replace(dest + ".tmp", dest)

    def encode(self, text: str) -> list[int]:
        """Encodes text to ids, without bos/eos.

        Args:
          text: any string; characters unseen in training become byte pieces.

        Returns:
          Token ids, [n].
        """
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts at once (SentencePiece's C++ batch path); same ids as `encode`."""
        return self._sp.encode(list(texts), out_type=int, num_threads=_TRAIN_THREADS)

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids to text; pad ids are dropped, bos/eos decode to nothing.

        Args:
          ids: token ids, [n] (a list or a 1-D integer array).

        Returns:
          The text. Decoding does not stop at eos.
        """
        # Ids past the tokenizer's vocabulary come from a model whose embedding is padded (to a
        # multiple of 128, say): they have no piece and decode to nothing.
        n = self.vocab_size
        return self._sp.decode([int(i) for i in ids if int(i) != self._pad and 0 <= int(i) < n])

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of one id (e.g. '▁the', '<0x0A>', '<s>')."""
        return self._sp.id_to_piece(int(token_id))

    def piece_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece (e.g. a reserved chat marker), or None if it has none."""
        token_id = self._sp.piece_to_id(piece)
        # SentencePiece answers the unk id for an unknown piece.
        if token_id == self._sp.unk_id() and piece != self._sp.id_to_piece(token_id):
            return None
        return token_id

    def check_model_vocab(self, model_vocab_size: int, where: str = "model.vocab_size") -> None:
        """Raises if token ids could index past a model's embedding table.

        A model vocabulary larger than the tokenizer's (padded, e.g. to a multiple of 128) is fine.

        Args:
          model_vocab_size: rows of the model's embedding / unembedding.
          where: how to name the model's setting in the error (a config key).
        """
        if self.vocab_size > model_vocab_size:
            raise ValueError(
                f"tokenizer {self.path!r} has {self.vocab_size} tokens but {where} is "
                f"{model_vocab_size}, so token ids would index past the embedding; "
                f"set {where} >= {self.vocab_size}"
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_jax.data.tokenizer",
        description="Train or try a SentencePiece tokenizer.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a tokenizer on .jsonl / .txt documents")
    train.add_argument("--input", nargs="+", required=True, help="files or globs")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="output .model path")
    train.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--reserve", nargs="*", default=[], help="pieces kept as single ids, e.g. chat markers"
    )
    encode = commands.add_parser("encode", help="print the ids and pieces of a text")
    encode.add_argument("--model", required=True)
    encode.add_argument("text")
    args = parser.parse_args(argv)

    if args.command == "train":
        # Imported here: data.py imports this module for the special ids.
        from rlhf_jax.data.lm_data import read_documents

        start = time.time()
        docs = read_documents(args.input)
        train_tokenizer(
            docs, args.out, args.vocab_size, args.model_type, args.seed, reserved=args.reserve
        )
        tok = Tokenizer.load(args.out)
        print(
            f"trained {args.model_type} tokenizer: vocab {tok.vocab_size} "
            f"(asked {args.vocab_size}) from {len(docs)} documents in "
            f"{time.time() - start:.1f}s -> {args.out}"
        )
    elif args.command == "encode":
        tok = Tokenizer.load(args.model)
        ids = tok.encode(args.text)
        print(f"ids ({len(ids)}): {ids}")
        print(f"pieces: {[tok.id_to_piece(i) for i in ids]}")
    else:
        raise ValueError(f"unknown command: {args.command!r}; expected one of ('train', 'encode')")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        # Bad input is one clear sentence, not a traceback.
        sys.exit(f"error: {e}")
