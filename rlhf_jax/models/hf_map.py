"""Hugging Face <-> ours, per model family: config.json fields and the name/layout of every tensor.

This module owns the mapping between a Hugging Face `config.json` and our `ModelConfig`, for the
GPT-2 family (`model_type` gpt2) and the LLaMA family (llama, mistral, qwen2), and the table
(`tensor_map`) that names every HF tensor of a model with the params of ours it holds and the
reshapes/transposes between the two layouts. It is pure (dicts and numpy, no files, no devices);
reading and writing safetensors directories lives in hf.py.

Layouts. HF GPT-2 uses Conv1D weights stored [in, out] (q/k/v fused in `c_attn` [D, 3D]); HF
LLaMA uses nn.Linear weights stored [out, in]. Ours: q [D, N, H], k/v [D, K, H], o [N, H, D],
mlp up/gate [D, F], down [F, D], embed [V, D], lm_head [D, V], score_head [D]. HF LLaMA q/k rows
are already in the half-split ("rotate_half") RoPE layout that `model.rope` implements, so no
permutation is needed.

Scalar heads (reward / value models) map to `*ForSequenceClassification` with num_labels=1: the
backbone as the base model and `score_head` as `score.weight` [1, D]. HF reads the score at the
last token that is not `pad_token_id`, which is our last-real-token read-out when the pad id never
occurs as a real token.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import numpy as np

from rlhf_jax.models import config as model_config

log = logging.getLogger(__name__)

LLAMA_TYPES = ("llama", "mistral", "qwen2")
MODEL_TYPES = ("gpt2",) + LLAMA_TYPES
ROPE_SCALINGS = ("default", "linear", "llama3")  # rope types whose math we reproduce
_CFG_FIELDS = {f.name for f in dataclasses.fields(model_config.ModelConfig)}


# ----------------------------------------------------------------------------- config mapping


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


def config_from_hf(hf: dict, **overrides) -> model_config.ModelConfig:
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
    return model_config.ModelConfig(**fields, **overrides)


def config_to_hf(cfg: model_config.ModelConfig, token_ids: dict | None = None) -> dict:
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
class Tensor:
    """One HF tensor and the params of ours it holds (GPT-2's c_attn holds three)."""

    name: str  # without the base-model prefix ("h.0.attn.c_attn.weight")
    shape: tuple  # the HF shape config.json implies
    targets: tuple  # our param paths within the params dict, e.g. (("blocks", 0, "attn", "q"),)
    to_ours: Callable  # hf array -> tuple of our arrays, one per target
    to_hf: Callable  # tuple of our arrays -> hf array


def _same(name, path, shape, ours=None):
    """A tensor stored alike, up to a reshape to `ours` (e.g. a bias [N*H] -> [N, H])."""
    shape, ours = tuple(shape), tuple(ours or shape)
    return Tensor(
        name, shape, (path,), lambda w: (w.reshape(ours),), lambda xs: xs[0].reshape(shape)
    )


def _matmul(name, path, in_shape, out_shape, hf_in_out: bool):
    """A weight ours stores as [*in, *out]; HF stores [in, out] (Conv1D) or [out, in] (Linear)."""
    i, o = math.prod(in_shape), math.prod(out_shape)
    shape = tuple(in_shape) + tuple(out_shape)
    if hf_in_out:
        return Tensor(
            name, (i, o), (path,), lambda w: (w.reshape(shape),), lambda xs: xs[0].reshape(i, o)
        )
    return Tensor(
        name, (o, i), (path,), lambda w: (w.T.reshape(shape),), lambda xs: xs[0].reshape(i, o).T
    )


def _fused(name, paths, lead: tuple, part: tuple):
    """GPT-2's c_attn: [*lead, 3 * prod(part)] split into q, k, v each [*lead, *part]."""
    width = math.prod(part)
    return Tensor(
        name,
        tuple(lead) + (3 * width,),
        tuple(paths),
        lambda w: tuple(x.reshape(tuple(lead) + tuple(part)) for x in np.split(w, 3, axis=-1)),
        lambda xs: np.concatenate([x.reshape(tuple(lead) + (width,)) for x in xs], axis=-1),
    )


def _block_tensors(cfg, i: int, blk: tuple) -> list[Tensor]:
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


def tensor_map(cfg: model_config.ModelConfig) -> list[Tensor]:
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


def token_ids(hf: dict) -> dict:
    """The special token ids a HF config states (eos may be a list, as in LLaMA 3)."""
    return {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
