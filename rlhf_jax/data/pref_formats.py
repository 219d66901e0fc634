"""Public preference data as it is published -> the project's comparison rows.

Released preference sets rarely come in the comparisons form of DESIGN.md section 4. This module
owns recognising, per row, the common published forms and turning each into a project row
(`{"prompt" | "messages", "chosen", "rejected"}` or `{..., "responses", "ranking"}`), which
rm_data.py then checks and encodes like any other; it also owns reading rows from JSONL or
Parquet. Rows already in the project's form pass through unchanged, so one file may mix forms.

Accepted forms (the field names are exact; other fields are ignored):
  * transcript pairs (Anthropic HH-RLHF): `{"chosen": str, "rejected": str}` and no `prompt` or
    `messages`, each a whole dialogue "\\n\\nHuman: ...\\n\\nAssistant: ...". Each is split at its
    LAST "\\n\\nAssistant:" turn: the text after it is the response, the turns before it (Human ->
    user, Assistant -> assistant, contents stripped) are the prompt conversation, which must be
    the same in both.
  * message-list pairs (UltraFeedback-binarized, TRL's conversational form): `chosen` and
    `rejected` lists of `{"role", "content"}` whose last message is the assistant's answer; the
    messages before it are the prompt and must be the same in both. A `prompt` list of messages
    beside them is the context they continue (unless they already start with it); a `prompt`
    string beside lists that start with the user turn is informational and unused, and beside
    lists holding only the answer it is the user turn.
  * scored K-way: `{"prompt" | "messages", "responses": [str, ...], "scores": [number, ...]}`;
    a higher score is better and equal scores are tied (equal rank).
  * UltraFeedback completions: `{"instruction": str, "completions": [{"response": str,
    "overall_score": number}, ...]}` (or `prompt` / `messages` in place of `instruction`), read as
    scored K-way.
  A string prompt of these two published forms is the user's turn of a chat: it becomes a
  one-turn `messages` conversation, rendered with the model's chat template as the message forms
  are (as a plain `prompt` it would be rendered with `data.prompt_template` instead, silently
  unlike the chats the published responses answer).
In every form a `prompt` may also be a list of messages, read as a `messages` conversation, or a
transcript ending with "\\n\\nAssistant:" (HH-RLHF copies split into `prompt`, `chosen`,
`rejected`), read as its turns, with string answers stripped as split-off answers are.
A scored row whose scores are all equal becomes a ranking that ties every response; the reader
skips and counts it like any all-tie row (rm_data.read_comparisons).

Rows are numbered like lines: the line number in a JSONL file, the row number counting from 1 in
a Parquet file (`.parquet` / `.pq`), so an error reads `"{path}:{n}: field 'chosen' ..."`. A null
in a Parquet column means the row has no such field (a column spans every row of the file).
"""

from __future__ import annotations

import math
import os
import re

from rlhf_jax.data import chat
from rlhf_jax.data.sft_data import read_records

PARQUET_EXTENSIONS = (".parquet", ".pq")
_ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}
FORMS = ("project", "transcript", "message_pairs", "scored", "completions")


# --- reading rows ---------------------------------------------------------------------------------


def read_rows(path: str) -> list[tuple[int, dict]]:
    """(row number, object) of every row of a JSONL or Parquet file, chosen by extension.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: `"{path}:{n}: ..."` for a malformed JSONL line, `"{path}: ..."` for a file
        pyarrow cannot read as Parquet.
    """
    if os.path.splitext(path)[1].lower() not in PARQUET_EXTENSIONS:
        return read_records(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    try:
        import pyarrow.parquet as pq  # only Parquet needs it
    except ImportError:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    rows = []
    try:
        for batch in pq.ParquetFile(path).iter_batches():
            # A null is a row without that field: columns span every row of a file.
            rows.extend({k: v for k, v in r.items() if v is not None} for r in batch.to_pylist())
    except Exception as e:  # pyarrow raises its own error types for a bad file
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    return list(enumerate(rows, start=1))


# --- recognising a row ----------------------------------------------------------------------------


def _looks_like_transcript(text) -> bool:
    return isinstance(text, str) and bool(re.search(r"(^|\n\n)(Human|Assistant):", text))


def detect_form(record: dict) -> str:
    """Which of `FORMS` a row is in; "project" for rows rm_data reads as they are."""
    if "completions" in record:
        return "completions"
    if "scores" in record:
        return "scored"
    pair = [record.get(k) for k in ("chosen", "rejected")]
    if any(isinstance(v, list) for v in pair):
        return "message_pairs"
    if "prompt" not in record and "messages" not in record and _looks_like_transcript(pair[0]):
        return "transcript"
    return "project"


def to_comparison(record: dict) -> dict:
    """One row of any accepted form -> a project comparison row (see the module docstring).

    Returns:
      `{"prompt": str | "messages": [...], "chosen": str, "rejected": str}` for pairs,
      `{"prompt" | "messages", "responses": [str] * K, "ranking": [...]}` for scored rows, or the
      row itself (a list `prompt` moved to `messages`) when it is in the project's form.

    Raises:
      ValueError: one sentence naming the field, without the location (callers prefix it).
    """
    if _is_transcript_prompt(record):
        record = _transcript_prompt(record)
    form = detect_form(record)
    if form == "transcript":
        return _transcript_pair(record)
    if form == "message_pairs":
        return _message_pair(record)
    if form == "scored":
        return _scored(record)
    if form == "completions":
        return _completions(record)
    if isinstance(record.get("prompt"), list) and "messages" not in record:
        rest = {k: v for k, v in record.items() if k != "prompt"}
        return {**rest, **_prompt_fields(record)}
    return record


# --- pairs ----------------------------------------------------------------------------------------


def _field(record: dict, key: str, typ: type, what: str):
    if key not in record:
        raise ValueError(f"field {key!r} is missing")
    value = record[key]
    if not isinstance(value, typ):
        raise ValueError(f"field {key!r} must be {what}, got {type(value).__name__}")
    return value


def _as_messages(turns: list[tuple[str, str]], key: str) -> chat.Messages:
    """The turns before a response, checked as a prompt conversation (ending with a user turn)."""
    try:
        return chat.parse_messages(chat.to_json(tuple(turns)), ends_with="user")
    except ValueError as e:
        raise ValueError(f"field {key!r}, the turns before its answer: {e}") from None


def _transcript_turns(prefix: str, key: str) -> chat.Messages:
    """The Human/Assistant turns of a transcript's text before its answer, as a prompt."""
    parts = _TURN.split(prefix)  # ["", role, content, role, content, ...]
    if parts[0].strip():
        raise ValueError(f"field {key!r} has text before its first 'Human:' turn")
    pairs = zip(parts[1::2], parts[2::2], strict=True)
    turns = [(_TRANSCRIPT_ROLES[role], content.strip()) for role, content in pairs]
    if not turns:
        raise ValueError(f"field {key!r} has no 'Human:' turn before its last 'Assistant:' turn")
    return _as_messages(turns, key)


def _split_transcript(text: str, key: str) -> tuple[chat.Messages, str]:
    text = "\n\n" + text.lstrip("\n")  # some copies drop the leading blank line
    cut = text.rfind(_ASSISTANT)
    if cut < 0:
        raise ValueError(f"field {key!r} has no '\\n\\nAssistant:' turn to take as the response")
    return _transcript_turns(text[:cut], key), text[cut + len(_ASSISTANT) :].strip()


def _is_transcript_prompt(record: dict) -> bool:
    prompt = record.get("prompt")
    return (
        "messages" not in record
        and _looks_like_transcript(prompt)
        and prompt.rstrip().endswith("Assistant:")
    )


def _transcript_prompt(record: dict) -> dict:
    """A transcript `prompt` ending with "Assistant:" -> `messages`; string answers stripped, as
    the answers split off whole transcripts are."""
    prompt, _ = _split_transcript(record["prompt"], "prompt")
    out = {k: v for k, v in record.items() if k != "prompt"}
    for key in ("chosen", "rejected"):
        if isinstance(out.get(key), str):
            out[key] = out[key].strip()
    if isinstance(out.get("responses"), list):
        out["responses"] = [r.strip() if isinstance(r, str) else r for r in out["responses"]]
    return {**out, "messages": chat.to_json(prompt)}


def _same_prompt(chosen: chat.Messages, rejected: chat.Messages) -> None:
    if chosen != rejected:
        turn = next(
            (i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b),
            min(len(chosen), len(rejected)),
        )
        raise ValueError(
            "field 'rejected' does not share the prompt of 'chosen': the turns before their "
            f"answers differ from turn {turn} on"
        )


def _transcript_pair(record: dict) -> dict:
    what = "str (a Human/Assistant transcript, like 'chosen')"
    prompt, chosen = _split_transcript(_field(record, "chosen", str, what), "chosen")
    other, rejected = _split_transcript(_field(record, "rejected", str, what), "rejected")
    _same_prompt(prompt, other)
    return {"messages": chat.to_json(prompt), "chosen": chosen, "rejected": rejected}


def _message_list(record: dict, key: str) -> list[tuple[str, str]]:
    value = _field(record, key, list, "a list of {role, content} messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"field {key!r} entry {i} is not an object with 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise ValueError(
                f"field {key!r} entry {i} content must be str, got {type(m['content']).__name__}"
            )
        out.append((m["role"], m["content"]))
    return out


def _message_pair(record: dict) -> dict:
    prompt = record.get("prompt")
    context = _message_list(record, "prompt") if isinstance(prompt, list) else []
    out = {}
    prompts = []
    for key in ("chosen", "rejected"):
        turns = _message_list(record, key)
        if context and turns[: len(context)] != context:
            turns = context + turns  # the answer alone, continuing the given prompt
        elif isinstance(prompt, str) and turns and turns[0][0] == "assistant":
            turns = [("user", prompt), *turns]
        if not turns or turns[-1][0] != "assistant":
            last = f"a {turns[-1][0]!r} message" if turns else "empty"
            raise ValueError(f"field {key!r} must end with the assistant's answer, but is {last}")
        if len(turns) < 2:
            raise ValueError(
                f"field {key!r} has no user turn before its answer, and no 'prompt' to take as one"
            )
        prompts.append(_as_messages(turns[:-1], key))
        out[key] = turns[-1][1]
    _same_prompt(*prompts)
    return {"messages": chat.to_json(prompts[0]), **out}


# --- scored K-way ---------------------------------------------------------------------------------


def ranking_from_scores(scores: list[float]) -> list:
    """Scores (higher is better) -> a ranking best first, equal scores as one tied list entry.

    E.g. `[1.0, 3.0, 1.0, 2.5]` -> `[1, 3, [0, 2]]`.
    """
    ranking = []
    for value in sorted(set(scores), reverse=True):
        group = [i for i, s in enumerate(scores) if s == value]
        ranking.append(group[0] if len(group) == 1 else group)
    return ranking


def _check_score(s, where: str) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        raise ValueError(f"{where} is {s!r}, not a finite number")
    return s


def _list_prompt(record: dict, key: str) -> dict:
    return {"messages": chat.to_json(tuple(_message_list(record, key)))}


def _prompt_fields(record: dict, fallback: str | None = None, chat_turn: bool = False) -> dict:
    """The prompt of a row as project fields: `prompt` (a list becomes `messages`), `messages`,
    or the `fallback` field as the prompt string; with `chat_turn` a string prompt becomes a
    one-turn user conversation. rm_data checks and names what is wrong."""
    if isinstance(record.get("prompt"), list) and "messages" not in record:
        return _list_prompt(record, "prompt")
    fields = {k: record[k] for k in ("prompt", "messages") if k in record}
    if not fields and fallback:
        fields = {"prompt": _field(record, fallback, str, "str")}
    if chat_turn and isinstance(fields.get("prompt"), str) and "messages" not in fields:
        fields = {"messages": chat.to_json((("user", fields["prompt"]),))}
    return fields


def _scored(record: dict) -> dict:
    if "ranking" in record:
        raise ValueError("the line has both 'ranking' and 'scores'; use one form per line")
    responses = _field(record, "responses", list, "a list of strings")
    scores = _field(record, "scores", list, "a list of numbers")
    for i, score in enumerate(scores):
        _check_score(score, f"field 'scores' entry {i}")
    if len(scores) != len(responses):
        raise ValueError(
            f"field 'scores' has {len(scores)} score(s) for {len(responses)} responses"
        )
    ranking = ranking_from_scores(scores)
    prompt = _prompt_fields(record, chat_turn=True)
    return {**prompt, "responses": responses, "ranking": ranking}


def _completions(record: dict) -> dict:
    items = _field(record, "completions", list, "a list of {response, overall_score} objects")
    responses, scores = [], []
    for i, c in enumerate(items):
        if not isinstance(c, dict) or not isinstance(c.get("response"), str):
            raise ValueError(f"field 'completions' entry {i} has no 'response' string")
        if "overall_score" not in c:
            raise ValueError(f"field 'completions' entry {i} has no 'overall_score'")
        responses.append(c["response"])
        scores.append(_check_score(c["overall_score"], f"field 'completions' entry {i} score"))
    ranking = ranking_from_scores(scores)
    prompt = _prompt_fields(record, "instruction", chat_turn=True)
    return {**prompt, "responses": responses, "ranking": ranking}


# --- writing --------------------------------------------------------------------------------------


def comparison_row(comp: dict) -> dict:
    """A normalised comparison (rm_data.read_comparisons) -> its project JSONL row.

    K = 2 is written as `{"prompt" | "messages", "chosen", "rejected"}`; larger K as
    `{..., "responses", "ranking"}` with tied responses as one list entry of the ranking.
    """
    record = chat.prompt_record(comp["prompt"])
    responses, ranks = comp["responses"], comp["ranks"]
    if len(responses) == 2 and sorted(ranks) == [0, 1]:
        best = ranks.index(0)
        return {**record, "chosen": responses[best], "rejected": responses[1 - best]}
    # Dense ranks, best first: negated ranks are scores with the same ties.
    return {**record, "responses": responses, "ranking": ranking_from_scores([-r for r in ranks])}
