"""Dialogue data: the `messages` row format, the chat template, and its token encoding.

ChatGPT's data differs from InstructGPT's mainly by being conversations. Every data file that
holds prompts accepts, beside its single-turn form, a `messages` form (DESIGN.md §4):

    demos:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
                  ending with the assistant turn being demonstrated
    comparisons:  {"messages": [... ending with a user turn], "responses": [...], "ranking": [...]}
                  or {"messages": [...], "chosen": str, "rejected": str}
    prompts:      {"messages": [... ending with a user turn]}

A conversation is an optional system turn, then user and assistant turns alternating, starting
with a user turn. In memory it is `Messages`, a tuple of (role, content) pairs: hashable, so the
RM's split by prompt and every other "distinct prompts" count work on it unchanged.

The template (`ChatTemplate`, from `config.chat`) renders each turn as its role marker followed
by its content, e.g.

    [bos] <|user|> what is 7 plus 5? <|assistant|> 7 plus 5 is 12. [eos] <|user|> and plus 3?
    <|assistant|> 12 plus 3 is 15. [eos]

The markers are RESERVED pieces of the tokenizer (the pretrain stage trains its tokenizer with
them as user-defined symbols), so each is exactly one id and is inserted by id, never spelled.

How an assistant turn ends: with the tokenizer's EOS, after every assistant turn (as LLaMA-2's
chat format does). EOS IS the end-of-turn marker, so everything downstream of a prompt is
unchanged: the sampler stops at EOS, PPO's finished / no-EOS handling, the RM's read-out at the
last token (the EOS) and `decode` (which drops EOS) treat a chat response exactly like a
single-turn one. A separate `<|end|>` token would need a second stop id in the sampler and would
decode into every response text. The SFT loss covers every assistant turn's content and its EOS,
and nothing else. A generation prompt is the rendered context plus the assistant marker.

A model that comes with its own chat template (a Hugging Face tokenizer's `chat_template`) is
rendered with that instead, as transformers renders it: see rlhf_jax/data/chat_template.py.
`encode` and `prompt_ids` choose, so every stage sees one format per tokenizer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

ROLES = ("system", "user", "assistant")

# ((role, content), ...): one conversation, validated by `parse_messages`.
Messages = tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Role markers of the chat format; each must be one piece of the tokenizer."""

    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"

    def marker(self, role: str) -> str:
        return getattr(self, role)

    @property
    def markers(self) -> tuple[str, ...]:
        return tuple(self.marker(r) for r in ROLES)


DEFAULT = ChatTemplate()


def from_config(config) -> ChatTemplate:
    """The template of a run's config (a ConfigDict, or the dict stored in checkpoint meta).

    A config without a `chat` block (one written before dialogue support) gets `DEFAULT`.
    """
    c = config.get("chat") if config is not None else None
    if not c:
        return DEFAULT
    return ChatTemplate(system=c["system"], user=c["user"], assistant=c["assistant"])


def reserved_tokens(config) -> tuple[str, ...]:
    """The pieces a tokenizer trained for this run reserves: the chat markers, unless
    `config.chat.reserve_tokens` is False (which gives the tokenizer of single-turn-only runs)."""
    c = config.get("chat") if config is not None else None
    if c is not None and not c.get("reserve_tokens", True):
        return ()
    return from_config(config).markers


def template_of(tokenizer) -> ChatTemplate:
    """The template bound to a tokenizer (`Tokenizer.load(..., chat_template=)`), else DEFAULT."""
    return getattr(tokenizer, "chat_template", None) or DEFAULT


# --- rows -----------------------------------------------------------------------------------------


def parse_messages(value, ends_with: str) -> Messages:
    """Checks a row's `messages` field and returns it as `Messages`.

    Args:
      value: the JSON value of the field.
      ends_with: "assistant" (a demonstration: its last turn is the response to learn) or "user"
        (a prompt or a comparison's context: the model answers its last turn).

    Returns:
      ((role, content), ...).

    Raises:
      ValueError: one sentence, without the file location (callers prefix "path:line: ").
    """
    if not isinstance(value, list) or not value:
        raise ValueError("field 'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] is not an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"messages[{i}] has unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}] content must be str, got {type(content).__name__}")
        if role == "system" and i > 0:
            raise ValueError(f"messages[{i}] is a system turn; a system turn may only come first")
        out.append((role, content))
    # After an optional system turn, user and assistant alternate, starting with user.
    turns = out[1:] if out[0][0] == "system" else out
    for j, (role, _) in enumerate(turns):
        want = ("user", "assistant")[j % 2]
        if role != want:
            i = j + len(out) - len(turns)
            raise ValueError(
                f"messages[{i}] is {_a(role)} turn where {_a(want)} turn is due; after an "
                "optional system turn, user and assistant turns alternate, starting with user"
            )
    if ends_with == "assistant" and not any(r == "assistant" for r, _ in out):
        raise ValueError("the demonstration's messages have no assistant turn to learn from")
    if out[-1][0] != ends_with:
        what = "a demonstration" if ends_with == "assistant" else "a prompt"
        raise ValueError(
            f"{what}'s messages must end with {_a(ends_with)} turn, but the last turn is "
            f"{_a(out[-1][0])} turn"
        )
    return tuple(out)


def _a(role: str) -> str:
    return ("an " if role == "assistant" else "a ") + role


def to_json(messages: Messages) -> list[dict]:
    """Messages -> the JSONL field value `[{"role", "content"}, ...]`."""
    return [{"role": r, "content": c} for r, c in messages]


def prompt_record(prompt: str | Messages) -> dict:
    """The JSONL fields that name a prompt: `{"prompt": str}` or `{"messages": [...]}`."""
    return {"prompt": prompt} if isinstance(prompt, str) else {"messages": to_json(prompt)}


# --- rendering and encoding -----------------------------------------------------------------------


class Piece(NamedTuple):
    """One piece of a rendered conversation."""

    kind: str  # "marker" (one reserved id), "text" (encoded) or "eos" (the tokenizer's EOS)
    text: str
    train: bool  # assistant content or the EOS ending it: the SFT loss covers it


def render(
    messages: Messages, template: ChatTemplate = DEFAULT, generation_prompt: bool = False
) -> list[Piece]:
    """The pieces of a conversation; with `generation_prompt`, the assistant marker follows.

    Args:
      messages: the conversation.
      template: the role markers.
      generation_prompt: append the assistant marker the model's answer follows.

    Returns:
      Pieces in order; `"".join(p.text for p in pieces)` is the rendered text (EOS as "").
    """
    pieces = []
    for role, content in messages:
        assistant = role == "assistant"
        pieces.append(Piece("marker", template.marker(role), False))
        pieces.append(Piece("text", content, assistant))
        if assistant:
            pieces.append(Piece("eos", "", True))
    if generation_prompt:
        pieces.append(Piece("marker", template.assistant, False))
    return pieces


def marker_id(tokenizer, marker: str) -> int:
    """The id of a reserved marker piece; a clear error when the tokenizer lacks it."""
    token_id = tokenizer.piece_id(marker)
    if token_id is None:
        role = next((r for r in ROLES if template_of(tokenizer).marker(r) == marker), "user")
        raise ValueError(
            f"tokenizer {tokenizer.path!r} has no id for {marker!r}, so it cannot encode "
            f"`messages` rows; train it with the chat tokens reserved (the pretrain stage does "
            f"unless config.chat.reserve_tokens=False), set config.chat.{role} to a piece it has, "
            "or use a model whose tokenizer has its own chat_template"
        )
    return token_id


def encode(
    messages: Messages, tokenizer, generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and, per id, whether the SFT loss covers it.

    A tokenizer with its own chat template (`tokenizer.model_template`) renders with it
    (`chat_template.encode`); the rest of this docstring is the project's template.

    Pieces are encoded one by one, so the ids of a context are exactly a prefix of the ids of
    any longer conversation that starts with it (generation prompts match training).

    Args:
      messages: the conversation.
      tokenizer: a `Tokenizer`; its bound template (`template_of`) gives the markers.
      generation_prompt: append the assistant marker.

    Returns:
      (ids [n] = [bos] + pieces, train [n] with 1 on assistant content and its EOS, else 0).
    """
    if has_model_template(tokenizer):
        from rlhf_jax.data import chat_template  # jinja2 only for models with a template

        return chat_template.encode(messages, tokenizer, generation_prompt)
    template = template_of(tokenizer)
    ids = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", True) else []
    train = [0] * len(ids)
    for piece in render(messages, template, generation_prompt):
        if piece.kind == "marker":
            x = [marker_id(tokenizer, piece.text)]
        elif piece.kind == "eos":
            x = [tokenizer.eos_id]
        else:
            x = tokenizer.encode(piece.text)
        ids += x
        train += [int(piece.train)] * len(x)
    return ids, train


def has_model_template(tokenizer) -> bool:
    """Whether `messages` rows are rendered with the model's own template."""
    return getattr(tokenizer, "model_template", None) is not None


def prompt_ids(messages: Messages, tokenizer) -> list[int]:
    """[bos] + the rendered context + the assistant marker: what the model answers."""
    return encode(messages, tokenizer, generation_prompt=True)[0]


def parse_rendered(text: str, template: ChatTemplate = DEFAULT) -> Messages:
    """The conversation in a decoded prompt (BOS/EOS decode to nothing; markers to their text).

    A trailing empty assistant turn (the generation prompt) is dropped. Used where only the
    decoded text is at hand, e.g. a `module:function` PPO reward.
    """
    by_marker = {template.marker(r): r for r in ROLES}
    parts = re.split("(" + "|".join(map(re.escape, by_marker)) + ")", text)
    if parts[0].strip():
        raise ValueError(f"text {text[:40]!r}... does not start with a chat role marker")
    out = [(by_marker[m], c) for m, c in zip(parts[1::2], parts[2::2], strict=True)]
    if out and out[-1] == ("assistant", ""):
        out.pop()
    return tuple(out)
