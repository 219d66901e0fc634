"""Params of whatever a run starts from or a tool loads, in the layout the caller asks.

Sources: a stage workdir (its "params" item), `hf:DIR` (models/hf_init.py), and a LoRA workdir.
A LoRA checkpoint holds only what its stage trained (adapters, scalar heads) and names its base
in `meta["lora"]`: {"base": the stage's init_from ("" for a seeded init), "seed"}. Its params are
rebuilt here: the base's params (recursively: a base may be a LoRA workdir or `hf:DIR` itself),
the frozen leaves cast to the dtype the stage held them in, then every adapter folded into its
weight (`lora.merge`). So `init_from`, `reward_from`, `reference_from` and the tools read a LoRA
workdir as the model it trained, base + adapters, in the shape of its base model.
"""

from __future__ import annotations

import functools

import jax

from rlhf_jax.infra import checkpoint, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import hf_init, lora


def read_meta(path: str) -> dict | None:
    """The meta of a stage workdir, or a checkpoint-style one for `hf:DIR`."""
    if hf_init.is_hf_path(path):
        return hf_init.init_meta(path)
    return checkpoint.read_meta(path)


def stored_model(meta: dict | None, where: str) -> model_config.ModelConfig:
    """The model a source's meta describes, as the caller sees it: without adapters (a LoRA
    workdir is read merged)."""
    if not meta or "model" not in meta:
        raise ValueError(f"checkpoint in {where} has no model config in its meta")
    return lora.base_config(model_config.ModelConfig(**meta["model"]))


def restore_params(path: str, abstract_params, rules=None, step: int | None = None):
    """Params of a source, structured, typed and sharded as `abstract_params` asks.

    Args:
      path: a stage workdir (or its checkpoints directory), a LoRA workdir, or `hf:DIR`.
      abstract_params: ShapeDtypeStructs with shardings of the source's model without adapters
        (`state.abstract_params(stored_model(...), mesh, rules)`).
      rules: the sharding rules (default `sharding.DEFAULT_RULES`): a LoRA source's adapters and
        base are laid out by them before they are merged into `abstract_params`' layout.
      step: the checkpoint step of `path` (None: the latest); a LoRA base is read at its latest.

    Raises:
      FileNotFoundError / ValueError: no checkpoint, or one that does not match.
    """
    if hf_init.is_hf_path(path):
        return hf_init.restore_params(path, abstract_params)
    meta = checkpoint.read_meta(path, step) or {}
    if not (meta.get("model") or {}).get("lora_rank"):
        return checkpoint.restore_params(path, abstract_params, step=step)
    return _restore_lora(path, meta, abstract_params, rules, step)


def restore_trainable(path: str, mesh, rules=None, step: int | None = None):
    """What a LoRA workdir's checkpoint stores, unmerged: (its model config with LoRA, the
    trainable params: adapters and scalar heads, sharded by `rules`, its meta). The PEFT export
    (models/hf_peft.py) writes these.

    Raises:
      ValueError: `path` is not a LoRA workdir.
    """
    meta = checkpoint.read_meta(path, step) or {}
    if not (meta.get("model") or {}).get("lora_rank"):
        raise ValueError(f"{path} is not a LoRA workdir (its model has no adapters)")
    cfg = model_config.ModelConfig(**meta["model"])
    rules = sharding.DEFAULT_RULES if rules is None else rules
    trainable = checkpoint.restore_params(path, _split_abstract(cfg, mesh, rules)[0], step=step)
    return cfg, trainable, meta


def _split_abstract(cfg, mesh, rules):
    """(trainable, frozen) abstract params of a LoRA model, as its stage held them."""
    _, held, held_sh = state_lib.param_shardings(cfg, mesh, rules)
    return lora.split_trainable(state_lib.with_sharding(held, held_sh))


def _restore_lora(path, meta, abstract_params, rules, step):
    cfg = model_config.ModelConfig(**meta["model"])
    mesh = jax.tree.leaves(abstract_params)[0].sharding.mesh
    rules = sharding.DEFAULT_RULES if rules is None else rules
    train_abs, frozen_abs = _split_abstract(cfg, mesh, rules)
    trainable = checkpoint.restore_params(path, train_abs, step=step)
    base = _base_params(path, meta, cfg, mesh, rules)
    frozen = _select(base, frozen_abs, path, (meta.get("lora") or {}).get("base", ""))

    def merge(trainable, frozen):
        merged = lora.merge(cfg, lora.combine(trainable, frozen))
        return jax.tree.map(lambda x, a: x.astype(a.dtype), merged, abstract_params)

    want = jax.tree.structure(abstract_params)
    merged = jax.eval_shape(functools.partial(lora.merge, cfg), lora.combine(train_abs, frozen_abs))
    have = jax.tree.structure(merged)
    if want != have:
        raise ValueError(
            f"LoRA workdir {path} holds a model whose params are not the ones asked for "
            f"(its model: {lora.base_config(cfg)})"
        )
    out_sh = jax.tree.map(lambda a: a.sharding, abstract_params)
    return jax.jit(merge, out_shardings=out_sh, donate_argnums=1)(trainable, frozen)


def _base_params(path, meta, cfg, mesh, rules):
    """The full params of a LoRA workdir's base model (its seeded init when it has none)."""
    info = meta.get("lora") or {}
    src = info.get("base", "")
    if not src:
        base_cfg = lora.base_config(cfg)
        _, _, shardings = state_lib.param_shardings(base_cfg, mesh, rules)
        return state_lib.init_params(base_cfg, int(info.get("seed", 0)), shardings)
    if hf_init.is_hf_path(src):
        base_meta = hf_init.init_meta(src, scan_layers=cfg.scan_layers)
    else:
        base_meta = checkpoint.read_meta(src)
    base_cfg = stored_model(base_meta, f"{src} (the base of LoRA workdir {path})")
    return restore_params(src, state_lib.abstract_params(base_cfg, mesh, rules), rules)


def _select(base, frozen_abs, path, src):
    """The leaves of `base` at `frozen_abs`' paths, in its dtypes (the stage's held base)."""

    def pick(tree, abstract, keys):
        out = {}
        for k, a in abstract.items():
            if k not in tree:
                where = "/".join(map(str, (*keys, k)))
                raise ValueError(f"LoRA workdir {path}: its base {src!r} has no param {where!r}")
            out[k] = pick(tree[k], a, (*keys, k)) if isinstance(a, dict) else tree[k]
            if not isinstance(a, dict) and out[k].shape != a.shape:
                raise ValueError(
                    f"LoRA workdir {path}: its base {src!r} has {'/'.join(map(str, keys))}/{k} "
                    f"of shape {out[k].shape}, not {a.shape}"
                )
        return out

    picked = pick(base, frozen_abs, ())
    return jax.tree.map(lambda x, a: x.astype(a.dtype), picked, frozen_abs)
