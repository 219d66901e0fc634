"""Demonstrations for SFT: `{"prompt", "response"}` JSONL -> LM batches with a response-only mask.

An example is tokenized as
    [bos] + encode(template.format(prompt=prompt)) + encode(response) + [eos]
and laid out unpacked, one example per row, right-padded to `seq_len`, in the LM batch format of
`data.py` ({"inputs", "targets", "mask"} [N, L]). `mask` is 1 exactly on the targets that are
response tokens, including the EOS that ends the response, so the prompt never contributes to the
loss. An example longer than `seq_len + 1` tokens is cut at the right (its response loses its
tail and its EOS); how many were cut is reported in `info`, never silent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlhf_jax import data
from rlhf_jax.tokenizer import Tokenizer

DEMO_FIELDS = {"prompt": str, "response": str}
PROMPT_FIELDS = {"prompt": str}


def read_demos(paths: str | Sequence[str]) -> list[dict]:
    """All demonstrations of the files or globs in `paths` (errors name file:line:field)."""
    out = []
    for path in data.expand_paths(paths):
        out.extend(data.read_jsonl(path, DEMO_FIELDS))
    return out


def format_prompt(template: str, prompt: str) -> str:
    """The model-facing prompt text; `template` is a format string with a `{prompt}` field."""
    if "{prompt}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{prompt}}' field")
    return template.replace("{prompt}", prompt)


def prompt_ids(tokenizer: Tokenizer, template: str, prompt: str) -> list[int]:
    """[bos] + the formatted prompt: exactly the prefix SFT trained the response to follow."""
    return [tokenizer.bos_id] + tokenizer.encode(format_prompt(template, prompt))


def encode_demos(
    demos: Sequence[dict], tokenizer: Tokenizer, template: str, seq_len: int
) -> tuple[dict[str, np.ndarray], int]:
    """Tokenizes demonstrations into LM examples with a response-only loss mask.

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
        p = prompt_ids(tokenizer, template, d["prompt"])
        r = tokenizer.encode(d["response"]) + [tokenizer.eos_id]
        ids = p + r
        if len(ids) > L + 1:
            cut += 1
            ids = ids[: L + 1]
        if len(p) >= len(ids):
            raise ValueError(
                f"demonstration {i}: the prompt alone is {len(p)} tokens, leaving no room for "
                f"the response within train.seq_len={L}"
            )
        m = len(ids) - 1
        inputs[i, :m] = ids[:-1]
        targets[i, :m] = ids[1:]
        # targets[t] = ids[t + 1]: a response token when t + 1 >= len(p).
        mask[i, len(p) - 1 : m] = 1.0
    return {"inputs": inputs, "targets": targets, "mask": mask}, cut


def encode_sequences(
    pairs: Sequence[tuple[str, str]], tokenizer: Tokenizer, template: str, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """Full (prompt, response) sequences as the RM scores them, right-padded.

    Each is [bos] + template(prompt) + response + [eos], cut at the right to `seq_len`.

    Returns:
      (tokens int32 [N, L], real-token mask bool [N, L]).
    """
    tokens = np.full((len(pairs), seq_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(pairs), seq_len), bool)
    for i, (prompt, response) in enumerate(pairs):
        ids = prompt_ids(tokenizer, template, prompt) + tokenizer.encode(response)
        ids = (ids + [tokenizer.eos_id])[:seq_len]
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
):
    """Train iterator, eval batches, held-out prompts for sampling, and counts for logging.

    The held-out set is `eval_paths` when given, else a seeded `eval_fraction` split.

    Returns:
      (train_iterator, eval_batch_list, eval_demos, info dict).
    """
    demos = read_demos(train_paths)
    if eval_paths:
        train_demos, eval_demos = demos, read_demos(eval_paths)
    else:
        train_demos, eval_demos = data.split_documents(demos, eval_fraction, seed)
    train_ex, train_cut = encode_demos(train_demos, tokenizer, template, seq_len)
    it = data.make_train_iterator(
        train_ex,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    evals, eval_cut = [], 0
    if eval_demos:
        eval_ex, eval_cut = encode_demos(eval_demos, tokenizer, template, seq_len)
        evals = data.eval_batches(
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
    }
    return it, evals, eval_demos, info


def read_prompts(paths: str | Sequence[str]) -> list[str]:
    """Prompt texts of `{"prompt": ...}` JSONL files (errors name file:line:field)."""
    out = []
    for path in data.expand_paths(paths):
        out.extend(r["prompt"] for r in data.read_jsonl(path, PROMPT_FIELDS))
    return out


def encode_prompts(
    prompts: Sequence[str], tokenizer: Tokenizer, template: str, prompt_len: int
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
