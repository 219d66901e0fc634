"""LoRA: low-rank adapters on the model's projections, and which params a LoRA model trains.

A projection y = x W (W [*in, *out], e.g. q's [D, N, H]) with an adapter computes
  y = x W + ((x A) B) * alpha / r,    A [*in, r], B [r, *out]
(Hu et al. 2021). A starts as PEFT's kaiming-uniform, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and B
at 0, so a fresh adapter leaves the model exactly its base. The embedding's adapter reads rows:
x = embed[tokens] + (A[tokens] B) * alpha / r, A [V, r] ~ N(0, 1) (a one-hot input has no fan-in
to scale by; PEFT draws the embedding's factor from N(0, 1) too); a tied head unembeds with the
adapted matrix as well, so merging `embed + A B alpha / r` gives the same model. A and B carry
logical axes like every param: A the base's input axes then "lora_rank", B "lora_rank" then the
base's output axes, so each shards as its base does along the base's axes and is replicated
along the rank.

An adapter is the module `<param>_lora` beside the param it adapts (`attn.q_lora` next to
`attn.q`, `lm_head_lora` next to `lm_head`), holding `a` and `b`; that naming is how the helpers
below find adapters and their bases in a params tree (a pure dict, as `nnx.split` gives it).

What trains: a params tree holding adapters trains them and the scalar heads (`score_head`,
`score_bias`: the RM's score head, PPO's value head) and nothing else; a tree without adapters
trains everything. The rule reads the tree's structure only, so it is static inside jit and
needs no flag threaded through the steps.

Dimension glossary as in transformer.py; r the adapter rank.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from rlhf_jax.models.config import LORA_FIELDS, ModelConfig

SUFFIX = "_lora"
HEADS = ("score_head", "score_bias")  # trained beside the adapters (RM score, PPO value)


class Adapter(nnx.Module):
    """The low-rank update of one projection: x [..., *in] -> [..., *out]."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, in_shape, in_axes, out_shape, out_axes,
                 rows: bool = False):  # fmt: skip
        """`rows`: x is token ids [...] picking rows of A (the embedding) instead of features."""
        r = cfg.lora_rank
        dtype = jnp.dtype(cfg.param_dtype)
        key = rngs.params()
        if rows:
            a = jax.random.normal(key, (*in_shape, r), dtype)
        else:
            bound = 1.0 / math.sqrt(math.prod(in_shape))
            a = jax.random.uniform(key, (*in_shape, r), dtype, -bound, bound)
        self.a = nnx.Param(a, axes=(*in_axes, "lora_rank"))
        self.b = nnx.Param(jnp.zeros((r, *out_shape), dtype), axes=("lora_rank", *out_axes))
        self.scale = cfg.lora_alpha / r
        self.n_in = len(in_shape)
        self.rows = rows

    def __call__(self, x, dtype):
        """The update ((x A) B) * alpha / r in `dtype`; x [..., *in] (ids [...] with `rows`)."""
        a = self.a[...].astype(dtype)
        if self.rows:
            h = jnp.take(a, x, axis=0)  # [..., r]
        else:
            n = self.n_in
            h = jnp.tensordot(x, a, axes=(tuple(range(x.ndim - n, x.ndim)), tuple(range(n))))
        return jnp.tensordot(h, self.b[...].astype(dtype), axes=1) * jnp.asarray(self.scale, dtype)


def adapter(cfg: ModelConfig, rngs, target: str, in_shape, in_axes, out_shape, out_axes,
            rows: bool = False):  # fmt: skip
    """An Adapter for `target` when the model adapts it, else None (the attribute then holds
    nothing and the params tree has no entry)."""
    if not cfg.lora_on(target):
        return None
    return Adapter(cfg, rngs, in_shape, in_axes, out_shape, out_axes, rows)


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The model the adapters sit on: `cfg` without LoRA (what `init_from` stores, what a
    reference or reward model is)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return dataclasses.replace(cfg, **{k: defaults[k] for k in LORA_FIELDS})


def _key(k) -> str:
    return str(getattr(k, "key", k))


def is_adapter(path) -> bool:
    """Whether a key path (tuple of dict keys) lies inside an adapter."""
    return any(_key(k).endswith(SUFFIX) for k in path)


def is_head(path) -> bool:
    return bool(path) and _key(path[-1]) in HEADS


def _partition(tree, pred, path=()):
    """(leaves where pred(path), the rest), both nested dicts like `tree`, empty dicts pruned."""
    yes, no = {}, {}
    for k, v in tree.items():
        p = (*path, k)
        if isinstance(v, dict):
            a, b = _partition(v, pred, p)
            if a:
                yes[k] = a
            if b:
                no[k] = b
        elif pred(p):
            yes[k] = v
        else:
            no[k] = v
    return yes, no


def has_adapters(tree) -> bool:
    return bool(_partition(tree, is_adapter)[0])


def split_adapters(tree):
    """(adapters, everything else) of a params-shaped tree."""
    return _partition(tree, is_adapter)


def split_trainable(tree):
    """(trainable, frozen) of a params-shaped tree (params, their shardings, abstract arrays):
    with adapters, the adapters and heads train; without, everything does (frozen is {})."""
    if not has_adapters(tree):
        return tree, {}
    return split_lora(tree)


def split_lora(tree):
    """(trainable, frozen) as a LoRA model splits them, whether or not `tree` holds its
    adapters yet (a base about to get them: its heads train, the rest is frozen)."""
    return _partition(tree, lambda p: is_adapter(p) or is_head(p))


def combine(a, b):
    """The union of two trees with disjoint leaves (the inverse of the splits)."""
    if not b:
        return a
    if not a:
        return b
    out = dict(a)
    for k, v in b.items():
        out[k] = combine(out[k], v) if k in out else v
    return out


def adapters_off(params):
    """`params` with every B zeroed: the model computes exactly its base (x A 0 = 0), with no
    gradient to anything. The frozen-base reference a LoRA policy shares (DPO, KTO)."""

    def off(path, x):
        if is_adapter(path) and _key(path[-1]) == "b":
            return jnp.zeros_like(x)
        return jax.lax.stop_gradient(x)

    return jax.tree_util.tree_map_with_path(off, params)


def merge(cfg: ModelConfig, params):
    """The params of `base_config(cfg)`'s model with every adapter of `params` folded in:
    W' = W + (A B) * alpha / r in float32 at HIGHEST precision (the merged model keeps float32
    wherever an adapter touched it; other leaves keep their dtype)."""
    scale = cfg.lora_alpha / cfg.lora_rank if cfg.lora_rank else 0.0

    def fold(tree, stacked):
        out = {}
        for k, v in tree.items():
            if _key(k).endswith(SUFFIX):
                continue
            if isinstance(v, dict):
                out[k] = fold(v, stacked or _key(k) == "layers")
                continue
            ad = tree.get(f"{_key(k)}{SUFFIX}")
            if ad is None:
                out[k] = v
                continue
            prod = lambda a, b: jnp.tensordot(  # noqa: E731
                a, b, axes=1, precision=jax.lax.Precision.HIGHEST
            )
            a, b = ad["a"].astype(jnp.float32), ad["b"].astype(jnp.float32)
            delta = jax.vmap(prod)(a, b) if stacked else prod(a, b)  # [L?, *in, *out]
            out[k] = v.astype(jnp.float32) + delta * scale
        return out

    return fold(params, False)
