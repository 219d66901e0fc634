"""Hugging Face <-> ours, per model family: config.json fields and the name/layout of every tensor.

This module owns the mapping between a Hugging Face `config.json` and our `ModelConfig`, for the
GPT-2 family (`model_type` gpt2) and the LLaMA family (llama, mistral, qwen2, qwen3, gemma2,
gemma3_text: our llama family with the flags `config.VARIANTS` names), and the table
(`tensor_map`) that names every HF tensor of a model with the params of ours it holds and the
reshapes/transposes between the two layouts. It is pure (dicts and numpy, no files, no devices);
reading and writing safetensors directories lives in hf.py.

Layouts. HF GPT-2 uses Conv1D weights stored [in, out] (q/k/v fused in `c_attn` [D, 3D]); HF
LLaMA uses nn.Linear weights stored [out, in]. Ours: q [D, N, H], k/v [D, K, H], o [N, H, D],
mlp up/gate [D, F], down [F, D], embed [V, D], lm_head [D, V], score_head [D]. HF LLaMA q/k rows
are already in the half-split ("rotate_half") RoPE layout that `model.rope` implements, so no
permutation is needed. Gemma's (1 + w) norm weights are stored as w, as ours are.

Norm names: LLaMA's `post_attention_layernorm` is the pre-MLP norm (our ln2); in Gemma 2/3 it is
the attention branch's output norm (our post1), and `pre_feedforward_layernorm` is ln2.

Export picks the architecture whose fixed flags (`config.VARIANTS`) equal the config's, and
refuses one line where no transformers architecture computes what the config describes (e.g. a
Gemma 3 RoPE split on a Qwen3 model, or a per-layer window pattern on Mistral).

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

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
MODEL_TYPES = ("gpt2",) + LLAMA_TYPES
# model_type -> the flag set of config.VARIANTS it fixes, and the transformers class stem.
_VARIANT = dict(llama="llama", mistral="llama", qwen2="qwen2", qwen3="qwen3", gemma2="gemma2") | {
    "gemma3_text": "gemma3"
}
_ARCH = dict(llama="Llama", mistral="Mistral", qwen2="Qwen2", qwen3="Qwen3", gemma2="Gemma2")
_ARCH["gemma3_text"] = "Gemma3"
# Fields a config.json may omit whose transformers default is not ours.
_HF_DEFAULTS = {
    "mistral": dict(sliding_window=4096),
    "gemma2": dict(
        tie_word_embeddings=True,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
    "gemma3_text": dict(tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096),
}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # all tanh-approximate
_WINDOWED = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
ROPE_SCALINGS = ("default", "linear", "llama3")  # rope types whose math we reproduce
_CFG_FIELDS = {f.name for f in dataclasses.fields(model_config.ModelConfig)}


# ----------------------------------------------------------------------------- config mapping


def _need(field: str, why: str) -> None:
    if field not in _CFG_FIELDS:
        raise ValueError(f"{why} needs model.ModelConfig.{field}, which this model.py lacks")


def _rope_fields(hf: dict, kind: str = "llama") -> dict:
    """RoPE theta and scaling from legacy (`rope_theta`, `rope_scaling`) or v5 `rope_parameters`.

    Gemma 3 keeps two: global layers' (`full_attention`, default base 1M, maybe scaled) and
    local layers' (`sliding_attention`, or legacy `rope_local_base_freq`, default 10k).
    """
    params = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta")
    out = {}
    if kind == "gemma3_text":
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise ValueError("config.json gemma3 rope scaling on sliding layers is not supported")
        out["rope_local_theta"] = float(
            local.get("rope_theta", hf.get("rope_local_base_freq") or 10000.0)
        )
        params = params.get("full_attention") or {}
        theta = theta or 1000000.0
    out["rope_theta"] = float(params.get("rope_theta", theta or 10000.0))
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


def _window_fields(kind: str, hf: dict, n_layers: int) -> dict:
    """sliding_window and window_pattern from `sliding_window` and the per-layer kinds
    (`layer_types`, or each architecture's older rule where a config predates it)."""
    window = hf.get("sliding_window")
    if kind in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        window = None  # Qwen ignores sliding_window unless use_sliding_window says otherwise
    if kind not in _WINDOWED or not window:
        return {}
    types = hf.get("layer_types")
    if types:
        unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
        if unknown or len(types) != n_layers:
            raise ValueError(
                f"config.json layer_types must be {n_layers} of sliding_attention / "
                f"full_attention{f', not {unknown[0]!r}' if unknown else ''}"
            )
        local = [t == "sliding_attention" for t in types]
    elif kind == "gemma2":
        local = [i % 2 == 0 for i in range(n_layers)]
    elif kind == "gemma3_text":
        every = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        local = [(i + 1) % every != 0 for i in range(n_layers)]
    elif kind in ("qwen2", "qwen3"):
        first = hf.get("max_window_layers", n_layers)
        local = [i >= first for i in range(n_layers)]
    else:  # mistral: every layer
        local = [True] * n_layers
    if not any(local):
        return {}
    kinds = "".join("L" if x else "G" for x in local)
    period = next(p for p in range(1, n_layers + 1) if kinds == (kinds[:p] * n_layers)[:n_layers])
    return {"sliding_window": int(window), "window_pattern": "" if all(local) else kinds[:period]}


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
    if kind == "gemma3":
        raise ValueError(
            "unsupported architecture: config.json model_type 'gemma3' is the vision-language "
            "Gemma3ForConditionalGeneration; import a text-only Gemma 3 (model_type gemma3_text)"
        )
    if kind not in MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture: config.json model_type is {kind!r}; expected one of "
            f"{MODEL_TYPES}"
        )
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in _GELU_TANH:
            raise ValueError(f"config.json activation_function {act!r} is not supported for gpt2")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise ValueError("config.json gpt2 attention scaling options are not supported")
        return
    gemma = kind.startswith("gemma")
    act = (
        hf.get("hidden_activation")
        or hf.get("hidden_act")
        or ("gelu_pytorch_tanh" if gemma else "silu")
    )
    if act not in (_GELU_TANH if gemma else ("silu", "swish")):
        raise ValueError(f"config.json hidden activation {act!r} is not supported for {kind}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"config.json attention_bias / mlp_bias ({kind}) are not supported")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("config.json use_bidirectional_attention is not supported (causal only)")


def config_from_hf(hf: dict, **overrides) -> model_config.ModelConfig:
    """Maps a parsed HF `config.json` to a ModelConfig; `overrides` set numerics (dtype, ...)."""
    kind = hf.get("model_type")
    _check_supported(kind, hf)
    hf = {**_HF_DEFAULTS.get(kind, {}), **hf}
    family = "gpt2" if kind == "gpt2" else "llama"
    fields = {"family": family, "head": "scalar" if _score_head(hf) else "lm"}
    for ours, key in _KEYS[family].items():
        if hf.get(key) is not None:
            fields[ours] = hf[key]
        elif key not in _OPTIONAL:
            raise ValueError(f"config.json has no field {key!r}")
    if family == "llama":
        fields.update(_rope_fields(hf, kind))
        fields.update(_window_fields(kind, hf, fields["n_layers"]))
        flags = model_config.VARIANTS[_VARIANT[kind]]
        for name in flags:
            _need(name, f"{kind}'s {name}")
        fields.update(flags)
    if kind.startswith("gemma"):
        head_dim = fields.get("head_dim") or fields["d_model"] // fields["n_heads"]
        scalar = int(hf["query_pre_attn_scalar"])
        fields.update(
            query_pre_attn_scalar=0 if scalar == head_dim else scalar,  # 0: 1 / sqrt(H)
            attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
            final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        )
    return model_config.ModelConfig(**fields, **overrides)


def _hf_kind(cfg: model_config.ModelConfig) -> str:
    """The HF model_type whose architecture computes what the llama-family `cfg` describes."""
    flags = {k for v in model_config.VARIANTS.values() for k in v}
    base = {f.name: f.default for f in dataclasses.fields(cfg) if f.name in flags}
    base["mlp"] = "swiglu"
    ours = {k: getattr(cfg, k) for k in flags}
    variant = next((n for n, v in model_config.VARIANTS.items() if ours == {**base, **v}), None)
    if variant is None:
        raise ValueError(
            f"no transformers architecture has this flag set ({ours}); export needs one of "
            f"config.VARIANTS"
        )
    kinds = cfg.layer_kinds()
    kind = next(k for k, v in _VARIANT.items() if v == variant)
    if variant == "llama" and any(kinds):
        if not all(kinds):
            raise ValueError("export: Mistral's sliding window covers every layer; set no pattern")
        kind = "mistral"
    gemma, gemma3 = kind.startswith("gemma"), kind == "gemma3_text"
    unsupported = [
        name
        for name, used, ok in (
            ("query_pre_attn_scalar", cfg.query_pre_attn_scalar, gemma),
            ("attn_softcap", cfg.attn_softcap, gemma),
            ("final_softcap", cfg.final_softcap, gemma),
            ("rope_local_theta", cfg.rope_local_theta, gemma3),
        )
        if used and not ok
    ]
    if gemma3 and not cfg.rope_local_theta and cfg.rope_scaling != "none" and any(kinds):
        unsupported.append("rope_scaling on local layers")
    if unsupported:
        raise ValueError(f"export: {kind} has no {unsupported[0]}; no transformers model matches")
    return kind


def _llama_fields(cfg: model_config.ModelConfig, kind: str) -> dict:
    """RoPE, activation, window and Gemma fields of a llama-family config.json."""
    scaling = None
    if cfg.rope_scaling != "none":
        scaling = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_factor}
        if cfg.rope_scaling == "llama3":
            scaling.update(
                low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_len,
            )
    # Legacy rope keys: transformers 4.x reads them and 5.x converts them.
    hf = dict(rope_theta=cfg.rope_theta, rope_scaling=scaling)
    if kind == "gemma3_text":  # the local layers' base; scaling applies to global layers only
        hf["rope_local_base_freq"] = cfg.rope_local_theta or cfg.rope_theta
    if kind != "qwen2":
        hf.update(attention_bias=False)
    if kind.startswith("gemma"):
        hf.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=int(cfg.query_pre_attn_scalar or cfg.head_dim),  # HF: an int
            attn_logit_softcapping=cfg.attn_softcap or None,
            final_logit_softcapping=cfg.final_softcap or None,
        )
    else:
        hf.update(hidden_act="silu", mlp_bias=False)
    kinds = cfg.layer_kinds()
    # Gemma builds a sliding mask whatever the layers: a window wider than every sequence.
    hf["sliding_window"] = cfg.sliding_window or (cfg.max_len if kind.startswith("gemma") else None)
    if kind in ("qwen2", "qwen3"):
        first = kinds.index(True) if any(kinds) else cfg.n_layers
        hf.update(use_sliding_window=any(kinds), max_window_layers=first)
    if kind != "mistral" and kind != "llama":
        hf["layer_types"] = ["sliding_attention" if x else "full_attention" for x in kinds]
    return hf


def config_to_hf(cfg: model_config.ModelConfig, token_ids: dict | None = None) -> dict:
    """The HF `config.json` dict for `cfg` (GPT2, Llama, Mistral, Qwen2/3, Gemma 2/3; LM or
    sequence classification).

    Args:
      cfg: the model config.
      token_ids: optional {"bos_token_id", "eos_token_id", "pad_token_id"}; a scalar head needs
        pad_token_id for HF to find each row's last real token.

    Raises:
      ValueError: no transformers architecture computes what `cfg` describes.
    """
    hf = {key: getattr(cfg, ours) for ours, key in _KEYS[cfg.family].items()}
    if cfg.family == "gpt2":
        if cfg.n_kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.d_model:
            raise ValueError("gpt2 export needs n_kv_heads == n_heads and head_dim == D / N")
        kind, arch = "gpt2", "GPT2"
        hf.update(activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        kind = _hf_kind(cfg)
        arch = _ARCH[kind]
        hf.update(_llama_fields(cfg, kind))
    hf["model_type"] = kind
    if cfg.head == "scalar":
        seq_cls = "Gemma3Text" if kind == "gemma3_text" else arch
        hf.update(
            architectures=[f"{seq_cls}ForSequenceClassification"],
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
    sandwich = cfg.sandwich_norms
    out = [
        _same(p + "input_layernorm.weight", blk + ("ln1", "scale"), (d,)),
        _matmul(p + "self_attn.q_proj.weight", a + ("q",), (d,), (n, h), False),
        _matmul(p + "self_attn.k_proj.weight", a + ("k",), (d,), (k, h), False),
        _matmul(p + "self_attn.v_proj.weight", a + ("v",), (d,), (k, h), False),
        _matmul(p + "self_attn.o_proj.weight", a + ("o",), (n, h), (d,), False),
        _same(
            p + "post_attention_layernorm.weight",
            blk + ("post1" if sandwich else "ln2", "scale"),
            (d,),
        ),
        _matmul(p + "mlp.gate_proj.weight", m + ("gate",), (d,), (f,), False),
        _matmul(p + "mlp.up_proj.weight", m + ("up",), (d,), (f,), False),
        _matmul(p + "mlp.down_proj.weight", m + ("down",), (f,), (d,), False),
    ]
    if sandwich:  # Gemma 2/3
        out.append(_same(p + "pre_feedforward_layernorm.weight", blk + ("ln2", "scale"), (d,)))
        out.append(_same(p + "post_feedforward_layernorm.weight", blk + ("post2", "scale"), (d,)))
    if cfg.qk_norm:  # Qwen3, Gemma 3: one [H] scale shared by every head
        for x in ("q", "k"):
            out.append(_same(p + f"self_attn.{x}_norm.weight", a + (f"{x}_norm", "scale"), (h,)))
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
