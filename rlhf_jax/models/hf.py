"""Hugging Face weights: import into our sharded params, export back; safetensors + numpy only.

This module owns the mapping between a Hugging Face model directory (`config.json` plus
`*.safetensors`, one file or shards listed in `model.safetensors.index.json`) and our
`ModelConfig` + params pure dict, for the GPT-2 family (`model_type` gpt2) and the LLaMA family
(llama, mistral, qwen2). No torch: tensors are read one at a time with safetensors' numpy API,
transformed on the host and placed straight into their target sharding, so no device (and no
host buffer beyond one stacked parameter) ever holds the whole model.

Layouts. HF GPT-2 uses Conv1D weights stored [in, out] (q/k/v fused in `c_attn` [D, 3D]); HF
LLaMA uses nn.Linear weights stored [out, in]. Ours: q [D, N, H], k/v [D, K, H], o [N, H, D],
mlp up/gate [D, F], down [F, D], embed [V, D], lm_head [D, V], score_head [D]. HF LLaMA q/k rows
are already in the half-split ("rotate_half") RoPE layout that `model.rope` implements, so no
permutation is needed.

Scalar heads (reward / value models) map to `*ForSequenceClassification` with num_labels=1: the
backbone as the base model and `score_head` as `score.weight` [1, D]. HF reads the score at the
last token that is not `pad_token_id`, which is our last-real-token read-out when the pad id never
occurs as a real token. HF's `score` has no bias; a non-zero `score_bias` (only a PPO value head
trains one; the RM loss is blind to it) is written as config field `rlhf_jax_score_bias`, so HF's
logits plus that field equal our scores, and it is read back on import.

The CLI, workdirs and the `init_from="hf:DIR"` hand-off live in convert.py.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
from collections.abc import Callable

import jax
import ml_dtypes
import numpy as np
import tqdm
from safetensors import safe_open
from safetensors.numpy import save_file

from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import transformer as model_lib

log = logging.getLogger(__name__)

LLAMA_TYPES = ("llama", "mistral", "qwen2")
MODEL_TYPES = ("gpt2",) + LLAMA_TYPES
ROPE_SCALINGS = ("default", "linear", "llama3")  # rope types whose math we reproduce
INDEX_FILE = "model.safetensors.index.json"
SCORE_BIAS_FIELD = "rlhf_jax_score_bias"
_CFG_FIELDS = {f.name for f in dataclasses.fields(model_lib.ModelConfig)}
# Buffers some checkpoints carry that are not parameters (causal masks, cached RoPE tables).
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# ----------------------------------------------------------------------------- config mapping


def read_config(path: str) -> dict:
    """The parsed `config.json` of a model directory."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} is not a Hugging Face model directory: no config.json")
    with open(file) as f:
        return json.load(f)


def _need(field: str, why: str) -> None:
    if field not in _CFG_FIELDS:
        raise ValueError(f"{why} needs model.ModelConfig.{field}, which this model.py lacks")


def _rope_fields(hf: dict) -> dict:
    """RoPE theta and scaling from legacy (`rope_theta`, `rope_scaling`) or v5 `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    out = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta") or 10000.0))}
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise ValueError(
            f"config.json rope scaling type {kind!r} is not supported; expected one of "
            f"{ROPE_SCALINGS}"
        )
    if kind != "default":
        _need("rope_scaling", f"rope scaling {kind!r}")
        out.update(rope_scaling=kind, rope_factor=float(scaling["factor"]))
    if kind == "llama3":
        out.update(
            rope_low_freq_factor=float(scaling["low_freq_factor"]),
            rope_high_freq_factor=float(scaling["high_freq_factor"]),
            rope_original_max_len=int(scaling["original_max_position_embeddings"]),
        )
    if float(hf.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError("config.json partial_rotary_factor != 1 is not supported")
    return out


def _score_head(hf: dict) -> bool:
    """True for a `*ForSequenceClassification` checkpoint (which must have one label)."""
    if not any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
        return False
    labels = hf.get("num_labels") or len(hf.get("id2label") or {"0": ""})
    if labels != 1:
        raise ValueError(f"config.json has num_labels={labels}; a scalar head needs exactly 1")
    return True


# ModelConfig field -> HF config key. One table per family drives both directions; a key HF
# leaves out (n_inner, num_key_value_heads, head_dim, tie_word_embeddings) means the same
# default in both libraries, so it is left to ModelConfig's derivation.
_KEYS = {
    "gpt2": dict(
        vocab_size="vocab_size",
        d_model="n_embd",
        n_layers="n_layer",
        n_heads="n_head",
        d_ff="n_inner",
        max_len="n_positions",
        norm_eps="layer_norm_epsilon",
        tie_embeddings="tie_word_embeddings",
    ),
    "llama": dict(
        vocab_size="vocab_size",
        d_model="hidden_size",
        n_layers="num_hidden_layers",
        n_heads="num_attention_heads",
        n_kv_heads="num_key_value_heads",
        head_dim="head_dim",
        d_ff="intermediate_size",
        max_len="max_position_embeddings",
        norm_eps="rms_norm_eps",
        tie_embeddings="tie_word_embeddings",
    ),
}
_OPTIONAL = ("n_inner", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def _check_supported(kind: str, hf: dict) -> None:
    """Refuses config options whose math the model does not reproduce."""
    if kind not in MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture: config.json model_type is {kind!r}; expected one of "
            f"{MODEL_TYPES}"
        )
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):  # all tanh-approximate
            raise ValueError(f"config.json activation_function {act!r} is not supported for gpt2")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise ValueError("config.json gpt2 attention scaling options are not supported")
        return
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"config.json hidden_act {hf['hidden_act']!r} is not supported")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("config.json attention_bias / mlp_bias (llama) are not supported")
    window = hf.get("sliding_window")
    sliding = kind == "mistral" or hf.get("use_sliding_window")
    if window and sliding and window < hf.get("max_position_embeddings", 0):
        log.warning(
            "%s sliding_window=%d is not implemented: sequences longer than that attend "
            "differently from transformers",
            kind,
            window,
        )


def config_from_hf(hf: dict, **overrides) -> model_lib.ModelConfig:
    """Maps a parsed HF `config.json` to a ModelConfig; `overrides` set numerics (dtype, ...)."""
    kind = hf.get("model_type")
    _check_supported(kind, hf)
    family = "gpt2" if kind == "gpt2" else "llama"
    fields = {"family": family, "head": "scalar" if _score_head(hf) else "lm"}
    for ours, key in _KEYS[family].items():
        if hf.get(key) is not None:
            fields[ours] = hf[key]
        elif key not in _OPTIONAL:
            raise ValueError(f"config.json has no field {key!r}")
    if family == "llama":
        fields.update(_rope_fields(hf))
    if kind == "qwen2":
        _need("qkv_bias", "qwen2's q/k/v projection biases")
        fields["qkv_bias"] = True
    return model_lib.ModelConfig(**fields, **overrides)


def config_to_hf(cfg: model_lib.ModelConfig, token_ids: dict | None = None) -> dict:
    """The HF `config.json` dict for `cfg` (GPT2 / Llama / Qwen2, LM or sequence classification).

    Args:
      cfg: the model config.
      token_ids: optional {"bos_token_id", "eos_token_id", "pad_token_id"}; a scalar head needs
        pad_token_id for HF to find each row's last real token.
    """
    hf = {key: getattr(cfg, ours) for ours, key in _KEYS[cfg.family].items()}
    if cfg.family == "gpt2":
        if cfg.n_kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.d_model:
            raise ValueError("gpt2 export needs n_kv_heads == n_heads and head_dim == D / N")
        kind, arch = "gpt2", "GPT2"
        hf.update(activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        qwen = getattr(cfg, "qkv_bias", False)
        kind, arch = ("qwen2", "Qwen2") if qwen else ("llama", "Llama")
        scaling = None
        if getattr(cfg, "rope_scaling", "none") != "none":
            scaling = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
            if cfg.rope_scaling == "llama3":
                scaling.update(
                    low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len,
                )
        # Legacy rope keys: transformers 4.x reads them and 5.x converts them.
        hf.update(rope_theta=cfg.rope_theta, rope_scaling=scaling, hidden_act="silu")
        if not qwen:
            hf.update(attention_bias=False, mlp_bias=False)
    hf["model_type"] = kind
    if cfg.head == "scalar":
        hf.update(
            architectures=[f"{arch}ForSequenceClassification"],
            num_labels=1,
            id2label={"0": "LABEL_0"},
            label2id={"LABEL_0": 0},
        )
    else:
        hf["architectures"] = [f"{arch}LMHeadModel" if kind == "gpt2" else f"{arch}ForCausalLM"]
    # Unset ids are written as null: HF's GPT2Config would otherwise default them to 50256.
    hf.update(dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id")), **(token_ids or {}))
    return hf


# ----------------------------------------------------------------------------- tensor mapping


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor and the params of ours it holds (GPT-2's c_attn holds three)."""

    name: str  # without the base-model prefix ("h.0.attn.c_attn.weight")
    shape: tuple  # the HF shape config.json implies
    targets: tuple  # our param paths within the params dict, e.g. (("blocks", 0, "attn", "q"),)
    to_ours: Callable  # hf array -> tuple of our arrays, one per target
    to_hf: Callable  # tuple of our arrays -> hf array


def _same(name, path, shape, ours=None):
    """A tensor stored alike, up to a reshape to `ours` (e.g. a bias [N*H] -> [N, H])."""
    shape, ours = tuple(shape), tuple(ours or shape)
    return _Tensor(
        name, shape, (path,), lambda w: (w.reshape(ours),), lambda xs: xs[0].reshape(shape)
    )


def _matmul(name, path, in_shape, out_shape, hf_in_out: bool):
    """A weight ours stores as [*in, *out]; HF stores [in, out] (Conv1D) or [out, in] (Linear)."""
    i, o = math.prod(in_shape), math.prod(out_shape)
    shape = tuple(in_shape) + tuple(out_shape)
    if hf_in_out:
        return _Tensor(
            name, (i, o), (path,), lambda w: (w.reshape(shape),), lambda xs: xs[0].reshape(i, o)
        )
    return _Tensor(
        name, (o, i), (path,), lambda w: (w.T.reshape(shape),), lambda xs: xs[0].reshape(i, o).T
    )


def _fused(name, paths, lead: tuple, part: tuple):
    """GPT-2's c_attn: [*lead, 3 * prod(part)] split into q, k, v each [*lead, *part]."""
    width = math.prod(part)
    return _Tensor(
        name,
        tuple(lead) + (3 * width,),
        tuple(paths),
        lambda w: tuple(x.reshape(tuple(lead) + tuple(part)) for x in np.split(w, 3, axis=-1)),
        lambda xs: np.concatenate([x.reshape(tuple(lead) + (width,)) for x in xs], axis=-1),
    )


def _block_tensors(cfg, i: int, blk: tuple) -> list[_Tensor]:
    """The HF tensors of layer i; `blk` is our path prefix of that layer's block."""
    d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    a, m = blk + ("attn",), blk + ("mlp",)
    if cfg.family == "gpt2":
        p = f"h.{i}."
        qkv = [a + (x,) for x in ("q", "k", "v")]
        return [
            _same(p + "ln_1.weight", blk + ("ln1", "scale"), (d,)),
            _same(p + "ln_1.bias", blk + ("ln1", "bias"), (d,)),
            _fused(p + "attn.c_attn.weight", qkv, (d,), (n, h)),
            _fused(p + "attn.c_attn.bias", [a + (f"{x}_bias",) for x in "qkv"], (), (n, h)),
            _matmul(p + "attn.c_proj.weight", a + ("o",), (n, h), (d,), True),
            _same(p + "attn.c_proj.bias", a + ("o_bias",), (d,)),
            _same(p + "ln_2.weight", blk + ("ln2", "scale"), (d,)),
            _same(p + "ln_2.bias", blk + ("ln2", "bias"), (d,)),
            _matmul(p + "mlp.c_fc.weight", m + ("up",), (d,), (f,), True),
            _same(p + "mlp.c_fc.bias", m + ("up_bias",), (f,)),
            _matmul(p + "mlp.c_proj.weight", m + ("down",), (f,), (d,), True),
            _same(p + "mlp.c_proj.bias", m + ("down_bias",), (d,)),
        ]
    p = f"layers.{i}."
    out = [
        _same(p + "input_layernorm.weight", blk + ("ln1", "scale"), (d,)),
        _matmul(p + "self_attn.q_proj.weight", a + ("q",), (d,), (n, h), False),
        _matmul(p + "self_attn.k_proj.weight", a + ("k",), (d,), (k, h), False),
        _matmul(p + "self_attn.v_proj.weight", a + ("v",), (d,), (k, h), False),
        _matmul(p + "self_attn.o_proj.weight", a + ("o",), (n, h), (d,), False),
        _same(p + "post_attention_layernorm.weight", blk + ("ln2", "scale"), (d,)),
        _matmul(p + "mlp.gate_proj.weight", m + ("gate",), (d,), (f,), False),
        _matmul(p + "mlp.up_proj.weight", m + ("up",), (d,), (f,), False),
        _matmul(p + "mlp.down_proj.weight", m + ("down",), (f,), (d,), False),
    ]
    if getattr(cfg, "qkv_bias", False):
        for x, heads in (("q", n), ("k", k), ("v", k)):
            path = a + (f"{x}_bias",)
            out.append(_same(p + f"self_attn.{x}_proj.bias", path, (heads * h,), (heads, h)))
    return out


def tensor_map(cfg: model_lib.ModelConfig) -> list[_Tensor]:
    """Every HF tensor of `cfg`'s model (names without the base-model prefix), in HF order.

    With `scan_layers`, a block path is ("layers", i, ...): index i of the stacked [L, ...] param.
    """
    gpt2 = cfg.family == "gpt2"
    v, d = cfg.vocab_size, cfg.d_model
    out = [_same("wte.weight" if gpt2 else "embed_tokens.weight", ("embed",), (v, d))]
    if gpt2:
        out.append(_same("wpe.weight", ("pos_embed",), (cfg.max_len, d)))
    for i in range(cfg.n_layers):
        out += _block_tensors(cfg, i, ("layers", i) if cfg.scan_layers else ("blocks", i))
    out.append(_same("ln_f.weight" if gpt2 else "norm.weight", ("final_norm", "scale"), (d,)))
    if gpt2:
        out.append(_same("ln_f.bias", ("final_norm", "bias"), (d,)))
    # Heads live outside the base model: their names are absolute ("/" marks that).
    if cfg.head == "scalar":
        out.append(_matmul("/score.weight", ("score_head",), (d,), (), False))
    elif not cfg.tie_embeddings:
        out.append(_matmul("/lm_head.weight", ("lm_head",), (d,), (v,), False))
    return out


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


def _sources(cfg) -> dict[tuple, list[tuple[_Tensor, int]]]:
    """Our leaf path -> [(HF tensor, index among its targets)], one per layer when stacked."""
    out: dict[tuple, list] = {}
    for t in tensor_map(cfg):
        for j, path in enumerate(t.targets):
            key = ("layers",) + path[2:] if path[0] == "layers" else path
            out.setdefault(key, []).append((t, j))
    return out


def _check(reader: Reader, cfg) -> None:
    """Every tensor present with the shape config.json implies, and none left over, before any
    device work. A tensor we would drop means a feature we do not model: refuse it."""
    for t in tensor_map(cfg):
        full = reader.full_name(t.name)
        found = reader.shape(full)
        if found is None:
            raise ValueError(f"tensor {full!r} is missing from the safetensors weights")
        if found != t.shape:
            raise ValueError(f"tensor {full!r} has shape {found} but config.json implies {t.shape}")
    used = {reader.full_name(t.name) for t in tensor_map(cfg)}
    if cfg.tie_embeddings or cfg.head == "scalar":
        used.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    extra = sorted(n for n in reader.names() - used if not n.endswith(_BUFFERS))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"tensor {extra[0]!r}{more} has no place in the imported model")


def load_params(path: str, hf: dict, cfg: model_lib.ModelConfig, abstract):
    """Reads, converts and places every param, one HF tensor at a time.

    Args:
      path: the HF model directory.
      hf: its parsed config.json.
      cfg: the ModelConfig `config_from_hf` made of it (scan_layers decides stacking).
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

    def convert(t: _Tensor) -> tuple:
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
    cfg = config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers)
    abstract = state_lib.abstract_params(cfg, mesh, rules)
    return cfg, load_params(path, hf, cfg, abstract)


# ----------------------------------------------------------------------------- export


def token_ids(hf: dict) -> dict:
    """The special token ids a HF config states (eos may be a list, as in LLaMA 3)."""
    return {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


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
    cfg: model_lib.ModelConfig,
    out_dir: str,
    *,
    dtype: str | None = None,
    token_ids: dict | None = None,
    extra_config: dict | None = None,
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
      token_ids: bos/eos/pad ids for config.json (see `config_to_hf`).
      extra_config: more config.json fields (e.g. an RM's `rlhf_jax_reward_bias`).
      max_shard_bytes: shard size limit.

    Returns:
      The files written.
    """
    name = dtype or cfg.param_dtype
    if name not in _DTYPES:
        raise ValueError(f"unknown export dtype: {name!r}; expected one of {tuple(_DTYPES)}")
    hf = config_to_hf(cfg, token_ids)
    hf.update(extra_config or {}, torch_dtype=name)
    if cfg.head == "scalar":
        bias = float(_host(params, ("score_bias",)))
        if bias:
            hf[SCORE_BIAS_FIELD] = bias
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

    for t in tqdm.tqdm(tensor_map(cfg), desc="export", unit="tensor", disable=not writer):
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
