"""Demonstrations for SFT: `{"prompt", "response"}` JSONL -> LM batches with a response-only mask.

Prompts here are either strings (`{"prompt"}` rows) or conversations (`{"messages"}` rows, see
rlhf_jax/data/chat.py); a file may mix both. A single-turn example is tokenized as
    [bos] + encode(template.format(prompt=prompt)) + encode(response) + [eos]
(without [bos] where the model's tokenizer adds none, `add_bos`) and laid out unpacked, one
example per row, right-padded to `seq_len`, in the LM batch format of `data.py` ({"inputs",
"targets", "mask"} [N, L]). `mask` is 1 exactly on the targets that are
response tokens, including the EOS that ends the response, so the prompt never contributes to the
loss. An example longer than `seq_len + 1` tokens is cut at the right (its response loses its
tail and its EOS); how many were cut is reported in `info`, never silent.

A `messages` demonstration is tokenized by `chat.encode` and its mask covers every assistant
turn's content and EOS. Normalised, it is `{"messages", "prompt": the turns before its last
assistant turn, "response": that turn's content}`, so code that shows or scores (prompt, response)
pairs (eval samples, the RM's normalisation bias) handles both forms alike.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data import chat, iterators, lm_data, packing
from rlhf_jax.data.tokenizer import Tokenizer

DEMO_FIELDS = {"prompt": str, "response": str}
PROMPT_FIELDS = {"prompt": str}

# How a prompt is shown to the model when a config or checkpoint names no template.
PROMPT_TEMPLATE = "User: {prompt}\nAssistant: "


def read_records(path: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSONL file, for per-row checks."""
    records = lm_data.read_jsonl(path, {})
    with open(path, "rb") as f:  # read_jsonl skips blank lines; errors must name real lines
        lines = [i for i, raw in enumerate(f, start=1) if raw.decode("utf-8").strip()]
    return list(zip(lines, records, strict=True))


def _check_str(record: dict, name: str) -> str:
    if name not in record:
        raise ValueError(f"field {name!r} is missing")
    if not isinstance(record[name], str):
        raise ValueError(f"field {name!r} must be str, got {type(record[name]).__name__}")
    return record[name]


def row_prompt(record: dict) -> str | chat.Messages:
    """The prompt of a prompt or comparison row: its `prompt` string, or its `messages` context
    (which must end with a user turn). Errors omit the location."""
    if "messages" in record:
        if "prompt" in record:
            raise ValueError("the line has both 'prompt' and 'messages'; use one form per line")
        return chat.parse_messages(record["messages"], ends_with="user")
    return _check_str(record, "prompt")


def _demo(record: dict) -> dict:
    if "messages" not in record:
        _check_str(record, "prompt")
        _check_str(record, "response")
        return record
    both = [k for k in ("prompt", "response") if k in record]
    if both:
        raise ValueError(f"the line has both 'messages' and {both[0]!r}; use one form per line")
    messages = chat.parse_messages(record["messages"], ends_with="assistant")
    return {"messages": messages, "prompt": messages[:-1], "response": messages[-1][1]}


def read_demos(paths: str | Sequence[str]) -> list[dict]:
    """All demonstrations of the files or globs in `paths`, in either form.

    Returns:
      `{"prompt": str, "response": str, ...}` rows as written, and `{"messages", "prompt",
      "response"}` for messages rows (see the module docstring).

    Raises:
      ValueError: `"{path}:{lineno}: ..."` naming the field or turn that is wrong.
    """
    out = []
    for path in lm_data.expand_paths(paths):
        for lineno, record in read_records(path):
            try:
                out.append(_demo(record))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    return out


def format_prompt(template: str, prompt: str) -> str:
    """The model-facing prompt text; `template` is a format string with a `{prompt}` field."""
    if "{prompt}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{prompt}}' field")
    return template.replace("{prompt}", prompt)


def prompt_ids(tokenizer: Tokenizer, template: str, prompt: str | chat.Messages) -> list[int]:
    """[bos] + the formatted prompt: exactly the prefix SFT trained the response to follow.

    A string goes through `template`; a conversation through the tokenizer's chat template
    (its rendered turns plus the assistant marker).
    """
    if not isinstance(prompt, str):
        return chat.prompt_ids(prompt, tokenizer)
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    return bos + tokenizer.encode(format_prompt(template, prompt))


def response_ids(
    tokenizer: Tokenizer, template: str, prompt: str | chat.Messages, response: str
) -> list[int]:
    """The ids that follow `prompt_ids(prompt)` for `response`, ending with EOS.

    Encoded apart from the prompt (the boundary rule of data/hf_tokenizer.py): `encode(response)
    + [eos]`; under a model's own chat template, the template's rendering of the assistant turn.
    """
    if isinstance(prompt, str) or not chat.has_model_template(tokenizer):
        return tokenizer.encode(response) + [tokenizer.eos_id]
    full, _ = chat.encode((*prompt, ("assistant", response)), tokenizer)
    p = prompt_ids(tokenizer, template, prompt)
    if full[: len(p)] != p:
        raise ValueError(
            f"{tokenizer.model_template.where}: the chat template renders the prompt differently "
            "when an answer follows it, so the RM would not score what PPO samples"
        )
    return full[len(p) :]


def demo_ids(tokenizer: Tokenizer, template: str, demo: dict) -> tuple[list[int], list[int]]:
    """(ids, per-id 1 where the SFT loss covers it) of one normalised demonstration."""
    if "messages" in demo:
        return chat.encode(demo["messages"], tokenizer)
    p = prompt_ids(tokenizer, template, demo["prompt"])
    r = tokenizer.encode(demo["response"]) + [tokenizer.eos_id]
    return p + r, [0] * len(p) + [1] * len(r)


def encode_demos(
    demos: Sequence[dict], tokenizer: Tokenizer, template: str, seq_len: int, *, lengths=None
) -> tuple[dict[str, np.ndarray], int]:
    """Tokenizes demonstrations into LM examples with a response-only loss mask.

    For a conversation the mask covers every assistant turn (content and EOS), nothing else.
    `lengths`, a list, receives each example's number of real positions (for packing).

    Returns:
      ({"inputs": int32 [N, L], "targets": int32 [N, L], "mask": float32 [N, L]},
       number of examples cut to fit seq_len).
    """
    n, L = len(demos), seq_len
    inputs = np.full((n, L), tokenizer.pad_id, np.int32)
    targets = np.full((n, L), tokenizer.pad_id, np.int32)
    mask = np.zeros((n, L), np.float32)
    cut = 0
    for i, d in enumerate(demos):
        ids, train = demo_ids(tokenizer, template, d)
        p = train.index(1)  # tokens before the first one learned: the prompt
        if len(ids) > L + 1:
            cut += 1
            ids, train = ids[: L + 1], train[: L + 1]
        if p >= len(ids):
            raise ValueError(
                f"demonstration {i}: the prompt alone is {p} tokens, leaving no room for "
                f"the response within train.seq_len={L}"
            )
        m = len(ids) - 1
        inputs[i, :m] = ids[:-1]
        targets[i, :m] = ids[1:]
        # targets[t] = ids[t + 1], so target t is learned when id t + 1 is.
        mask[i, :m] = train[1:]
        if lengths is not None:
            lengths.append(m)
    return {"inputs": inputs, "targets": targets, "mask": mask}, cut


def encode_for_training(demos, tokenizer, template: str, seq_len: int, packed: bool, seed=0):
    """(examples, number cut, pad fraction): `encode_demos`' rows, packed into rows of
    `seq_len` with `segments` and `positions` (data/packing.py, in `seed`'s order) when
    `packed`."""
    lengths: list[int] = []
    ex, cut = encode_demos(demos, tokenizer, template, seq_len, lengths=lengths)
    if not packed:
        return ex, cut, packing.pad_fraction(lengths, seq_len)
    ex = packing.pack(ex, lengths, seq_len, seed=seed)
    return ex, cut, packing.pad_fraction(ex["segments"])


def encode_sequences(
    pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, template: str, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Full (prompt, response) sequences as the RM scores them, right-padded.

    Each is [bos] + template(prompt) + response + [eos], cut at the right to `seq_len`; a
    conversation prompt is rendered by the chat template, so the response is its final
    assistant turn.

    Returns:
      (tokens int32 [N, L], real-token mask bool [N, L]).
    """
    tokens = np.full((len(pairs), seq_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(pairs), seq_len), bool)
    for i, (prompt, response) in enumerate(pairs):
        ids = prompt_ids(tokenizer, template, prompt) + response_ids(
            tokenizer, template, prompt, response
        )
        ids = ids[:seq_len]
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = True
    return tokens, mask


def build_sft_data(
    train_paths,
    tokenizer: Tokenizer,
    *,
    template: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    eval_paths="",
    eval_fraction: float = 0.05,
    process_index: int = 0,
    process_count: int = 1,
    packed: bool = False,
):
    """Train iterator, eval batches, held-out prompts for sampling, and counts for logging.

    The held-out set is `eval_paths` when given, else a seeded `eval_fraction` split. `packed`:
    train and eval rows hold several demonstrations each (data/packing.py; the loss, summed over
    tokens, is unchanged); `batch_size` then counts packed rows.

    Returns:
      (train_iterator, eval_batch_list, eval_demos, info dict).
    """
    demos = read_demos(train_paths)
    if eval_paths:
        train_demos, eval_demos = demos, read_demos(eval_paths)
    else:
        train_demos, eval_demos = lm_data.split_documents(demos, eval_fraction, seed)
    encode = functools.partial(
        encode_for_training, tokenizer=tokenizer, template=template, seed=seed
    )
    train_ex, train_cut, pad = encode(train_demos, seq_len=seq_len, packed=packed)
    it = iterators.make_train_iterator(
        train_ex,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    evals, eval_cut = [], 0
    if eval_demos:
        eval_ex, eval_cut, _ = encode(eval_demos, seq_len=seq_len, packed=packed)
        evals = iterators.eval_batches(
            eval_ex,
            batch_size=batch_size,
            process_index=process_index,
            process_count=process_count,
        )
    info = {
        "train_demos": len(train_demos),
        "eval_demos": len(eval_demos),
        "cut_to_seq_len": train_cut + eval_cut,
        "response_tokens": int(train_ex["mask"].sum()),
        "train_rows": len(train_ex["inputs"]),
        "pad_fraction": round(pad, 4),
    }
    return it, evals, eval_demos, info


def read_prompt_lines(path: str) -> tuple[list[str | chat.Messages], list[int]]:
    """(prompts, their line numbers) of one `{"prompt"}` / `{"messages"}` JSONL file."""
    prompts, lines = [], []
    for lineno, record in read_records(path):
        try:
            prompts.append(row_prompt(record))
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        lines.append(lineno)
    return prompts, lines


def read_prompts(paths: str | Sequence[str]) -> list[str | chat.Messages]:
    """Prompts of `{"prompt": str}` or `{"messages": [... user turn]}` JSONL files (errors name
    file:line:field)."""
    out = []
    for path in lm_data.expand_paths(paths):
        out.extend(read_prompt_lines(path)[0])
    return out


def encode_prompts(
    prompts: Sequence[str | chat.Messages], tokenizer: Tokenizer, template: str, prompt_len: int
) -> tuple[dict[str, np.ndarray], int]:
    """Prompts as the policy sees them, left-padded to `prompt_len` for batched sampling.

    A longer prompt keeps its LAST `prompt_len` tokens (the end of a prompt, next to where the
    response starts, matters most); how many were cut is returned, never silent.

    Returns:
      ({"tokens": int32 [N, P], "mask": bool [N, P], "index": int32 [N]}, number cut).
    """
    n = len(prompts)
    tokens = np.full((n, prompt_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((n, prompt_len), bool)
    cut = 0
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(tokenizer, template, prompt)
        if len(ids) > prompt_len:
            cut += 1
            ids = ids[-prompt_len:]
        tokens[i, prompt_len - len(ids) :] = ids
        mask[i, prompt_len - len(ids) :] = True
    return {"tokens": tokens, "mask": mask, "index": np.arange(n, dtype=np.int32)}, cut
