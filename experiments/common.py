"""Shared config presets. Experiment files start from these; they never copy them.

Every key a run may override lives here with a typed default, so `--config.train.stepz=1`
(a typo) or `--config.train.steps=abc` (a wrong type) is an error at start-up.
"""

from __future__ import annotations

import ml_collections as mlc

from rlhf_jax.data import sft_data
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import sharding
from rlhf_jax.models import config as arch_lib

# One prompt format for every stage after pretraining: the policy sees this text before it
# responds, in SFT, in RM scoring, in PPO rollouts and in `generate`.
PROMPT_TEMPLATE = sft_data.PROMPT_TEMPLATE
# Model sizes whose experiment settings are the small CPU ones (tests, the bundled pipeline).
CPU_SIZES = ("tiny", "mini")


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
    """Parses the `:k=v,k2=v2` suffix of `--config experiments/x.py:...` with typed defaults.

    A key not in `defaults` is an error, and each value takes the type of its default.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise ValueError(f"config arg {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; expected one of {sorted(defaults)}")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config arg {key}={value!r} is not a bool")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise ValueError(f"config arg {key}={value!r} is not a {kind.__name__}") from None
    return mlc.ConfigDict(out)


def model_config(size: str = "tiny") -> mlc.ConfigDict:
    """`size` picks a preset from rlhf_jax/models/config.py; the other keys override it when set.
    Every other architecture field (ARCH_FIELDS there: d_model, qk_norm, sliding_window,
    window_pattern, ...) is a typed key too, unset (None) keeping the preset's value, so
    `--config.model.sliding_window=4096 --config.model.window_pattern=LLLLLG` pretrains a
    Gemma-3-shaped model from a llama preset; with init_from the stored model decides, and setting
    one to another value is an error (stages/setup.resolve_model)."""
    arch = {k: mlc.config_dict.placeholder(t) for k, t in arch_lib.ARCH_FIELDS.items()}
    return mlc.ConfigDict(
        dict(
            **arch,
            size=size,
            family="",  # "" -> the preset's family (gpt2); or "llama"
            vocab_size=0,  # 0 -> the tokenizer's vocabulary rounded up to a multiple of 128
            max_len=0,  # 0 -> the preset's
            n_kv_heads=0,  # 0 -> the preset's (no grouping); llama-style GQA when smaller
            dtype="bfloat16",  # compute dtype
            param_dtype="float32",
            scan_layers=False,  # unrolled is faster on GPU; scan compiles deep models faster
            remat="none",  # none | full | dots
            attention="auto",  # auto | xla | splash | cudnn
        )
    )


def train_config(**overrides) -> mlc.ConfigDict:
    c = mlc.ConfigDict(
        dict(
            steps=1000,
            epochs=0.0,  # SFT: > 0 sets steps to this many passes over the demonstrations
            batch_size=32,  # global, in sequences, per optimizer step
            seq_len=256,
            grad_accum=1,  # microbatches per step (batch_size must divide evenly)
            lr=6e-4,
            warmup_steps=100,
            min_lr_ratio=0.1,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            grad_clip=1.0,
            log_every=10,
            eval_every=200,  # 0 disables eval
            eval_batches=8,
            ckpt_every=200,
            keep_ckpts=3,
        )
    )
    c.update(overrides)
    return c


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> mlc.ConfigDict:
    """ICI (within a slice / node) and DCN (across slices / nodes) mesh shapes; -1 fills."""
    return mesh_lib.config(data, fsdp, tensor)


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.stage = "pretrain"
    c.seed = 0
    c.init_from = ""  # a previous stage's workdir: restores its params only
    c.model = model_config()
    c.tokenizer = mlc.ConfigDict(
        dict(
            path="",  # "" -> train one on data.train into <workdir>/tokenizer.model
            vocab_size=512,  # used only when training a tokenizer
            model_type="bpe",
        )
    )
    c.data = mlc.ConfigDict(
        dict(
            train="",  # files or globs, comma-separated
            eval="",  # held-out file(s); "" -> an eval_fraction split of train
            eval_fraction=0.05,
            cache=True,  # keep tokenized pretraining text under <workdir>/cache
            prompt_template=PROMPT_TEMPLATE,  # SFT/RM/PPO: how a prompt is shown to the model
            ptx="",  # PPO-ptx / GRPO-ptx: pretraining text files for the gamma term
            # SFT: several demonstrations per row of train.seq_len; RM and DPO (and its
            # variants): several whole comparisons per row of K x train.seq_len
            # (rlhf_jax/data/packing.py; the loss is the same, train.batch_size counts rows).
            packing=False,
        )
    )
    # Dialogue rows (`{"messages": [...]}`, rlhf_jax/data/chat.py): each turn is its role marker
    # then its content; an assistant turn ends with EOS. `prompt` rows keep data.prompt_template.
    # The markers are reserved pieces of a tokenizer the pretrain stage trains
    # (reserve_tokens=False trains the single-turn tokenizer of before, which cannot encode
    # messages rows).
    c.chat = mlc.ConfigDict(
        dict(
            system="<|system|>",
            user="<|user|>",
            assistant="<|assistant|>",
            reserve_tokens=True,
        )
    )
    # Samples logged at every SFT eval, for held-out prompts.
    c.sft = mlc.ConfigDict(
        dict(eval_samples=4, max_new_tokens=64, temperature=0.7, top_p=1.0, top_k=0)
    )
    # Reward model (stage "rm").
    c.rm = mlc.ConfigDict(
        dict(
            batching="per_prompt",  # per_prompt: InstructGPT's K-choose-2 element; or per_pair
            margin=0.0,  # required score gap in -log sigmoid(r_w - r_l - margin)
            k_max=9,  # responses per prompt (InstructGPT: 4 to 9)
            norm_data="",  # reference responses for the bias; "" -> the SFT demonstrations
            norm_max=100000,  # at most this many reference responses
        )
    )
    # How every stage, the pipeline and the tools generate (rlhf_jax/sampling/rollout.py).
    c.rollout = mlc.ConfigDict(
        dict(
            engine="static",  # static: sampler.py's batch (the reference); paged: engine.py's
            slots=0,  # paged: decode slots per call; 0 -> one per row of the call (no queue)
            page_size=16,  # paged: tokens per KV page
            pages=0,  # paged: pages in the pool; 0 -> enough for every slot at full length
        )
    )
    # LoRA (rlhf_jax/models/lora.py): rank > 0 trains low-rank adapters on `targets` (and a
    # stage's scalar head) over a frozen base held in `base_dtype`; checkpoints hold only what
    # trains and name their base (init_from). Targets: q,k,v,o,up,gate,down,embed,head.
    c.lora = mlc.ConfigDict(
        dict(
            rank=0,  # 0: off, every param trains
            alpha=16.0,  # the update is scaled by alpha / rank
            targets=arch_lib.LORA_DEFAULT_TARGETS,  # attention q/k/v/o and the MLP
            base_dtype="float32",  # float32 | bfloat16: the frozen base's dtype
        )
    )
    # Weights & Biases beside metrics.jsonl and TensorBoard (rlhf_jax/infra/tracking.py): mode
    # online | offline | disabled; disabled never imports wandb (the optional `wandb` extra).
    # name "" -> the workdir's name; a sweep sets group to its own name (launch/sweep.py).
    c.log = mlc.ConfigDict(
        dict(
            wandb=mlc.ConfigDict(
                dict(mode="disabled", project="rlhf-jax", entity="", group="", name="")
            )
        )
    )
    c.train = train_config()
    c.mesh = mesh_config()
    c.sharding = mlc.ConfigDict(dict(rules=[list(r) for r in sharding.DEFAULT_RULES]))
    return c


def stage_config(stage: str, arg) -> mlc.ConfigDict:
    """`base_config()` for `stage` with the structural args every experiment takes applied:
    model size and family, and the fsdp / tensor mesh axes (data parallelism fills the rest)."""
    c = base_config()
    c.stage = stage
    c.model = model_config(arg.size)
    c.model.family = arg.family
    c.mesh = mesh_config(fsdp=arg.fsdp, tensor=arg.tensor)
    return c
