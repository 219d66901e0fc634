"""What every stage does before its loop: tokenizer, model config, hand-off checks, FLOP counts.

Stage hand-off (DESIGN.md §2): `config.init_from` names the previous stage's workdir. Its
checkpoint's `meta` fixes the architecture (so SFT builds exactly the pretrained shapes whatever
`config.model.size` says) and its tokenizer (`tokenizer.model`, or a Hugging Face `tokenizer/`
directory) is reused; numerics that do not change parameter shapes (compute dtype, remat,
attention backend) still come from the current config.
Every stage workdir keeps a copy of its tokenizer so it can be handed on or sampled from alone.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax

from rlhf_jax.data import chat, lm_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.infra import restore, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import hf_init
from rlhf_jax.models import lora as lora_lib

TOKENIZER_FILE, HF_TOKENIZER_DIR = hf_init.TOKENIZER_FILE, hf_init.HF_TOKENIZER_DIR


def flops_per_token(cfg: model_config.ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12 (N H) T per layer for the attention
    scores and the weighted sum, T capped at the window on sliding-window layers."""
    return 6 * n_params + 12 * cfg.n_heads * cfg.head_dim * cfg.attended_keys(seq_len)


def checkpoint_meta(config, model_cfg, tok, stage: str, **extra) -> dict:
    """What every stage's checkpoints carry: the resolved config, the model (what `init_from`
    rebuilds), the tokenizer file and the stage, plus stage extras (a reward bias, a KL coef).
    A LoRA stage's checkpoint stores only what it trains, so it names its base too ("lora":
    init_from, or "" and the seed of a seeded base; infra/restore.py rebuilds from it)."""
    out = {
        "config": config.to_dict(),
        "model": dataclasses.asdict(model_cfg),
        "tokenizer": tok.WORKDIR_NAME,
        "stage": stage,
    }
    if model_cfg.lora_rank:
        out["lora"] = {"base": config.init_from, "seed": config.seed}
    return {**out, **extra}


def optim_config_from(train_cfg, total_steps: int) -> state_lib.OptimConfig:
    t = train_cfg
    return state_lib.OptimConfig(
        lr=t.lr,
        warmup_steps=t.warmup_steps,
        total_steps=total_steps,
        min_lr_ratio=t.min_lr_ratio,
        weight_decay=t.weight_decay,
        b1=t.b1,
        b2=t.b2,
        grad_clip=t.grad_clip,
    )


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_init_meta(path: str) -> dict | None:
    """Meta of an `init_from` source: a stage workdir, or a Hugging Face dir as `hf:DIR`."""
    return restore.read_meta(path)


def restore_init_params(path: str, abstract_params, dtype: str | None = None, rules=None):
    """Params of an `init_from` source (a LoRA workdir merged: infra/restore.py), straight into
    the shardings `abstract_params` asks (its dtypes, the stored ones), then cast leaf by leaf
    to `dtype` when given. `rules`: the run's sharding rules (a LoRA source's pieces)."""
    params = restore.restore_params(path, abstract_params, rules)
    if not dtype:
        return params

    def cast(x):
        if x.dtype == dtype:
            return x
        y = x.astype(dtype)  # keeps x's sharding
        x.delete()  # the stored-dtype copy is never whole in HBM beside the cast one
        return y

    return jax.tree.map(cast, params)


def frozen_configs(cfgs: dict, dtype: str) -> dict:
    """`cfgs` with the frozen models (reference "ref", "reward") held in `dtype`
    (`ppo.frozen_dtype`; "" keeps model.param_dtype): they get no gradient, so float32 master
    weights buy them nothing, and they compute in `model.dtype` either way."""
    if not dtype:
        return cfgs
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"unknown ppo.frozen_dtype: {dtype!r}; expected '', float32 or bfloat16")
    frozen = ("ref", "reward")
    return {
        k: dataclasses.replace(v, param_dtype=dtype) if k in frozen else v for k, v in cfgs.items()
    }


def _tokenizer_in(directory: str) -> str | None:
    """The tokenizer a workdir or a Hugging Face directory holds: `tokenizer.model`
    (sentencepiece, preferred where both exist), else a workdir's `tokenizer/` copy or the HF
    directory's own `tokenizer.json`; None when there is none."""
    for name in (TOKENIZER_FILE, HF_TOKENIZER_DIR):
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return directory
    return None


def _init_tokenizer(path: str) -> str:
    directory = hf_init.hf_dir(path) if hf_init.is_hf_path(path) else path
    src = _tokenizer_in(directory)
    if src is None:
        what = "init_from" if hf_init.is_hf_path(path) else "init_from workdir"
        raise FileNotFoundError(
            f"{what} {path!r} has no tokenizer ({TOKENIZER_FILE} or tokenizer.json); "
            "set config.tokenizer.path"
        )
    return src


def load_tokenizer(config, workdir: str):
    """The run's tokenizer, kept in the workdir as `tokenizer.model` (sentencepiece) or
    `tokenizer/` (a Hugging Face tokenizer.json and its configs).

    Source, in order: `config.tokenizer.path` (a `.model` file, a tokenizer.json or its
    directory); the `init_from` workdir's or `hf:DIR`'s tokenizer; else one trained on
    `config.data.train` (pretraining from scratch).
    """
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0 and _tokenizer_in(workdir) is None:
        src = config.tokenizer.path
        if not src and config.init_from:
            src = _init_tokenizer(config.init_from)
        if not src and config.stage != "pretrain":
            raise ValueError(
                f"stage {config.stage!r} needs config.init_from (the previous "
                "stage's workdir) or config.tokenizer.path"
            )
        if src:
            tok = tok_lib.load_tokenizer(src)  # validate before copying
            tok.save(os.path.join(workdir, tok.WORKDIR_NAME))
        else:
            docs = lm_data.read_documents(config.data.train)
            tok_lib.train_tokenizer(
                docs,
                os.path.join(workdir, TOKENIZER_FILE),
                config.tokenizer.vocab_size,
                model_type=config.tokenizer.model_type,
                seed=config.seed,
                reserved=chat.reserved_tokens(config),
                source=f"config.data.train={config.data.train!r}",
            )
    _sync("tokenizer")
    return tok_lib.load_tokenizer(_tokenizer_in(workdir), chat_template=chat.from_config(config))


def model_config_from(
    config, vocab_size: int | None = None, arch: bool = True
) -> model_config.ModelConfig:
    """`config.model` -> ModelConfig. A zero vocab takes the tokenizer's, rounded up to 128.
    `arch=False` leaves model_config.ARCH_FIELDS at the preset's (init_from's model replaces
    them)."""
    m = config.model
    vocab = m.vocab_size or (128 * math.ceil(vocab_size / 128) if vocab_size else None)
    return model_config.preset(
        m.size,
        family=m.family or None,
        vocab_size=vocab,
        max_len=m.max_len or None,
        n_kv_heads=m.n_kv_heads or None,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        scan_layers=m.scan_layers,
        remat=m.remat,
        attention=m.attention,
        # models/config.ARCH_FIELDS: None (unset, or a config from before they existed) keeps
        # the preset's value
        **{f: m.get(f) if arch else None for f in model_config.ARCH_FIELDS},
    )


# Options that change numerics or speed but not parameter shapes or names.
NUMERICS = ("dtype", "remat", "attention")


def resolve_model(config, tok) -> tuple[model_config.ModelConfig, dict | None]:
    """The run's ModelConfig and, when `init_from` is set, that checkpoint's meta."""
    current = model_config_from(config, tok.vocab_size, arch=not config.init_from)
    init_meta = None
    if config.init_from:
        init_meta = read_init_meta(config.init_from) or {}
        stored = init_meta.get("model")
        if stored is None:
            raise ValueError(f"init_from {config.init_from!r}: checkpoint has no model config")
        if init_meta.get("stage") == "hf":  # a HF import can be laid out either way
            stored = {**stored, "scan_layers": current.scan_layers}
        if stored.get("scan_layers") != current.scan_layers:
            raise ValueError(
                f"init_from {config.init_from!r} stores params with model.scan_layers="
                f"{stored.get('scan_layers')}; set --config.model.scan_layers to match"
            )
        _check_set_fields_match(config, stored)
        stored = {**stored, **{k: getattr(current, k) for k in NUMERICS}}
        # A LoRA source is read merged (infra/restore.py): its adapters are not this run's.
        current = lora_lib.base_config(model_config.ModelConfig(**stored))
    current = dataclasses.replace(current, **lora_fields(config))
    tok.check_model_vocab(current.vocab_size)
    return current, init_meta


def lora_fields(config) -> dict:
    """`config.lora` as ModelConfig fields; the defaults (no adapters) when rank is 0, so a run
    without LoRA stores the model it always did whatever the other lora keys say."""
    c = config.get("lora")
    if c is None:
        return {}
    model_config.check_lora(c.rank, c.alpha, c.targets, c.base_dtype)
    if c.rank == 0:
        return {}
    return dict(
        lora_rank=c.rank, lora_alpha=float(c.alpha), lora_targets=c.targets,
        lora_base_dtype=c.base_dtype,
    )  # fmt: skip


def check_lora(config, prefix: str = "config.") -> None:
    """One line on a bad `lora` section (at any depth: a pipeline nests stage configs), run by
    the entry before any stage starts and again by every stage's `resolve_model`."""
    for key in list(config.keys()):
        value = config[key]
        if key == "lora" and hasattr(value, "keys"):
            try:
                model_config.check_lora(value.rank, value.alpha, value.targets, value.base_dtype)
            except ValueError as e:
                raise ValueError(str(e).replace("lora.", f"{prefix}lora.", 1)) from None
        elif hasattr(value, "keys"):
            check_lora(value, f"{prefix}{key}.")


def _check_set_fields_match(config, stored: dict) -> None:
    """With init_from the stored architecture is the model; an architecture field the config sets
    to something else would be ignored, so it is an error instead."""
    defaults = {f.name: f.default for f in dataclasses.fields(model_config.ModelConfig)}
    for k in model_config.ARCH_FIELDS:
        want = config.model.get(k)
        have = stored.get(k, defaults[k])
        if want is not None and want != have:
            raise ValueError(
                f"config.model.{k}={want!r} but init_from {config.init_from!r} stores a model "
                f"with {k}={have!r}; an initialised model keeps its architecture (unset the key)"
            )


def reference_is_own_base(config, section: str, model_cfg) -> bool:
    """Whether a stage's KL reference is its LoRA policy's own base with the adapters off (no
    `<section>.reference_from`): then no reference copy is held (DPO, KTO, GRPO, PPO, and the
    planner's plans of them)."""
    return bool(model_cfg.lora_rank) and not config[section].reference_from


def check_same_model(
    meta: dict | None, model_cfg: model_config.ModelConfig, where, merged: bool = False
) -> None:
    """Resuming with a different architecture is one clear error, not an orbax traceback.
    `merged`: the checkpoint is read as its model with any adapters folded in (a LoRA workdir
    as a reference), so its LoRA fields are not compared."""
    stored = (meta or {}).get("model")
    if stored is None:
        return
    if merged:
        stored = {k: v for k, v in stored.items() if k not in model_config.LORA_FIELDS}
    current = dataclasses.asdict(model_cfg)
    # A field added to ModelConfig after the checkpoint was written has its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(model_config.ModelConfig)}
    diff = {
        k: (stored.get(k, defaults[k]), v)
        for k, v in current.items()
        if k not in NUMERICS and stored.get(k, defaults[k]) != v
    }
    if diff:
        k, (a, b) = next(iter(diff.items()))
        raise ValueError(
            f"checkpoint in {where} was written for a different model: "
            f"model.{k} is {a!r} there but {b!r} now"
        )


# Config keys (at any depth: a pipeline nests each stage's config) that count something a run
# does; a negative one would train nothing and exit 0 (`range(start, -5)` is empty).
COUNT_KEYS = frozenset({"steps", "epochs", "warmup_steps"})


def check_counts(config, prefix: str = "config.") -> None:
    """Fails with one line naming the key when a count (COUNT_KEYS) is negative: run by the
    entry (launch/run.start) before any stage starts, so it covers every stage and the
    pipeline's nested stage configs."""
    for key in list(config.keys()):
        value = config[key]
        if hasattr(value, "keys"):
            check_counts(value, f"{prefix}{key}.")
        elif key in COUNT_KEYS and isinstance(value, (int, float)) and value < 0:
            raise ValueError(f"{prefix}{key}={value} must be >= 0")


# The stages that pack their rows under `data.packing` (data/packing.py): SFT (demonstrations),
# the RM and DPO with its loss variants (whole comparisons per row).
PACKING_STAGES = ("sft", "rm", "dpo")


def is_packed(config) -> bool:
    """Whether the stage's rows are packed (`data.packing` on a stage of PACKING_STAGES)."""
    return config.get("stage") in PACKING_STAGES and bool(config.data.get("packing", False))


def check_packing(config, prefix: str = "config.") -> None:
    """Fails with one line when `data.packing` is on where nothing packs: pretraining already
    concatenates its documents, and the KTO and RL stages do not pack yet. A pipeline's own
    `data` reaches no stage (set `stages.sft.data.packing`). Run by the entry before any stage
    starts, nested configs too."""
    data, stage = config.get("data"), config.get("stage")
    if hasattr(data, "keys") and data.get("packing", False) and stage not in PACKING_STAGES:
        raise ValueError(
            f"{prefix}data.packing=True: only the {', '.join(PACKING_STAGES[:-1])} and "
            f"{PACKING_STAGES[-1]} stages pack "
            f"their rows, this is stage {stage!r}"
            + (" (set config.stages.<stage>.data.packing)" if stage == "pipeline" else "")
        )
    for key in list(config.keys()):
        if hasattr(config[key], "keys") and key != "data":
            check_packing(config[key], f"{prefix}{key}.")


def check_batch(config, mesh, rules) -> None:
    t = config.train
    dp = sharding.data_parallel_size(mesh, rules)
    if t.batch_size % (t.grad_accum * dp):
        raise ValueError(
            f"train.batch_size={t.batch_size} must be divisible by train.grad_accum="
            f"{t.grad_accum} x data-parallel size {dp}"
        )
    if t.batch_size % jax.process_count():
        raise ValueError(
            f"train.batch_size={t.batch_size} must be divisible by the "
            f"{jax.process_count()} processes"
        )
