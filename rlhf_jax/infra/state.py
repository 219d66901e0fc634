"""Train state: the model and optimizer built abstractly and born sharded.

A train state is a plain dict pytree `{"step": int32 [], "params": pure dict, "opt_state": optax
state}`; the model's `graphdef` is static and bound into steps with `functools.partial`. Params
are created inside a jitted init whose `out_shardings` are the target shardings, so no device
ever holds the whole model.
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


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay only on matrices (not norms or biases)."""
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
    return graphdef, abstract_params, shardings


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
    """(graphdef, abstract state with `.sharding` on every leaf, state shardings)."""
    graphdef, abstract_params, p_shard = param_shardings(model_cfg, mesh, rules)
    abstract_opt, o_shard = opt_shardings(tx, abstract_params, p_shard, mesh)
    shardings = {"step": sharding.replicated(mesh), "params": p_shard, "opt_state": o_shard}
    abstract = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params,
        "opt_state": abstract_opt,
    }
    return graphdef, with_sharding(abstract, shardings), shardings


def init_params(model_cfg, seed: int, shardings):
    """Fresh params created directly in their sharded layout."""

    def init():
        model = model_lib.Transformer(model_cfg, rngs=nnx.Rngs(params=seed))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return jax.jit(init, out_shardings=shardings)()


def init_opt_state(tx, params, shardings):
    return jax.jit(tx.init, out_shardings=shardings)(params)


def create_train_state(model_cfg, tx, mesh, rules, seed: int, params=None):
    """Builds a sharded train state; `params` (already sharded) replaces the random init.

    Returns:
      (graphdef, state dict, state shardings).
    """
    graphdef, _, shardings = abstract_train_state(model_cfg, tx, mesh, rules)
    if params is None:
        params = init_params(model_cfg, seed, shardings["params"])
    opt_state = init_opt_state(tx, params, shardings["opt_state"])
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return graphdef, {"step": step, "params": params, "opt_state": opt_state}, shardings


def merge(graphdef, params):
    """The NNX module for `params` (call at the top of a jitted step)."""
    return nnx.merge(graphdef, params)
