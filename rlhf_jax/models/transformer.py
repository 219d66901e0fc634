"""Decoder-only transformer, GPT-2 and LLaMA families, in Flax NNX used functionally.

This module owns attention, the block, the layer loop and the KV-cache layout; the norms, RoPE
and MLP variants are layers.py's, the model config and the size presets config.py's, and how
attention is computed (kernel choice, masks) is attention.py's. Stages
split the model once (`nnx.split`) and merge it inside their jitted pure steps; nothing here
builds a mesh or knows mesh axes: parameters carry *logical* axis names in their `axes` metadata
and activations are constrained through `sharding.constrain` with logical names. It stays one
piece: the blocks, the layer loop (unrolled or scanned) and the KV cache threaded through it are
read together.

Dimension glossary (used in names and `# [...]` comments):
  B batch, T query length, S key length (cache size), D d_model, F d_ff, N query heads,
  K key/value heads, H head dim, V vocab, L layers.

KV cache (explicit pytree, passed in and returned by `Transformer.__call__`):
  {"k": [L, B, S, K, H], "v": [L, B, S, K, H], "mask": [B, S] bool (slot holds a real token),
   "index": [] int32 (next slot to write)}
Every row writes at the same `index`; left padding is expressed through `mask`, so a row's
results do not depend on how much padding it carries. The rollout engine passes the paged form
instead (pages shared by rows through per-row page tables, each row at its own length): its
layout, writes and attention are paged.py's. A local (sliding-window) layer keeps every
slot too and masks keys more than `sliding_window` slots back: within a row, slots and positions
advance together, so the window in slots is the window in positions.

Local and global layers (`ModelConfig.layer_kinds`): unrolled, each block gets its kind as a
Python bool; scanned, the kinds ride along as a scanned [L] bool array, RoPE tables are picked
with `where` and the window with a `lax.cond` between two static windows (the fused kernels
take a static window only).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.infra import sharding
from rlhf_jax.models import attention, layers, lora, paged
from rlhf_jax.models.config import ModelConfig

# The per-position pieces live in layers.py; these names stay importable from here.
_dt = layers.dtype_of
_param = layers.param
Norm, MLP, rope, rope_frequencies = layers.Norm, layers.MLP, layers.rope, layers.rope_frequencies


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        out_std = 0.02 / math.sqrt(2 * cfg.n_layers)  # GPT-2's residual-projection scaling
        self.q = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg)
        self.k = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        self.v = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        self.o = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), cfg, std=out_std)
        if cfg.use_bias or cfg.qkv_bias:
            self.q_bias = _param(rngs, (n, h), ("heads", "head_dim"), cfg, init="zeros")
            self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), cfg, init="zeros")
            self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), cfg, init="zeros")
        if cfg.use_bias:
            self.o_bias = _param(rngs, (d,), ("norm",), cfg, init="zeros")
        if cfg.qk_norm:
            self.q_norm = Norm(cfg, rngs, dim=h)
            self.k_norm = Norm(cfg, rngs, dim=h)
        # LoRA adapters (models/lora.py), None where off; created after the base params.
        emb = ((d,), ("embed",))
        self.q_lora = lora.adapter(cfg, rngs, "q", *emb, (n, h), ("heads", "head_dim"))
        self.k_lora = lora.adapter(cfg, rngs, "k", *emb, (k, h), ("kv_heads", "head_dim"))
        self.v_lora = lora.adapter(cfg, rngs, "v", *emb, (k, h), ("kv_heads", "head_dim"))
        self.o_lora = lora.adapter(cfg, rngs, "o", (n, h), ("heads", "head_dim"), *emb)

    def _proj(self, name, spec, x, dt):
        """einsum(spec, x, W) for the param `name`, plus its adapter's update where it has one."""
        y = jnp.einsum(spec, x, getattr(self, name)[...].astype(dt))
        ad = getattr(self, f"{name}_lora")
        return y if ad is None else y + ad(x, dt)

    def __call__(self, x, positions, key_mask, kv, local=False):
        """x: [B, T, D]; positions: [B, T]; key_mask: [B, S] bool or None;
        kv: None, or (k_all [L, B, S, K, H], v_all, layer, index): write this layer's new keys
          and values at slot `index` of layer `layer`, then attend over that layer; with a paged
          cache (k_all, v_all the page pools, index `paged.index`'s dict) the same on pages;
        local: this layer attends a sliding window (a bool, or a traced bool when scanned).
        Returns (y [B, T, D], (k, v) written cache or None)."""
        cfg = self.cfg
        dt = _dt(cfg.dtype)
        q = self._proj("q", "btd,dnh->btnh", x, dt)
        k = self._proj("k", "btd,dkh->btkh", x, dt)
        v = self._proj("v", "btd,dkh->btkh", x, dt)
        if cfg.use_bias or cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if cfg.qk_norm:  # per head, before RoPE (Qwen3, Gemma 3)
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.family == "llama":
            freq = layers.layer_frequencies(cfg, local)  # [H/2]
            q = rope(q, positions, freq)
            k = rope(k, positions, freq)
        q = sharding.constrain(q, ("act_batch", "act_len", "act_heads", None))
        new_kv = None
        q_slot = None  # without a cache the queries are the keys (self-attention)
        pool = None
        if kv is not None and isinstance(kv[3], dict):  # a paged cache (paged.py)
            k_all, v_all, layer, index = kv
            new_kv = (paged.write(k_all, layer, k, index), paged.write(v_all, layer, v, index))
            pool = (*new_kv, layer, index)
        elif kv is not None:
            # Write this layer's new keys/values straight into the stacked [L, B, S, K, H]
            # buffers (in place under XLA: no per-step copy of the cache), then read the
            # layer back for attention.
            k_all, v_all, layer, index = kv
            start = (layer, 0, index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], start)
            v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], start)
            new_kv = (k_all, v_all)
            k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(dt)
            v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(dt)
            q_slot = index + jnp.arange(x.shape[1])  # cache slot of each query  [T]
        y = self._attend(q, k, v, q_slot, key_mask, local, pool)
        y = self._proj("o", "btnh,nhd->btd", y, dt)
        if cfg.use_bias:
            y = y + self.o_bias[...].astype(dt)
        return y, new_kv

    def _attend(self, q, k, v, q_slot, key_mask, local, pool=None):
        cfg = self.cfg
        if pool is None:
            attend = functools.partial(attention.attend, q, k, v, q_slot=q_slot, key_mask=key_mask)
        else:  # (k pool, v pool, layer, paged.index's dict)
            attend = functools.partial(paged.attend, q, *pool)
        attend = functools.partial(
            attend,
            impl=cfg.attention,
            softcap=cfg.attn_softcap or None,
            scale=cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else None,
        )
        window = cfg.sliding_window or None
        if window is None or isinstance(local, bool):
            return attend(window=window if local else None)
        # A scanned layer of a model with both kinds: one of two static windows, on device.
        return jax.lax.cond(local, lambda: attend(window=window), lambda: attend(window=None))


class Block(nnx.Module):
    """Pre-norm residual block; `sandwich_norms` also norms each branch's output (Gemma 2/3):
    x + post1(attn(ln1(x))), then + post2(mlp(ln2(.)))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.ln1 = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.ln2 = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        if cfg.sandwich_norms:
            self.post1 = Norm(cfg, rngs)
            self.post2 = Norm(cfg, rngs)
        self.sandwich = cfg.sandwich_norms

    def __call__(self, x, positions, key_mask, kv, local=False):
        y, new_kv = self.attn(self.ln1(x), positions, key_mask, kv, local)
        if self.sandwich:
            y = self.post1(y)
        x = x + y
        y = self.mlp(self.ln2(x))
        if self.sandwich:
            y = self.post2(y)
        x = x + y
        x = sharding.constrain(x, ("act_batch", "act_len", "act_embed"))
        return x, new_kv


def _run_block(graphdef, cfg: ModelConfig, local, layer_params, x, positions, key_mask, kv):
    """Applies one block given its params as a pytree (the unit that remat and scan wrap)."""
    return nnx.merge(graphdef, layer_params)(x, positions, key_mask, kv, local)


def _remat(fn, cfg: ModelConfig):
    if cfg.remat == "full":
        return jax.checkpoint(fn)
    if cfg.remat == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return fn


class Transformer(nnx.Module):
    """The decoder. `__call__` returns (logits [B, T, V] or hidden [B, T, D], new cache)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        v, d = cfg.vocab_size, cfg.d_model
        self.embed = _param(rngs, (v, d), ("vocab", "embed"), cfg)
        if cfg.family == "gpt2":
            self.pos_embed = _param(rngs, (cfg.max_len, d), ("pos", "embed"), cfg, std=0.01)
        if cfg.scan_layers:
            # One stacked Block whose params carry a leading [L] axis ("layers").
            @nnx.split_rngs(splits=cfg.n_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(cfg, rngs)

            self.layers = make(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = Norm(cfg, rngs)
        if cfg.head == "scalar":
            # Reward / value head: a linear read-out of the final hidden state. Zero-initialised
            # so a fresh head starts from scores of 0 rather than noise.
            self.score_head = _param(rngs, (d,), ("embed",), cfg, init="zeros")
            self.score_bias = _param(rngs, (), (), cfg, init="zeros")
        elif not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (d, v), ("embed", "vocab"), cfg)
        # LoRA (models/lora.py): the embedding's adapter picks rows of A by token id; a tied head
        # unembeds with the adapted embedding too. "head" adapts an untied LM head only.
        self.embed_lora = lora.adapter(cfg, rngs, "embed", (v,), ("vocab",), (d,), ("embed",),
                                       rows=True)  # fmt: skip
        lm = cfg.head == "lm" and not cfg.tie_embeddings
        self.lm_head_lora = (
            lora.adapter(cfg, rngs, "head", (d,), ("embed",), (v,), ("vocab",)) if lm else None
        )

    def __call__(
        self, tokens, *, positions=None, key_mask=None, cache=None, return_hidden: bool = False
    ):
        """Forward pass.

        Args:
          tokens: [B, T] int32.
          positions: [B, T] int32 position ids; default 0..T-1 (or index.. with a cache).
          key_mask: [B, T] bool, False at padding. Without a cache it masks the keys of this
            call; with a cache it is written into the cache's mask at the slots being filled.
            Or, for packed rows (no cache), int32 segment ids: 0 at padding, each example its
            own k > 0, attention confined to a segment (models/attention.py); give `positions`
            restarting at 0 per segment (data/packing.py builds both).
          cache: None, or the KV-cache pytree described in the module docstring, or the paged
            one (paged.py; give `positions`: each row continues at its own length).
          return_hidden: return the final normed hidden states [B, T, D] float32 instead of
            logits, for a caller that needs the head at a few positions only: slice the hidden
            states, then `unembed` them (PPO's response positions, the sampler's prefill).

        Returns:
          (logits [B, T, V] float32, or scores [B, T] float32 for a scalar head, or hidden
           [B, T, D] float32; the updated cache or None).
        """
        cfg = self.cfg
        dt = _dt(cfg.dtype)
        b, t = tokens.shape
        is_paged = paged.is_paged(cache)
        if cache is not None and attention.is_segments(key_mask):
            raise ValueError("segment ids (packed rows) are for a forward without a KV cache")
        if positions is None:
            start = (
                0 if cache is None else cache["lengths"][:, None] if is_paged else cache["index"]
            )
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)  # [B, T, D]
        if self.embed_lora is not None:
            x = x + self.embed_lora(tokens, dt)
        if cfg.embed_scale:  # sqrt(D) rounded to the compute dtype, as Gemma computes it
            x = x * jnp.asarray(math.sqrt(cfg.d_model), dt)
        if cfg.family == "gpt2":
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
        x = sharding.constrain(x, ("act_batch", "act_len", "act_embed"))

        attn_mask = key_mask
        index = None  # what each layer's cache write needs
        if is_paged:
            index = paged.index(
                cache, positions, jnp.ones((b, t), bool) if key_mask is None else key_mask
            )
        elif cache is not None:
            index = cache["index"]
            new_mask = key_mask if key_mask is not None else jnp.ones((b, t), bool)
            attn_mask = jax.lax.dynamic_update_slice_in_dim(cache["mask"], new_mask, index, 1)

        kinds = cfg.layer_kinds()  # per layer: local (sliding window) or global
        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)
            mixed = len(set(kinds)) > 1

            # The cache rides in the carry (not xs/ys) so each layer updates it in place.
            def body(carry, layer):
                x, kvs = carry
                params, i, local = layer
                step = functools.partial(_run_block, graphdef, cfg, local if mixed else kinds[0])
                kv = None if kvs is None else (*kvs, i, index)
                x, new_kv = _remat(step, cfg)(params, x, positions, attn_mask, kv)
                return (x, new_kv), None

            kvs = None if cache is None else (cache["k"], cache["v"])
            xs = (stacked, jnp.arange(cfg.n_layers, dtype=jnp.int32), jnp.asarray(kinds))
            (x, new_kvs), _ = jax.lax.scan(body, (x, kvs), xs)
        else:
            new_kvs = None if cache is None else (cache["k"], cache["v"])
            for i, block in enumerate(self.blocks):
                graphdef, params = nnx.split(block)
                step = _remat(functools.partial(_run_block, graphdef, cfg, kinds[i]), cfg)
                kv = None if cache is None else (*new_kvs, i, index)
                x, layer_kv = step(params, x, positions, attn_mask, kv)
                if cache is not None:
                    new_kvs = layer_kv

        # The head reads the final norm in float32 (no bf16 rounding between them): log-probs
        # and scores are computed from float32 logits on every path.
        x = self.final_norm(x, out_dtype=jnp.float32)
        new_cache = None
        if is_paged:
            new_cache = {**cache, "k": new_kvs[0], "v": new_kvs[1], "lengths": index["kv_len"]}
        elif cache is not None:
            new_cache = {
                "k": new_kvs[0],
                "v": new_kvs[1],
                "mask": attn_mask,
                "index": cache["index"] + t,
            }
        if return_hidden:
            return x, new_cache
        if cfg.head == "scalar":
            scores = head_matmul(x, self.score_head[...]) + self.score_bias[...]
            return scores, new_cache  # [B, T] float32
        return self.unembed(x), new_cache

    def unembed(self, x):
        """Logits [B, T, V] float32 from final hidden states x [B, T, D] (`return_hidden`).

        The head runs in float32 whatever the compute dtype: bf16 logits carry a rounding error
        of ~1e-2 nats at typical logit sizes, which would reach every log-prob (PPO's ratio and
        KL, the LM loss, likelihoods). Operands and result are float32 and the matmul asks for
        HIGHEST precision (`head_matmul`): the backend default is one bf16 pass on TPU and TF32
        on recent GPUs, which would make the "float32 head" a bf16/TF32 one. Slicing x first
        (e.g. to the response positions) computes only those logits.
        """
        w = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]  # [D, V]
        logits = head_matmul(x, w)
        # LoRA updates of the head, in the head's float32: an untied head's own adapter
        # x A B, or a tied head's embedding adapter x (A B).T = (x B.T) A.T (A [V, r], B [r, D]).
        ad = self.embed_lora if self.cfg.tie_embeddings else self.lm_head_lora
        if ad is not None:
            a, b = ad.a[...], ad.b[...]
            if self.cfg.tie_embeddings:
                a, b = b.T, a.T  # [D, r], [r, V]
            logits = logits + head_matmul(head_matmul(x, a), b) * ad.scale
        if cap := self.cfg.final_softcap:  # Gemma 2: every path's logits and log-probs see it
            logits = cap * jnp.tanh(logits / cap)
        return sharding.constrain(logits, ("act_batch", "act_len", "act_vocab"))


def head_matmul(x, w):
    """x [..., D] @ w [D] or [D, V] in float32 at HIGHEST precision: every head (unembedding,
    reward/value score) and every log-prob path that multiplies by the head goes through here, so
    TPU (default: one bf16 pass) and GPU (default: TF32) compute the same float32 head as CPU."""
    return jnp.matmul(
        x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for `batch` rows and `max_len` slots (see module docstring)."""
    dtype = _dt(dtype or cfg.dtype)
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "mask": jnp.zeros((batch, max_len), bool),
        "index": jnp.zeros((), jnp.int32),
    }


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Builds a model with concrete parameters (tests, small models). Stages use `state.py`."""
    return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig):
    """(graphdef, abstract params pure dict of ShapeDtypeStruct, logical axes pytree)."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))
    graphdef, params = nnx.split(model, nnx.Param)
    axes: dict = {}
    for path, var in nnx.to_flat_state(params):
        node = axes
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = _axes_of(var)
    return graphdef, nnx.to_pure_dict(params), axes


def _axes_of(var: nnx.Variable) -> tuple:
    axes = tuple(var.get_metadata().get("axes", ()))
    ndim = len(var.shape)
    if ndim == len(axes) + 1:  # stacked by scan_layers
        axes = ("layers",) + axes
    if ndim != len(axes):
        raise ValueError(f"param of shape {var.shape} has logical axes {axes}")
    return axes


def param_count(params, cfg: ModelConfig | None = None, *, exclude_positions: bool = False) -> int:
    """Number of parameters; `exclude_positions` drops GPT-2's position table (as in 6N FLOPs)."""
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    if exclude_positions and cfg is not None and cfg.family == "gpt2":
        n -= cfg.max_len * cfg.d_model
    return n
