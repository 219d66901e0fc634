"""Hugging Face `config.json` <-> our `ModelConfig`, per model family, in both directions.

This module owns what a `config.json` means to us: the GPT-2 family (`model_type` gpt2) and the
LLaMA family (llama, mistral, qwen2, qwen3, gemma2, gemma3_text: our llama family with the flags
`config.VARIANTS` names), the options we refuse because the model does not compute them, the
defaults a config.json may omit, RoPE fields (legacy keys and v5 `rope_parameters`, Gemma 3's
two bases) and per-layer sliding windows (`layer_types` or each architecture's older rule). It
is pure (dicts only). The tensor names and layouts are hf_map.py's, which re-exports this
module's public names; it was split from there as the families grew.

Export picks the architecture whose fixed flags (`config.VARIANTS`) equal the config's, and
refuses one line where no transformers architecture computes what the config describes (e.g. a
Gemma 3 RoPE split on a Qwen3 model, or a per-layer window pattern on Mistral).

Scalar heads (reward / value models) map to `*ForSequenceClassification` with num_labels=1.
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.models import config as model_config

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
MODEL_TYPES = ("gpt2",) + LLAMA_TYPES
# model_type -> the flag set of config.VARIANTS it fixes, and the transformers class stem.
_VARIANT = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
_ARCH = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma2": "Gemma2",
    "gemma3_text": "Gemma3",
}
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
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_SCALINGS:
        raise ValueError(
            f"config.json rope scaling type {rope_type!r} is not supported; expected one of "
            f"{ROPE_SCALINGS}"
        )
    if rope_type != "default":
        _need("rope_scaling", f"rope scaling {rope_type!r}")
        out.update(rope_scaling=rope_type, rope_factor=float(scaling["factor"]))
    if rope_type == "llama3":
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
    ours = {k: getattr(cfg, k) for k in flags} | {"mlp": cfg.mlp_kind}
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


def token_ids(hf: dict) -> dict:
    """The special token ids a HF config states (eos may be a list, as in LLaMA 3)."""
    return {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
