"""The `init_from="hf:DIR"` hand-off: a Hugging Face directory read in place as a stage's start.

No conversion on disk: `init_meta`, `restore_params` and `tokenizer_path` stand in for a stage
checkpoint's meta, params and tokenizer (stages/setup.py). Reading safetensors is hf.py's, the
per-family config and tensor mapping hf_map.py's; converting to and from workdirs on disk is the
convert tool's (rlhf_jax/tools/convert.py).
"""

from __future__ import annotations

import dataclasses
import os

import jax

from rlhf_jax.models import hf, hf_map
from rlhf_jax.models import transformer as model_lib

TOKENIZER_FILE = "tokenizer.model"  # a sentencepiece tokenizer, in a workdir or beside weights
HF_TOKENIZER_DIR = "tokenizer"  # a tokenizer.json and its configs, as a workdir keeps them
HF_PREFIX = "hf:"


def is_hf_path(path) -> bool:
    return isinstance(path, str) and path.startswith(HF_PREFIX)


def hf_dir(path: str) -> str:
    """`hf:/some/dir` -> `/some/dir` (a plain path is returned unchanged)."""
    return os.path.expanduser(path[len(HF_PREFIX) :] if is_hf_path(path) else path)


def tokenizer_path(path: str) -> str | None:
    """The sentencepiece `tokenizer.model` beside the weights, or None (see the README)."""
    file = os.path.join(hf_dir(path), TOKENIZER_FILE)
    return file if os.path.isfile(file) else None


def init_meta(path: str, *, scan_layers: bool = False) -> dict:
    """A checkpoint-style meta for `hf:DIR`: {"model", "tokenizer", "stage", "hf", "config"}."""
    directory = hf_dir(path)
    hf_cfg = hf.read_config(directory)
    cfg = hf_map.config_from_hf(hf_cfg, scan_layers=scan_layers)
    return {
        "model": dataclasses.asdict(cfg),
        "tokenizer": TOKENIZER_FILE if tokenizer_path(directory) else None,
        "stage": "hf",
        "hf": {"model_type": hf_cfg.get("model_type"), **hf_map.token_ids(hf_cfg)},
        "config": {"hf": directory},
    }


def restore_params(path: str, abstract_params):
    """`checkpoint.restore_params` for `hf:DIR`: params in the shardings `abstract_params` asks.

    Args:
      path: `hf:DIR` or DIR.
      abstract_params: pytree of ShapeDtypeStruct with `.sharding` (`state.abstract_params`).

    Raises:
      ValueError: the HF model does not have `abstract_params`' params and shapes.
    """
    directory = hf_dir(path)
    hf_cfg = hf.read_config(directory)
    cfg = hf_map.config_from_hf(hf_cfg, scan_layers="layers" in abstract_params)
    flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
    want = {jax.tree_util.keystr(p): x.shape for p, x in flat(model_lib.abstract(cfg)[1])}
    have = {jax.tree_util.keystr(p): x.shape for p, x in flat(abstract_params)}
    for key in sorted(set(want) | set(have)):
        if want.get(key) != have.get(key):
            raise ValueError(
                f"{path}: param {key} is {want.get(key)} in the Hugging Face model but the "
                f"model being built expects {have.get(key)}"
            )
    return hf.load_params(directory, hf_cfg, cfg, abstract_params)
