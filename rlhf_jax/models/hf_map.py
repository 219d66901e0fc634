"""Hugging Face <-> ours, per model family: the name and layout of every tensor.

This module owns the table (`tensor_map`) that names every HF tensor of a model with the params
of ours it holds and the reshapes/transposes between the two layouts, for the GPT-2 family and
the LLaMA family (llama, mistral, qwen2, qwen3, gemma2, gemma3_text). What `config.json` means
is hf_config.py's; its public names are re-exported here, so callers use one module. It is pure
(dicts and numpy, no files, no devices); reading and writing safetensors directories lives in
hf.py.

Layouts. HF GPT-2 uses Conv1D weights stored [in, out] (q/k/v fused in `c_attn` [D, 3D]); HF
LLaMA uses nn.Linear weights stored [out, in]. Ours: q [D, N, H], k/v [D, K, H], o [N, H, D],
mlp up/gate [D, F], down [F, D], embed [V, D], lm_head [D, V], score_head [D]. HF LLaMA q/k rows
are already in the half-split ("rotate_half") RoPE layout that `model.rope` implements, so no
permutation is needed. Gemma's (1 + w) norm weights are stored as w, as ours are; q/k norms
(Qwen3, Gemma 3) are one [H] scale shared by every head.

Norm names: LLaMA's `post_attention_layernorm` is the pre-MLP norm (our ln2); in Gemma 2/3 it is
the attention branch's output norm (our post1), and `pre_feedforward_layernorm` is ln2.

Scalar heads (reward / value models) map to `*ForSequenceClassification` with num_labels=1: the
backbone as the base model and `score_head` as `score.weight` [1, D]. HF reads the score at the
last token that is not `pad_token_id`, which is our last-real-token read-out when the pad id never
occurs as a real token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from rlhf_jax.models import config as model_config
from rlhf_jax.models.hf_config import (  # noqa: F401  (re-exported: callers use hf_map)
    LLAMA_TYPES,
    MODEL_TYPES,
    ROPE_SCALINGS,
    config_from_hf,
    config_to_hf,
    token_ids,
)

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
