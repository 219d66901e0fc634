"""The per-position pieces of a block: parameters, norms, RoPE and the MLP variants.

This module owns the math that differs between architectures but never looks across positions:
LayerNorm / RMSNorm / Gemma's (1 + w) RMSNorm, the rotary embedding with its context scaling and
per-layer bases, and the GELU / SwiGLU / GeGLU MLPs. It is split from transformer.py (attention,
the block, the layer loop and the KV cache, read together) so that file stays one readable piece
as the variants grow; transformer.py re-exports `Norm`, `MLP`, `rope` and `rope_frequencies`.

Dimension glossary as in transformer.py: B batch, T length, D d_model, F d_ff, N heads, H head
dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.infra import sharding
from rlhf_jax.models import lora
from rlhf_jax.models.config import ModelConfig


def dtype_of(name: str):
    return jnp.dtype(name)


def param(rngs, shape, axes, cfg, std=0.02, init="normal"):
    """An `nnx.Param` with logical axis names; `init` is normal(std), zeros or ones."""
    dtype = dtype_of(cfg.param_dtype)
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        raise ValueError(f"unknown init: {init!r}")
    return nnx.Param(value, axes=axes)


class Norm(nnx.Module):
    """LayerNorm (gpt2) or RMSNorm (llama) over the last `dim` (default D), in float32.

    With `norm_plus_one` the RMSNorm scale is (1 + w) and w starts at 0 (Gemma), the form
    Gemma checkpoints store.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dim: int | None = None):
        dim = dim or cfg.d_model
        self.rms = cfg.family == "llama"
        self.plus_one = self.rms and cfg.norm_plus_one
        self.eps = cfg.norm_eps
        init = "zeros" if self.plus_one else "ones"
        self.scale = param(rngs, (dim,), ("norm",), cfg, init=init)
        self.bias = None if self.rms else param(rngs, (dim,), ("norm",), cfg, init="zeros")

    def __call__(self, x, out_dtype=None):
        """Normalises x [..., dim]; the result has `out_dtype` (default: x's dtype)."""
        dtype = x.dtype if out_dtype is None else out_dtype
        x = x.astype(jnp.float32)
        scale = self.scale[...].astype(jnp.float32)
        if self.rms:
            x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
            return (x * (1.0 + scale if self.plus_one else scale)).astype(dtype)
        mean = jnp.mean(x, -1, keepdims=True)
        x = x - mean
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
        return (x * scale + self.bias[...]).astype(dtype)


def rope_frequencies(cfg: ModelConfig, local: bool = False):
    """Inverse frequencies [H/2] of the rotary embedding of a global or a local layer.

    Global layers (and every layer unless `rope_local_theta` is set) use `rope_theta` with the
    configured context scaling; local layers with `rope_local_theta` use that base unscaled
    (Gemma 3: 10k locally, 1M globally, scaling on global layers only).
    """
    h = cfg.head_dim
    exponent = -jnp.arange(0, h, 2, dtype=jnp.float32) / h
    if local and cfg.rope_local_theta:
        return cfg.rope_local_theta**exponent
    freq = cfg.rope_theta**exponent  # [H/2]
    if cfg.rope_scaling == "linear":
        return freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        # Llama 3.1: long wavelengths are stretched by `factor`, short ones kept, and the band
        # between interpolates smoothly (in wavelength measured against the original context).
        wavelen = 2 * jnp.pi / freq
        ratio = cfg.rope_original_max_len / wavelen
        lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        smooth = jnp.clip((ratio - lo) / (hi - lo), 0.0, 1.0)
        return (1 - smooth) * freq / cfg.rope_factor + smooth * freq
    return freq


def layer_frequencies(cfg: ModelConfig, local):
    """`rope_frequencies` of a layer whose kind `local` is a Python bool or, for scanned layers,
    a traced bool scalar (then both tables are built and one is picked on device)."""
    if isinstance(local, bool) or not cfg.rope_local_theta:
        return rope_frequencies(cfg, bool(local) if isinstance(local, bool) else False)
    return jnp.where(local, rope_frequencies(cfg, True), rope_frequencies(cfg, False))


def rope(x, positions, freq):
    """Rotary embedding, half-split layout (as LLaMA checkpoints store q/k).

    x: [B, T, N, H]; positions: [B, T]; freq: [H/2] from `rope_frequencies`.
    """
    angle = positions[..., None].astype(jnp.float32) * freq  # [B, T, H/2]
    cos = jnp.cos(angle)[:, :, None, :]
    sin = jnp.sin(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class MLP(nnx.Module):
    """gelu: down(gelu(up x)) (GPT-2, with biases); swiglu: down(silu(gate x) * up x) (LLaMA);
    geglu: down(gelu_tanh(gate x) * up x) (Gemma)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = cfg.d_model, cfg.d_ff
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)  # GPT-2's residual-projection scaling
        self.up = param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.down = param(rngs, (f, d), ("mlp", "embed"), cfg, std=out_std)
        if cfg.mlp_kind != "gelu":
            self.gate = param(rngs, (d, f), ("embed", "mlp"), cfg)
        if cfg.use_bias:
            self.up_bias = param(rngs, (f,), ("mlp",), cfg, init="zeros")
            self.down_bias = param(rngs, (d,), ("norm",), cfg, init="zeros")
        # LoRA adapters (models/lora.py), None where off; created after the base params.
        self.up_lora = lora.adapter(cfg, rngs, "up", (d,), ("embed",), (f,), ("mlp",))
        self.down_lora = lora.adapter(cfg, rngs, "down", (f,), ("mlp",), (d,), ("embed",))
        gated = cfg.mlp_kind != "gelu"
        self.gate_lora = (
            lora.adapter(cfg, rngs, "gate", (d,), ("embed",), (f,), ("mlp",)) if gated else None
        )

    def _proj(self, name, x, dt):
        """x @ W for the param `name`, plus its adapter's update where it has one."""
        y = x @ getattr(self, name)[...].astype(dt)
        ad = getattr(self, f"{name}_lora")
        return y if ad is None else y + ad(x, dt)

    def __call__(self, x):  # [B, T, D]
        cfg = self.cfg
        dt = dtype_of(cfg.dtype)
        h = self._proj("up", x, dt)  # [B, T, F]
        if cfg.use_bias:
            h = h + self.up_bias[...].astype(dt)
        if cfg.mlp_kind == "swiglu":
            h = jax.nn.silu(self._proj("gate", x, dt)) * h
        elif cfg.mlp_kind == "geglu":
            h = jax.nn.gelu(self._proj("gate", x, dt), approximate=True) * h
        else:
            h = jax.nn.gelu(h, approximate=True)
        h = sharding.constrain(h, ("act_batch", "act_len", "act_mlp"))
        y = self._proj("down", h, dt)
        if cfg.use_bias:
            y = y + self.down_bias[...].astype(dt)
        return y
