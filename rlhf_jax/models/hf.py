"""Hugging Face weights: import into our sharded params, export back; safetensors + numpy only.

This module owns reading and writing a Hugging Face model directory (`config.json` plus
`*.safetensors`, one file or shards listed in `model.safetensors.index.json`). No torch: tensors
are read one at a time with safetensors' numpy API, converted on the host by the per-family
mapping in hf_map.py and placed straight into their target sharding, so no device (and no host
buffer beyond one stacked parameter) ever holds the whole model.

HF's `score` head has no bias; a non-zero `score_bias` (only a PPO value head trains one; the RM
loss is blind to it) is written as config field `rlhf_jax_score_bias`, so HF's logits plus that
field equal our scores, and it is read back on import.

The CLI, workdirs and the `init_from="hf:DIR"` hand-off live in convert.py.
"""

from __future__ import annotations

import glob
import json
import os

import jax
import ml_dtypes
import numpy as np
import tqdm
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import hf_map

INDEX_FILE = "model.safetensors.index.json"
SCORE_BIAS_FIELD = "rlhf_jax_score_bias"
# An RM's normalisation bias (stages/rm.py), kept for whoever scores with the exported RM. A PPO
# or GRPO policy's meta records the bias of the RM it trained against, but it is no RM's config.
REWARD_BIAS_FIELD = "rlhf_jax_reward_bias"
# Buffers some checkpoints carry that are not parameters (causal masks, cached RoPE tables).
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# ----------------------------------------------------------------------------- config.json


def read_config(path: str) -> dict:
    """The parsed `config.json` of a model directory."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} is not a Hugging Face model directory: no config.json")
    with open(file) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- safetensors


class Reader:
    """The tensors of a directory's `*.safetensors`: one file, or shards named by an index."""

    def __init__(self, path: str):
        index = os.path.join(path, INDEX_FILE)
        self._file: dict[str, str] = {}
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            for name, file in weight_map.items():
                self._file[name] = os.path.join(path, file)
            missing = sorted({f for f in self._file.values() if not os.path.isfile(f)})
            if missing:
                raise FileNotFoundError(f"{INDEX_FILE} names shard {missing[0]!r}, which is absent")
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"{path!r} holds no *.safetensors weights")
            for file in files:
                with safe_open(file, framework="np") as f:
                    self._file.update(dict.fromkeys(f.keys(), file))
        # The base-model prefix: GPT2LMHeadModel saves "transformer.h.0...", GPT2Model "h.0...".
        self.prefix = next(
            (p for p in ("transformer.", "model.") if any(n.startswith(p) for n in self._file)), ""
        )

    def names(self) -> set[str]:
        return set(self._file)

    def full_name(self, name: str) -> str:
        return name[1:] if name.startswith("/") else self.prefix + name

    def shape(self, full: str) -> tuple | None:
        """The stored shape of tensor `full` (a full name), or None if there is no such tensor."""
        if full not in self._file:
            return None
        with safe_open(self._file[full], framework="np") as f:
            return tuple(f.get_slice(full).get_shape())

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` (mapped by `full_name`) as a host array."""
        full = self.full_name(name)
        with safe_open(self._file[full], framework="np") as f:
            if f.get_slice(full).get_dtype() != "BF16":
                return f.get_tensor(full)
        return _read_bf16(self._file[full], full)


def _read_bf16(file: str, name: str) -> np.ndarray:
    """safetensors' numpy API has no bfloat16; read the raw bytes as ml_dtypes.bfloat16."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))[name]
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        buf = f.read(end - start)
    return np.frombuffer(buf, dtype=ml_dtypes.bfloat16).reshape(info["shape"]).copy()


# ----------------------------------------------------------------------------- import


def _sources(cfg) -> dict[tuple, list[tuple[hf_map.Tensor, int]]]:
    """Our leaf path -> [(HF tensor, index among its targets)], one per layer when stacked."""
    out: dict[tuple, list] = {}
    for t in hf_map.tensor_map(cfg):
        for j, path in enumerate(t.targets):
            key = ("layers",) + path[2:] if path[0] == "layers" else path
            out.setdefault(key, []).append((t, j))
    return out


def _check(reader: Reader, cfg) -> None:
    """Every tensor present with the shape config.json implies, and none left over, before any
    device work. A tensor we would drop means a feature we do not model: refuse it."""
    for t in hf_map.tensor_map(cfg):
        full = reader.full_name(t.name)
        found = reader.shape(full)
        if found is None:
            raise ValueError(f"tensor {full!r} is missing from the safetensors weights")
        if found != t.shape:
            raise ValueError(f"tensor {full!r} has shape {found} but config.json implies {t.shape}")
    used = {reader.full_name(t.name) for t in hf_map.tensor_map(cfg)}
    if cfg.tie_embeddings or cfg.head == "scalar":
        used.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    extra = sorted(n for n in reader.names() - used if not n.endswith(_BUFFERS))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"tensor {extra[0]!r}{more} has no place in the imported model")


def load_params(path: str, hf: dict, cfg: model_config.ModelConfig, abstract):
    """Reads, converts and places every param, one HF tensor at a time.

    Args:
      path: the HF model directory.
      hf: its parsed config.json.
      cfg: the ModelConfig `hf_map.config_from_hf` made of it (scan_layers decides stacking).
      abstract: the target pytree of ShapeDtypeStruct with `.sharding` (e.g.
        `state.abstract_params`); every leaf is created in exactly that sharding and dtype.

    Returns:
      The params pure dict, structured like `abstract`.
    """
    reader = Reader(path)
    _check(reader, cfg)
    sources = _sources(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    cache: dict[str, tuple] = {}  # GPT-2's c_attn feeds q, k and v: read it once

    def convert(t: hf_map.Tensor) -> tuple:
        if t.name not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[t.name] = t.to_ours(reader.read(t.name))
        return cache[t.name]

    leaves = []
    bar = tqdm.tqdm(flat, desc="import", unit="param", disable=jax.process_index() != 0)
    for keypath, leaf in bar:
        key = tuple(k.key for k in keypath)
        name = "/".join(map(str, key))
        if key == ("score_bias",):
            host = np.asarray(float(hf.get(SCORE_BIAS_FIELD, 0.0)))
        elif key in sources:
            parts = [convert(t)[j] for t, j in sources[key]]
            host = np.stack(parts) if key[0] == "layers" else parts[0]  # [L, ...] when stacked
        else:
            raise ValueError(f"param {name!r} has no Hugging Face tensor for this architecture")
        if host.shape != tuple(leaf.shape):
            raise ValueError(f"param {name!r} has shape {tuple(leaf.shape)}, HF gives {host.shape}")
        host = np.asarray(host, dtype=leaf.dtype)
        leaves.append(
            jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda idx, h=host: h[idx])
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


def import_hf(
    path: str,
    mesh,
    rules,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    scan_layers: bool = False,
):
    """Imports a HF model directory straight into the sharded layout of `mesh` and `rules`.

    Args:
      path: directory with config.json and *.safetensors (single or sharded with an index).
      mesh, rules: where params go (`state.param_shardings` decides each param's sharding).
      dtype: compute dtype of the returned ModelConfig.
      param_dtype: dtype the params are stored in (cast on the host, tensor by tensor).
      scan_layers: stack the layers ([L, ...] params) for `model.scan_layers`.

    Returns:
      (ModelConfig, params pure dict of sharded jax.Arrays).
    """
    hf = read_config(path)
    cfg = hf_map.config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    abstract = state_lib.abstract_params(cfg, mesh, rules)
    return cfg, load_params(path, hf, cfg, abstract)


# ----------------------------------------------------------------------------- export


def _host(params, path: tuple) -> np.ndarray:
    """One param (or one layer of a stacked one) as a host array, gathered across processes."""
    stacked = path[0] == "layers"
    node = params
    for key in path[:1] + path[2:] if stacked else path:
        node = node[key]
    x = node[path[1]] if stacked else node
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def export_hf(
    params,
    cfg: model_config.ModelConfig,
    out_dir: str,
    *,
    dtype: str | None = None,
    token_ids: dict | None = None,
    extra_config: dict | None = None,
    reward_bias: float | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Writes config.json + safetensors that transformers loads (`from_pretrained(out_dir)`).

    Tensors are gathered one at a time and written in shards of at most `max_shard_bytes`
    (`model.safetensors`, or `model-0000i-of-0000n.safetensors` plus an index), so the host holds
    one shard at most. Every process must call this (gathers are collective); process 0 writes.

    Args:
      params: params pure dict (sharded jax.Arrays or numpy).
      cfg: their ModelConfig; a scalar head exports as `*ForSequenceClassification`.
      out_dir: the HF directory to write (created).
      dtype: float32, bfloat16 or float16; default `cfg.param_dtype`.
      token_ids: bos/eos/pad ids for config.json (see `hf_map.config_to_hf`). A scalar head
        without a pad id gets the (first) eos id as pad: transformers' sequence classifier
        finds each row's last real token through pad_token_id and, without one, refuses
        batches of more than one row (Llama 3 checkpoints state no pad).
      extra_config: more config.json fields.
      reward_bias: an RM's normalisation bias, written as REWARD_BIAS_FIELD for a scalar head
        only (a policy's meta carries its RM's bias too; its config must not).
      max_shard_bytes: shard size limit.

    Returns:
      The files written.
    """
    name = dtype or cfg.param_dtype
    if name not in _DTYPES:
        raise ValueError(f"unknown export dtype: {name!r}; expected one of {tuple(_DTYPES)}")
    token_ids = dict(token_ids or {})
    if cfg.head == "scalar" and token_ids.get("pad_token_id") is None:
        eos = token_ids.get("eos_token_id")
        token_ids["pad_token_id"] = eos[0] if isinstance(eos, list) and eos else eos
        if token_ids["pad_token_id"] is None and jax.process_index() == 0:
            print("warning: no pad or eos id: transformers scores batches of one row only")
    hf = hf_map.config_to_hf(cfg, token_ids)
    hf.update(extra_config or {}, torch_dtype=name)
    if cfg.head == "scalar":
        bias = float(_host(params, ("score_bias",)))
        if bias:
            hf[SCORE_BIAS_FIELD] = bias
        if reward_bias is not None:
            hf[REWARD_BIAS_FIELD] = float(reward_bias)
    prefix = "transformer." if cfg.family == "gpt2" else "model."
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    shards: list[dict[str, str]] = []  # per shard: tensor name -> tmp file
    current: dict[str, np.ndarray] = {}
    total = 0  # tensor bytes, as the index's total_size counts them

    def flush():
        nonlocal total
        tmp = os.path.join(out_dir, f".shard-{len(shards):05d}.tmp")
        if writer:
            save_file(current, tmp, metadata={"format": "pt"})  # transformers requires "pt"
        shards.append(dict.fromkeys(current, tmp))
        total += sum(x.nbytes for x in current.values())
        current.clear()

    for t in tqdm.tqdm(hf_map.tensor_map(cfg), desc="export", unit="tensor", disable=not writer):
        w = t.to_hf(tuple(_host(params, path) for path in t.targets))
        w = np.ascontiguousarray(np.asarray(w).astype(_DTYPES[name]))
        if current and sum(x.nbytes for x in current.values()) + w.nbytes > max_shard_bytes:
            flush()
        current[t.name[1:] if t.name.startswith("/") else prefix + t.name] = w
    flush()
    if not writer:
        return []
    n = len(shards)
    final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    if n == 1:
        final = ["model.safetensors"]
    # Weights of an earlier export here (another shard count) must not be mixed with these.
    for old in glob.glob(os.path.join(out_dir, "model*.safetensors*")):
        os.remove(old)
    weight_map = {}
    for shard, file in zip(shards, final, strict=True):
        os.replace(next(iter(shard.values())), os.path.join(out_dir, file))
        weight_map.update(dict.fromkeys(shard, file))
    written = [os.path.join(out_dir, f) for f in final]
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        written.append(_write_json(os.path.join(out_dir, INDEX_FILE), index))
    written.append(_write_json(os.path.join(out_dir, "config.json"), hf))
    return written


def _write_json(file: str, obj) -> str:
    with open(file + ".tmp", "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(file + ".tmp", file)
    return file
