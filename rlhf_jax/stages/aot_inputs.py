"""What every stage planner shares: the Function record and the abstract inputs it is lowered on.

The planners (rlhf_jax/stages/aot.py: LM, SFT, RM, DPO; rlhf_jax/stages/aot_rl.py: PPO, GRPO,
rsft) build each stage's jitted functions with the stage's own builders and hand them here as
`Function`s with ShapeDtypeStruct arguments that carry their NamedShardings. This module owns
those records and the shapes: batch rows placed as `sharding.put_batch` places them, the model
config a plan uses without a tokenizer, the reward model's config when no RM workdir is here,
and an abstract train state. Nothing is allocated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax

from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import hf_init, lora
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.stages import setup


@dataclasses.dataclass
class Function:
    """One compiled function of a stage, ready to lower. FLOPs are all chips' for one call."""

    name: str
    jitted: object
    args: tuple
    parts: dict  # role -> the arguments in it: "params", "opt_state", "frozen", "batch"
    flops: float  # model FLOPs, loop trips counted
    tokens: int
    samples: int
    resident: object = None  # in HBM during the call, not an argument
    hw_factor: float = 1.0  # hardware over model FLOPs (remat recomputes the forward)
    flops_seen: float | None = None  # per-chip FLOPs XLA's cost analysis counts, when not all
    loop_bytes: float = 0.0  # per-chip bytes of loop trips XLA's cost analysis leaves out
    loop_trips: int = 1  # trips of a loop without a constant bound (the decode loop's steps)
    static: tuple = ()  # trailing static arguments of `jitted`
    note: str = ""
    # Calls in one iteration of an RL stage (one rsft round), whose time bound is the sum of
    # calls x roofline; 0 for a function outside it (an eval step, every LM stage's function).
    calls: int = 0
    extra: dict = dataclasses.field(default_factory=dict)  # more report fields (the engine's)

    def lower(self):
        return self.jitted.lower(*self.args, *self.static)


def rows(mesh, rules, shape, dtype) -> jax.ShapeDtypeStruct:
    """An abstract batch array, rows over the batch axes as `sharding.put_batch` places them."""
    sh = sharding.batch_sharding(mesh, rules, len(shape)) if shape else sharding.replicated(mesh)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def scalar(mesh, dtype) -> jax.ShapeDtypeStruct:
    """A replicated abstract scalar (a KL coefficient, a sampling knob, a PRNG key)."""
    return jax.ShapeDtypeStruct((), dtype, sharding=sharding.replicated(mesh))


def key_dtype():
    return jax.eval_shape(lambda: jax.random.key(0)).dtype


def stored_model(path: str, current: model_config.ModelConfig):
    """The architecture an `init_from` source fixes (setup.resolve_model's rule), or None when
    the source is not on this machine (planning somewhere else than the run)."""
    if not path or not os.path.isdir(hf_init.hf_dir(path)):
        return None
    stored = ((setup.read_init_meta(path) or {}).get("model")) or None
    if stored is None:
        return None
    numerics = {k: getattr(current, k) for k in setup.NUMERICS + ("scan_layers",)}
    return model_config.ModelConfig(**{**stored, **numerics})


# Layer-count probes (stages/aot_probe.py): while `probe_layers` is active, every model config
# a planner builds is unrolled at the probe's layer count for its group ("policy": the stage's
# own model and every model of its shape; "reward": a reward model of another shape). Outside a
# probe, the layer counts the planner built are recorded per group.
_PROBE: dict = {}
_SEEN: dict = {}


@contextlib.contextmanager
def probe_layers(layers: dict):
    """Every model config built inside is unrolled with `layers[group]` layers."""
    _PROBE.update(layers)
    try:
        yield
    finally:
        _PROBE.clear()


def layers_seen() -> dict:
    """{group: layers} of the models the last plan outside a probe built (`reset_layers_seen`)."""
    return dict(_SEEN)


def reset_layers_seen() -> None:
    _SEEN.clear()


def _layers(cfg: model_config.ModelConfig, group: str) -> model_config.ModelConfig:
    if not _PROBE:
        _SEEN[group] = cfg.n_layers
        return cfg
    return dataclasses.replace(cfg, n_layers=_PROBE[group], scan_layers=False)


def model_config_of(config) -> model_config.ModelConfig:
    """The stage's ModelConfig without a tokenizer: `model.vocab_size`, else the vocabulary a
    pretraining run would train (`tokenizer.vocab_size`), else the preset's; an `init_from`
    workdir present here overrides the architecture."""
    trains_tokenizer = config.stage == "pretrain" and not config.tokenizer.path
    current = setup.model_config_from(
        config, config.tokenizer.vocab_size if trains_tokenizer else None
    )
    cfg = stored_model(config.init_from, current) or current
    # `config.lora` on the stored base, as setup.resolve_model builds the stage's model.
    cfg = dataclasses.replace(lora.base_config(cfg), **setup.lora_fields(config))
    return _layers(cfg, "policy")


def reference_params(config, section: str, policy, mesh, rules, held=None):
    """The frozen KL reference as rl_data.reference holds it: None for a LoRA policy without
    `<section>.reference_from` (its own base with the adapters off is the reference), that model
    with zero adapters with one, else the policy's shapes (held in `held`'s dtype)."""
    if setup.reference_is_own_base(config, section, policy):
        return None
    cfg = held if held is not None and not policy.lora_rank else policy
    return state_lib.abstract_params(cfg, mesh, rules)


def reward_config(policy: model_config.ModelConfig, reward_from: str, rm_size: str):
    """The reward model a stage reads: the `reward_from` workdir's architecture when it is here
    (in the policy's compute dtype, as the stages load it), else the `rm_size` preset with the
    policy's vocabulary, context and numerics, else the policy's own shape; a scalar head."""
    if reward_from and os.path.isdir(reward_from):
        stored = stored_model(reward_from, policy)
        if stored is not None:
            return _layers(dataclasses.replace(stored, dtype=policy.dtype), "reward")
    base = policy
    if rm_size:
        kw = {k: getattr(policy, k) for k in ("family", "vocab_size", "max_len")}
        kw.update({k: getattr(policy, k) for k in setup.NUMERICS + ("scan_layers",)})
        kw["param_dtype"] = policy.param_dtype
        base = _layers(model_config.preset(rm_size, **kw), "reward")
    return dataclasses.replace(base, head="scalar")


def train_state(cfg, config, mesh, rules, tx=None):
    """(graphdef, tx, abstract state, state shardings) as `loop.restore_or_init` builds them;
    `tx` defaults to the `config.train` AdamW every supervised stage makes."""
    if tx is None:
        optim = setup.optim_config_from(config.train, max(config.train.steps, 1))
        tx = state_lib.make_optimizer(optim)
    graphdef, state, shardings = state_lib.abstract_train_state(cfg, tx, mesh, rules)
    return graphdef, tx, state, shardings


def describe(cfg, params) -> str:
    n = model_lib.param_count(params)
    out = (
        f"{cfg.family} {n / 1e6:,.1f}M params (vocab {cfg.vocab_size}), {cfg.dtype}, "
        f"remat={cfg.remat}, scan_layers={cfg.scan_layers}"
    )
    if cfg.lora_rank:
        trained = model_lib.param_count(lora.split_trainable(params)[0])
        out += (
            f"; LoRA r={cfg.lora_rank} on {cfg.lora_targets}, "
            f"{trained / 1e6:,.2f}M trained, base {cfg.lora_base_dtype or cfg.param_dtype}"
        )
    return out
