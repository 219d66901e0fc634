"""Hugging Face `tokenizer.json` models (GPT-2, LLaMA 3, Qwen2/2.5/3) behind the stages' interface.

This module and data/tokenizer.py are the only ones that import a tokenizer library (here the
`tokenizers` package). `HFTokenizer` answers what `tokenizer.Tokenizer` answers (`encode`,
`encode_batch`, `decode`, `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `piece_id`, `id_to_piece`,
`check_model_vocab`, `path`, `chat_template`), plus what a foreign model needs:

- `eos_ids`: every id that ends a response (LLaMA 3 Instruct stops at `<|eot_id|>` and
  `<|end_of_text|>`); the sampler stops at any of them. `eos_id` is the one the stages append to a
  single-turn response: `eos_token` of tokenizer_config.json / special_tokens_map.json, else the
  first `eos_token_id` of generation_config.json / config.json. The others come from those files.
- `add_bos`: whether a document or prompt starts with `bos_id`, as the model's own tokenizer does
  (LLaMA 3's post-processor adds `<|begin_of_text|>`; GPT-2's and Qwen's add nothing);
  `add_bos_token` in tokenizer_config.json overrides. Without a bos token `bos_id` is the eos id,
  used only to fill dummy rows.
- `has_pad`: the model names a pad token (`pad_token`, or `pad_token_id` in generation_config.json
  / config.json). Without one the stages pad with `eos_id`. Padding never reaches a loss or a
  score: every batch carries its own mask (loss, real-token and response masks come from lengths,
  never from comparing ids with the pad id), so the pad id only has to be a valid id.
- `model_template`: the model's own chat template (`chat_template.jinja`, or `chat_template` in
  tokenizer_config.json), compiled by data/chat_template.py; `messages` rows are rendered with it.

The prompt/response boundary (both backends, every stage): the prompt and the response are
encoded SEPARATELY and their ids joined, `prompt_ids(prompt) + encode(response) + [eos]`. SFT's
training sequences, the RM's, PPO's prompts (the sampler continues them, and its sampled ids are
scored as sampled) and the likelihood and best-of-K tools all build sequences this way, so the
prompt ids a response was trained after are exactly the ids PPO samples after. For byte-level BPE
this is not always `encode(prompt_text + response_text)`: a merge across the boundary (GPT-2 turns
`"Assistant: " + "Hi"` into `... "Assistant", ":", "ĠHi"` when encoded whole, `..., ":", "Ġ",
"Hi"` when split) is never made. Decoding is unchanged: `decode(ids) == prompt_text +
response_text`, since these tokenizers have no normalizer and add no prefix space. A model's chat
template is cut the same way, at the start of each assistant turn (data/chat_template.py).

Ids are `encode(text)` without special tokens added; special-token text inside `text` (e.g. a
template's `<|im_start|>`) is matched as that token, as transformers' tokenizer does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence

import tokenizers

# Files of a Hugging Face tokenizer directory the stages read (and copy into a workdir).
TOKENIZER_JSON = "tokenizer.json"
FILES = (
    TOKENIZER_JSON,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
CONFIG_JSON = "config.json"  # the model's config: its token ids count when the others lack them


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _token_text(value, where: str) -> str | None:
    """A token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where} must be a token string or {{'content': ...}}, got {value!r}")


def _ids(value, where: str) -> list[int]:
    """A `*_token_id` field: an int, a list of ints, or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{where} must be a token id or a list of them, got {value!r}")
    return values


class HFTokenizer:
    """A Hugging Face tokenizer directory, loaded with the `tokenizers` library.

    Attributes:
      path: the directory the files were read from.
      chat_template: the project's `chat.ChatTemplate` bound by the stage (used only when the
        model has no template of its own).
      model_template: the model's own chat template (`chat_template.ModelTemplate`) or None.
      eos_ids: every id that ends a response, `eos_id` first.
      add_bos: whether documents and prompts start with `bos_id`.
      has_pad: whether the model names a pad token (else `pad_id` is `eos_id`).
    """

    WORKDIR_NAME = "tokenizer"  # a stage workdir keeps its copy as this directory

    def __init__(self, tok: tokenizers.Tokenizer, path: str, chat_template=None):
        self._tok = tok
        self.path = path
        self.chat_template = chat_template
        files = {name: os.path.join(path, name) for name in (*FILES, CONFIG_JSON)}
        cfg = _read_json(files["tokenizer_config.json"])
        special = _read_json(files["special_tokens_map.json"])
        gen = _read_json(files["generation_config.json"])
        model = _read_json(files[CONFIG_JSON])

        def token(key: str) -> tuple[str | None, int | None]:
            """(text, id) of a special token named in tokenizer_config / special_tokens_map."""
            for name, source in (
                ("tokenizer_config.json", cfg),
                ("special_tokens_map.json", special),
            ):
                text = _token_text(source.get(key), f"{files[name]}: {key}")
                if text is not None:
                    token_id = tok.token_to_id(text)
                    if token_id is None:
                        raise ValueError(
                            f"{files[name]}: {key} {text!r} is not a token of "
                            f"{files[TOKENIZER_JSON]}"
                        )
                    return text, token_id
            return None, None

        def ids(key: str) -> list[int]:
            out = []
            for name, source in (("generation_config.json", gen), (CONFIG_JSON, model)):
                out += _ids(source.get(key), f"{files[name]}: {key}")
            return out

        self.special_tokens = {}  # template variables: bos_token, eos_token, ... (as transformers)
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text, _ = token(key)
            if text is not None:
                self.special_tokens[key] = text
        eos_text, eos = token("eos_token")
        eos_ids = ([eos] if eos is not None else []) + ids("eos_token_id")
        if not eos_ids:
            raise ValueError(
                f"tokenizer {path!r} names no eos token (eos_token in tokenizer_config.json, "
                "eos_token_id in generation_config.json or config.json); one is needed to end "
                "responses"
            )
        self.eos_ids = tuple(dict.fromkeys(eos_ids))
        _, bos = token("bos_token")
        bos = bos if bos is not None else next(iter(ids("bos_token_id")), None)
        _, pad = token("pad_token")
        pad = pad if pad is not None else next(iter(ids("pad_token_id")), None)
        self._eos, self._bos, self._pad = self.eos_ids[0], bos, pad
        self.has_pad = pad is not None
        add_bos = cfg.get("add_bos_token")
        if not isinstance(add_bos, bool):  # what the model's own post-processor does
            added = tok.encode("a", add_special_tokens=True).ids
            plain = tok.encode("a", add_special_tokens=False).ids
            add_bos = bos is not None and added[:1] == [bos] and plain[:1] != [bos]
        self.add_bos = bool(add_bos) and bos is not None
        n = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        self._vocab_size = max(n, tok.get_vocab_size(with_added_tokens=True))
        for name, i in (
            ("eos", self._eos),
            ("bos", bos),
            ("pad", pad),
            *(("eos", e) for e in eos_ids),
        ):
            if i is not None and not 0 <= i < self._vocab_size:
                raise ValueError(
                    f"tokenizer {path!r}: {name} id {i} is outside its {self._vocab_size} tokens"
                )
        self._skip = {i for i in (*self.eos_ids, bos, self.pad_id) if i is not None}
        self.model_template = None
        source, where = _template_source(files, cfg)
        if source is not None:
            from rlhf_jax.data import chat_template  # jinja2 only for models with a template

            self.model_template = chat_template.ModelTemplate(source, where, self.special_tokens)

    @classmethod
    def load(cls, path: str, chat_template=None) -> HFTokenizer:
        """Loads a Hugging Face tokenizer: a directory holding tokenizer.json, or that file.

        Raises:
          FileNotFoundError / ValueError: one line naming the file (and key) that is wrong.
        """
        path = os.fspath(path)
        directory = os.path.dirname(path) if os.path.basename(path) == TOKENIZER_JSON else path
        file = os.path.join(directory, TOKENIZER_JSON)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"tokenizer {file!r} does not exist")
        try:
            tok = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{file} is not a valid tokenizer.json ({e})") from None
        return cls(tok, directory, chat_template)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (ids are 0..vocab_size-1)."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        return self._pad if self._pad is not None else self._eos

    @property
    def bos_id(self) -> int:
        return self._bos if self._bos is not None else self._eos

    @property
    def eos_id(self) -> int:
        return self._eos

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without added bos/eos, [n]."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids [n], (start, end) character span of each id in `text`)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of many texts (the library's parallel batch path); the same ids."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; pad, bos and eos ids decode to nothing, other special tokens to their text.

        Ids past the vocabulary (a model's padded embedding) decode to nothing. Decoding does not
        stop at eos.
        """
        n = self._vocab_size
        keep = [int(i) for i in ids if int(i) not in self._skip and 0 <= int(i) < n]
        return self._tok.decode(keep, skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id))

    def piece_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def fingerprint(self) -> bytes:
        """Hash of the files that decide the ids (keys token caches)."""
        h = hashlib.sha256()
        for name in FILES:
            file = os.path.join(self.path, name)
            if os.path.isfile(file):
                with open(file, "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
        return h.digest()

    def save(self, dest: str) -> None:
        """Copies the tokenizer's files (and the model's token ids) into directory `dest`, whole
        or not at all (written beside it, then renamed)."""
        tmp = dest + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name in (*FILES, CONFIG_JSON):
            file = os.path.join(self.path, name)
            if not os.path.isfile(file):
                continue
            if name == CONFIG_JSON:  # only its token ids: a workdir's tokenizer is not a model
                model = _read_json(file)
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump({k: v for k, v in model.items() if k.endswith("_token_id")}, f)
            else:
                shutil.copyfile(file, os.path.join(tmp, name))
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)

    def check_model_vocab(self, model_vocab_size: int, where: str = "model.vocab_size") -> None:
        """Raises if token ids could index past a model's embedding table (padded is fine)."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(
                f"tokenizer {self.path!r} has {self.vocab_size} tokens but {where} is "
                f"{model_vocab_size}, so token ids would index past the embedding; "
                f"set {where} >= {self.vocab_size}"
            )


def _template_source(files: dict, cfg: dict) -> tuple[str | None, str]:
    """The model's chat template and where it was read (for errors), or (None, "")."""
    jinja = files["chat_template.jinja"]
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read(), jinja
    where = f"{files['tokenizer_config.json']}: chat_template"
    value = cfg.get("chat_template")
    if value is None or isinstance(value, str):
        return value, where
    if isinstance(value, list):  # named templates [{"name", "template"}, ...]: the default one
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"], where + "[default]"
    raise ValueError(f"{where} must be a template string or a list with a 'default' template")
