"""Train state: the model and optimizer built abstractly and born sharded.

A train state is a plain dict pytree `{"step": int32 [], "params": pure dict, "opt_state": optax
state}`; the model's `graphdef` is static and bound into steps with `functools.partial`. Params
are created inside a jitted init whose `out_shardings` are the target shardings, so no device
ever holds the whole model.

With LoRA (`ModelConfig.lora_rank` > 0, models/lora.py) "params" is still the whole model, but
only its trainable part (adapters and scalar heads, `lora.split_trainable`) has gradients and
optimizer state: `opt_state` is built over that part, `apply_gradients` updates only it, and
the frozen base is held in `lora_base_dtype`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlhf_jax.infra import sharding
from rlhf_jax.models import config as model_config
from rlhf_jax.models import lora
from rlhf_jax.models import transformer as model_lib


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 6e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables


def lr_schedule(cfg: OptimConfig):
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
    warmup = max(cfg.warmup_steps, 0)
    decay = max(cfg.total_steps - warmup, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.lr,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=warmup + decay,
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


@functools.lru_cache(maxsize=32)
def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay only on matrices (not norms or biases).
    One object per OptimConfig in a process, so a step jitted with it is found again
    (infra/compiled.py)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(
            lr_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


def param_shardings(model_cfg: model_config.ModelConfig, mesh, rules):
    """(graphdef, abstract params, their NamedShardings).

    Memoised per (config, mesh, rules): building the model abstractly traces its constructor
    (about 0.1 s for any size), and a pipeline asks for the same few models a hundred times
    (every restore, sampler, scorer and step). The dicts returned are fresh copies, so a caller
    that edits one cannot change another's."""
    rules = sharding.normalize_rules(rules) if rules is not None else None
    graphdef, abstract_params, shardings = _param_shardings(model_cfg, mesh, rules)
    copy = lambda tree: jax.tree.map(lambda x: x, tree)
    return graphdef, copy(abstract_params), copy(shardings)


@functools.lru_cache(maxsize=64)
def _param_shardings(model_cfg, mesh, rules):
    graphdef, abstract_params, axes = model_lib.abstract(model_cfg)
    shardings = sharding.tree_shardings(axes, abstract_params, mesh, rules)
    held = lambda a: jax.ShapeDtypeStruct(a.shape, base_dtype(model_cfg))  # noqa: E731
    return graphdef, hold_base(model_cfg, abstract_params, held), shardings


def base_dtype(model_cfg) -> jnp.dtype:
    """The dtype a LoRA model's frozen base is held in (`lora_base_dtype`, else param_dtype)."""
    return jnp.dtype(model_cfg.lora_base_dtype or model_cfg.param_dtype)


def hold_base(model_cfg, params, cast=None):
    """`params` with a LoRA model's frozen leaves cast to `base_dtype` (`cast(leaf)` does it;
    default `astype`); unchanged without LoRA. Trainable leaves keep param_dtype: they are the
    optimizer's master weights."""
    if not model_cfg.lora_rank:
        return params
    cast = cast or (lambda x: x.astype(base_dtype(model_cfg)))
    trainable, frozen = lora.split_lora(params)
    return lora.combine(trainable, jax.tree.map(cast, frozen))


def abstract_params(model_cfg, mesh, rules):
    """Abstract params (ShapeDtypeStruct with `.sharding`), e.g. a restore target."""
    _, abstract, shardings = param_shardings(model_cfg, mesh, rules)
    return with_sharding(abstract, shardings)


def with_sharding(abstract, shardings):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def opt_shardings(tx, abstract_params, param_shardings_, mesh):
    """(abstract optimizer state, its shardings). Leaves shaped like params (Adam moments)
    follow the params' sharding; everything else (counts) is replicated."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    o_shard = optax.tree_utils.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        param_shardings_,
        transform_non_params=lambda _: sharding.replicated(mesh),
    )
    return abstract_opt, o_shard


def abstract_train_state(model_cfg, tx, mesh, rules):
    """(graphdef, abstract state with `.sharding` on every leaf, state shardings). The optimizer
    state covers the trainable params only (all of them without LoRA)."""
    graphdef, abstract_params, p_shard = param_shardings(model_cfg, mesh, rules)
    abstract_opt, o_shard = opt_shardings(
        tx, lora.split_trainable(abstract_params)[0], lora.split_trainable(p_shard)[0], mesh
    )
    shardings = {"step": sharding.replicated(mesh), "params": p_shard, "opt_state": o_shard}
    abstract = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params,
        "opt_state": abstract_opt,
    }
    return graphdef, with_sharding(abstract, shardings), shardings


def init_params(model_cfg, seed: int, shardings):
    """Fresh params created directly in their sharded layout (a LoRA model's base held in
    `base_dtype`)."""

    def init():
        model = model_lib.Transformer(model_cfg, rngs=nnx.Rngs(params=seed))
        return hold_base(model_cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    return jax.jit(init, out_shardings=shardings)()


def lora_params(model_cfg, seed: int, shardings, base=None):
    """A LoRA model's params: `base` (params of `lora.base_config(model_cfg)`'s model, e.g.
    restored from init_from; None: that model's seeded init, the same values a run without LoRA
    starts from) with its frozen leaves held in `base_dtype`, plus fresh adapters (B = 0, so the
    model is its base). `base` is consumed: each leaf cast to another dtype is deleted, so the
    stored-dtype copy is never whole in memory beside the held one.

    Args:
      model_cfg: the LoRA model's config.
      seed: the init seed (adapters; the base too when `base` is None).
      shardings: the LoRA model's param shardings (`param_shardings`).
      base: sharded params of the base model, or None.
    """
    adapter_sh, base_sh = lora.split_adapters(shardings)
    if base is None:
        base = init_params(lora.base_config(model_cfg), seed, base_sh)

    def init_adapters():  # jit drops the base init it does not return
        model = model_lib.Transformer(model_cfg, rngs=nnx.Rngs(params=seed))
        return lora.split_adapters(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]

    adapters = jax.jit(init_adapters, out_shardings=adapter_sh)()
    dtype = base_dtype(model_cfg)

    def cast(x):
        if x.dtype == dtype:
            return x
        y = x.astype(dtype)  # keeps x's sharding
        x.delete()
        return y

    return lora.combine(adapters, hold_base(model_cfg, base, cast))


def init_opt_state(tx, params, shardings):
    """The optimizer state of `params`' trainable part (`lora.split_trainable`)."""
    return jax.jit(tx.init, out_shardings=shardings)(lora.split_trainable(params)[0])


def create_train_state(model_cfg, tx, mesh, rules, seed: int, params=None):
    """Builds a sharded train state; `params` (already sharded) replaces the random init. For a
    LoRA model `params` is its base (`lora_params`), to which fresh adapters are added.

    Returns:
      (graphdef, state dict, state shardings).
    """
    graphdef, _, shardings = abstract_train_state(model_cfg, tx, mesh, rules)
    if model_cfg.lora_rank:
        params = lora_params(model_cfg, seed, shardings["params"], base=params)
    elif params is None:
        params = init_params(model_cfg, seed, shardings["params"])
    opt_state = init_opt_state(tx, params, shardings["opt_state"])
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return graphdef, {"step": step, "params": params, "opt_state": opt_state}, shardings


def apply_gradients(tx, grads, params, opt_state):
    """One optimizer update: `grads` are those of `params`' trainable part (what
    `accumulate.accumulate` and `value_and_grad_trainable` return); the frozen part passes
    through untouched. Returns (new params, new opt_state)."""
    trainable, frozen = lora.split_trainable(params)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return lora.combine(optax.apply_updates(trainable, updates), frozen), opt_state


def value_and_grad_trainable(fn):
    """`jax.value_and_grad(fn, has_aux=True)` over the trainable part of fn's first argument
    (the params): (value, aux), grads of the trainable leaves only, so no gradient of the frozen
    base is ever computed or held."""

    def wrapped(params, *args):
        trainable, frozen = lora.split_trainable(params)
        grad_fn = jax.value_and_grad(lambda t, *a: fn(lora.combine(t, frozen), *a), has_aux=True)
        return grad_fn(trainable, *args)

    return wrapped


def merge(graphdef, params):
    """The NNX module for `params` (call at the top of a jitted step)."""
    return nnx.merge(graphdef, params)
