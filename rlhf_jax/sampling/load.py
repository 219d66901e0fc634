"""A stage workdir -> a model ready to sample or score, and prompts ready for the sampler.

`load_model` restores a stage checkpoint's params straight into their sharded layout with its
model config and tokenizer (the generate, score and best-of-K tools, PPO's reference and the
pipeline's evaluation share it). `read_prompts` / `encode_prompts` turn a JSONL prompt file into
[bos] + template(prompt) token lists, `left_pad` makes the sampler's [N, P] inputs, and `row_keys`
gives row (prompt i, sample s) the PRNG stream fold_in(fold_in(key(seed), i), s), so outputs do not
depend on the batch size or the number of processes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os

import jax
import numpy as np

from rlhf_jax.data import chat, sft_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.infra import checkpoint, restore, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config


def load_model(workdir: str, mesh, rules=None, step: int | None = None):
    """Loads a stage checkpoint's params straight into their sharded layout on `mesh`.

    Args:
      workdir: a stage workdir (holding `checkpoints/`) or its checkpoints directory.
      mesh: the mesh to place params on.
      rules: logical sharding rules; default `sharding.DEFAULT_RULES`.
      step: the checkpoint step; None means the latest.

    Returns:
      (graphdef, params pure dict, ModelConfig, Tokenizer, meta dict). A LoRA workdir comes
      back as its merged model (base + adapters folded in, `restore.restore_params`).

    Raises:
      FileNotFoundError: no checkpoint (or tokenizer file) there.
      ValueError: the checkpoint has no model config or does not match it.
    """
    rules = rules if rules is not None else sharding.DEFAULT_RULES
    key = None
    if _KEPT is not None:
        latest = (checkpoint.committed_steps(workdir) or [None])[-1]
        key = (os.path.realpath(workdir), latest if step is None else step, mesh)
        key += (sharding.normalize_rules(rules),)
        if key in _KEPT:
            _KEPT.move_to_end(key)
            return _KEPT[key]
    loaded = _load(workdir, mesh, rules, step)
    if key is not None:
        _KEPT[key] = loaded
        while len(_KEPT) > _KEEP:
            _KEPT.popitem(last=False)  # the least recently used model's arrays are freed
    return loaded


# The models `keep_loaded` holds: (workdir, step, mesh, rules) -> load_model's tuple, in LRU
# order; None outside a `keep_loaded` block (every call restores from disk).
_KEPT: collections.OrderedDict | None = None
_KEEP = 0


@contextlib.contextmanager
def keep_loaded(n: int = 3):
    """Within the block, `load_model` hands back the arrays it restored for the same checkpoint
    (workdir and step, mesh, rules) instead of reading them again, for the `n` most recently used.

    The pipeline's evaluation reads each model up to four times (sampling, held-out loss, KL,
    RM score) and the SFT reference and the RM once per evaluated model: with n = 3 (the model,
    its reference and the RM) each is restored once. At most n models stay in device memory.
    Callers must not donate the params they get. Nested blocks share the outer cache.
    """
    global _KEPT, _KEEP
    if _KEPT is not None:
        yield
        return
    _KEPT, _KEEP = collections.OrderedDict(), n
    try:
        yield
    finally:
        _KEPT, _KEEP = None, 0


def _load(workdir: str, mesh, rules, step):
    meta = checkpoint.read_meta(workdir, step)
    if not meta or "model" not in meta:
        raise ValueError(f"checkpoint in {workdir} has no model config in its meta")
    fields = {f.name for f in dataclasses.fields(model_config.ModelConfig)}
    unknown = sorted(set(meta["model"]) - fields)
    if unknown:
        raise ValueError(f"checkpoint in {workdir} has unknown model config keys {unknown}")
    model_cfg = restore.stored_model(meta, workdir)  # a LoRA workdir is read merged
    template = chat.from_config(meta.get("config"))  # how this lineage renders messages rows
    tok = tok_lib.load_tokenizer(_tokenizer_path(workdir, meta), chat_template=template)
    tok.check_model_vocab(model_cfg.vocab_size)
    graphdef, abstract, shardings = state_lib.param_shardings(model_cfg, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    params = restore.restore_params(workdir, abstract, rules, step)
    return graphdef, params, model_cfg, tok, meta


def _tokenizer_path(workdir: str, meta: dict) -> str:
    """The checkpoint's tokenizer: meta names it relative to the stage workdir (or absolutely):
    `tokenizer.model`, or a Hugging Face tokenizer's `tokenizer/` directory."""
    path = meta.get("tokenizer") or "tokenizer.model"
    if os.path.isabs(path):
        return path
    stage_dir = workdir
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # given `<workdir>/checkpoints`
        stage_dir = os.path.dirname(os.path.abspath(workdir))
    named = os.path.join(stage_dir, path)
    kept = os.path.join(stage_dir, "tokenizer")  # a stage's Hugging Face tokenizer copy
    if not os.path.exists(named) and os.path.isdir(kept):  # a meta naming the default file
        return kept
    return named


def read_prompts(path: str) -> tuple[list, list[int]]:
    """(prompts, their line numbers) of a JSONL file of `{"prompt"}` or `{"messages"}` rows."""
    prompts, lines = sft_data.read_prompt_lines(path)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts, lines


def encode_prompts(
    prompts: list[str], lines: list[int], path: str, tok, template: str | None, room: int | None
) -> list[list[int]]:
    """Formats and encodes prompts as [bos] + encode(template with the prompt).

    Args:
      prompts: the raw prompt texts.
      lines: their line numbers in `path`, for errors.
      path: the prompts file, for errors.
      tok: the tokenizer.
      template: a format string with `{prompt}`, or None for the raw prompt.
      room: the most prompt tokens the model can take (None: no limit).

    Returns:
      Token ids per prompt.
    """
    # The exact prefix SFT trained responses to follow (one definition: sft_data.prompt_ids).
    ids = [sft_data.prompt_ids(tok, template or "{prompt}", p) for p in prompts]
    for line, x in zip(lines, ids, strict=True):
        if room is not None and len(x) > room:
            raise ValueError(
                f"{path}:{line}: prompt is {len(x)} tokens but the model has room for {room} "
                f"(max_len minus --max-new-tokens)"
            )
    return ids


@jax.jit
def row_keys(seed, prompt_index, sample_index):
    """[N] typed PRNG keys fold_in(fold_in(key(seed), prompt_index), sample_index)."""
    root = jax.random.key(seed)
    fold = lambda i, s: jax.random.fold_in(jax.random.fold_in(root, i), s)
    return jax.vmap(fold)(prompt_index, sample_index)


def left_pad(ids: list[list[int]], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (tokens [N, width] int32, mask [N, width] bool), padded on the left."""
    tokens = np.full((len(ids), width), pad_id, np.int32)
    mask = np.zeros((len(ids), width), bool)
    for i, x in enumerate(ids):
        tokens[i, width - len(x) :] = x
        mask[i, width - len(x) :] = True
    return tokens, mask
