"""What the RL stages (PPO, GRPO) share: prompts, pretraining (ptx) text, eval batches, the
reward (a frozen reward model or a `module:function`), decoded rows and rollout keys.

Each function takes the stage's config section name (`stage`: "ppo" or "grpo") so its errors
name the key a user sets (`ppo.rollout_batch`, `grpo.ptx_batch`, ...). A rollout batch holds
`rows` prompts, each repeated G times in consecutive rows (G = 1 for PPO, `grpo.group_size` for
GRPO), and a "sample" id per row (prompt index * G + g) from which its PRNG key derives, so a
resumed run draws exactly the samples the killed one would have.
"""

from __future__ import annotations

import dataclasses
import importlib
import os

import jax
import numpy as np

from rlhf_jax.data import iterators, lm_data, sft_data
from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import lora
from rlhf_jax.stages import setup


def read_prompts(config, tok, stage: str, batch_key: str):
    """(train prompts encoded [N, P], held-out prompt texts, info) of `data.train`.

    `batch_key` names the stage's prompts-per-iteration key (`ppo.rollout_batch`,
    `grpo.prompts`): too few training prompts for one batch is an error naming it. Prompts
    longer than `<stage>.prompt_len` keep their last tokens and are counted (`prompts_cut`).
    """
    c, d = config[stage], config.data
    prompts = sft_data.read_prompts(d.train)
    if d.eval:
        train_p, eval_p = prompts, sft_data.read_prompts(d.eval)
    else:
        train_p, eval_p = lm_data.split_documents(prompts, d.eval_fraction, config.seed)
    need = c[batch_key]
    if len(train_p) < need:
        raise ValueError(
            f"{stage}.{batch_key}={need} prompts per iteration, but data.train has only "
            f"{len(train_p)} training prompts ({len(eval_p)} held out for eval); lower "
            f"{stage}.{batch_key} or add prompts"
        )
    ex, cut = sft_data.encode_prompts(train_p, tok, d.prompt_template, c.prompt_len)
    info = {"train_prompts": len(train_p), "eval_prompts": len(eval_p), "prompts_cut": cut}
    return ex, eval_p, info


def prompt_iterator(ex, batch: int, seed: int):
    """This process's share of `batch` prompts per iteration, endless and checkpointable."""
    pc, pi = jax.process_count(), jax.process_index()
    return iterators.make_train_iterator(
        ex, batch_size=batch // pc, seed=seed, process_index=pi, process_count=pc
    )


def ptx_data(config, tok, workdir: str, stage: str):
    """The pretraining-text iterator of the ptx term (`<stage>.ptx_*`, `data.ptx`), or None
    when the term is off."""
    c = config[stage]
    if c.ptx_coef == 0:
        return None
    if not config.data.ptx:
        raise ValueError(f"{stage}.ptx_coef > 0 needs data.ptx (pretraining text files)")
    pc, pi = jax.process_count(), jax.process_index()
    try:
        it, _, _ = lm_data.build_text_data(
            config.data.ptx,
            tok,
            seq_len=c.ptx_seq_len,
            batch_size=c.ptx_batch // pc,
            eval_fraction=0.0,
            seed=config.seed,
            process_index=pi,
            process_count=pc,
            cache_dir=os.path.join(workdir, "cache"),
        )
    except ValueError as e:
        if "training examples" not in str(e):  # a malformed file says so itself
            raise
        raise ValueError(
            f"data.ptx={config.data.ptx!r} packs into fewer sequences of {stage}.ptx_seq_len="
            f"{c.ptx_seq_len} tokens than one {stage}.ptx_batch={c.ptx_batch}; lower "
            f"{stage}.ptx_batch or {stage}.ptx_seq_len, or add text"
        ) from None
    return it


class RolloutData:
    """Prompt batches with every prompt repeated G times (rows n * G + g) and "sample" ids
    (prompt index * G + g) for the PRNG, plus the iteration's stacked pretraining batches as
    "ptx_*" [b, n_ptx, L]; one checkpointable state for both iterators:
    {"prompts": ..., "ptx": ... or None}."""

    def __init__(self, prompts, group_size: int = 1, ptx=None, n_ptx: int = 0):
        self.prompts, self.g, self.ptx, self.n_ptx = prompts, group_size, ptx, n_ptx

    def __next__(self):
        b = next(self.prompts)
        out = {k: np.repeat(v, self.g, axis=0) for k, v in b.items() if k != "index"}
        out["sample"] = (b["index"][:, None] * self.g + np.arange(self.g)).reshape(-1)
        if self.ptx is not None:
            stacked = [next(self.ptx) for _ in range(self.n_ptx)]
            for k in stacked[0]:
                out[f"ptx_{k}"] = np.stack([s[k] for s in stacked], axis=1)  # [b, n, L]
        return out

    def get_state(self):
        return {
            "prompts": self.prompts.get_state(),
            "ptx": None if self.ptx is None else self.ptx.get_state(),
        }

    def set_state(self, state):
        self.prompts.set_state(state["prompts"])
        if self.ptx is not None:
            self.ptx.set_state(state["ptx"])


def eval_batches(prompts, tok, config, stage: str, batch: int, group_size: int = 1):
    """Held-out prompts as this process's rollout-shaped host batches.

    Every process builds the same global order and takes its rows. The last global batch is
    filled with repeats of the first prompts (one compiled shape); their "weight" is 0, so
    `weighted_means` counts every held-out prompt once.

    Returns:
      [{"tokens" [b * G, P], "mask" [b * G, P], "sample" [b * G], "weight" [b * G] float32}].
    """
    if not prompts:
        return []
    c = config[stage]
    ex, _ = sft_data.encode_prompts(prompts, tok, config.data.prompt_template, c.prompt_len)
    n, g = len(prompts), group_size
    b = batch // jax.process_count()
    lo = jax.process_index() * b
    slots = np.arange(-(-n // batch) * batch)  # [n rounded up to whole global batches]
    out = []
    for i in range(0, len(slots), batch):
        mine = slots[i + lo : i + lo + b]
        rows = mine % n
        out.append(
            {
                "tokens": np.repeat(ex["tokens"][rows], g, axis=0),
                "mask": np.repeat(ex["mask"][rows], g, axis=0),
                "sample": (rows[:, None] * g + np.arange(g)).reshape(-1),
                "weight": np.repeat((mine < n).astype(np.float32), g),
            }
        )
    return out


def weighted_means(rows: list[dict], prefix: str = "eval/") -> dict:
    """{prefix + key: mean over every eval row weighted by "weight"} of host per-row arrays
    [{"weight": [B], key: [B], ...}] (one dict per eval batch)."""
    w = np.concatenate([r["weight"] for r in rows])
    keys = [k for k in rows[0] if k != "weight"]
    return {
        f"{prefix}{k}": float(np.sum(np.concatenate([r[k] for r in rows]) * w) / w.sum())
        for k in keys
    }


def rollout_keys(seed: int, stream: int, iteration, sample):
    """PRNG keys [B], one per row, from (seed, stream, iteration, the row's "sample" id).

    `stream` separates training rollouts (0) from eval rollouts (1); `iteration` may be a
    device scalar (the train state's step)."""
    root = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), iteration)
    return jax.vmap(lambda i: jax.random.fold_in(root, i))(sample)


def load_reward_fn(config, stage: str):
    """`<stage>.reward_fn` ("module:function") -> the callable, or None when unset (config
    files and reward hooks are code by design)."""
    spec = config[stage].reward_fn
    if not spec:
        return None
    if ":" not in spec:
        raise ValueError(f"{stage}.reward_fn={spec!r} is not of the form module:function")
    mod, fn = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{stage}.reward_fn={spec!r} cannot be loaded: {e}") from None


def reward_model_config(config, stage: str, policy_cfg):
    """(the reward model's config in the policy's compute dtype, its stored meta) of
    `<stage>.reward_from`, or (None, None) when unset."""
    path = config[stage].reward_from
    if not path:
        return None, None
    meta = setup.read_init_meta(path) or {}
    if "model" not in meta:
        raise ValueError(f"{stage}.reward_from {path!r}: checkpoint has no model config")
    # A LoRA RM is read merged (infra/restore.py): the model without adapters.
    cfg = lora.base_config(model_config.ModelConfig(**meta["model"]))
    return dataclasses.replace(cfg, dtype=policy_cfg.dtype), meta


def reference(config, stage: str, policy_cfg, mesh, rules, held=None):
    """The frozen KL reference: `<stage>.reference_from`, else `init_from`, as stored (held in
    `held.param_dtype` when given). A LoRA policy without `reference_from` has none (None): its
    own base with the adapters off is the reference (the steps' `lora.adapters_off`), no second
    copy; with it, that model plus zero adapters, so it runs with the policy's graphdef."""
    ref_from = config[stage].reference_from
    if setup.reference_is_own_base(config, stage, policy_cfg):
        return None
    src = ref_from or config.init_from
    if not policy_cfg.lora_rank:
        return restore(src, policy_cfg, mesh, rules, held)
    base = restore(src, lora.base_config(policy_cfg), mesh, rules)
    _, _, shardings = state_lib.param_shardings(policy_cfg, mesh, rules)
    return state_lib.lora_params(policy_cfg, config.seed, shardings, base=base)


def restore(path: str, cfg, mesh, rules, held=None):
    """Params of a workdir (or `hf:DIR`) as stored (`cfg`), held in `held.param_dtype` when
    given (frozen models in `ppo.frozen_dtype`)."""
    abstract = state_lib.abstract_params(cfg, mesh, rules)
    return setup.restore_init_params(path, abstract, held and held.param_dtype, rules)


def decode_rows(tok, rollout, p: int, rows) -> tuple[list[str], list[str]]:
    """Prompt and response texts of some rows (host side, for reward functions and tables)."""
    # Gathered from every process (a collective: every process decodes the same rows).
    host = sharding.to_host({k: rollout[k] for k in ("tokens", "prompt_mask", "response_mask")})
    tokens, pm, rm = host["tokens"], host["prompt_mask"], host["response_mask"]
    prompts, responses = [], []
    for i in rows:
        prompts.append(tok.decode([int(x) for x in tokens[i, :p][pm[i]]]))
        resp = [int(x) for x in tokens[i, p:][rm[i]] if x not in tok.eos_ids]
        responses.append(tok.decode(resp))
    return prompts, responses


def external_scores(fn, tok, rollout, p: int, mesh, rules, stage: str):
    """Scores [B] from a reward function on the decoded rollout (all rows, every process)."""
    n = rollout["tokens"].shape[0]
    prompts, responses = decode_rows(tok, rollout, p, range(n))
    scores = np.asarray(fn(prompts, responses), np.float32)
    if scores.shape != (n,):
        raise ValueError(f"{stage}.reward_fn returned shape {scores.shape}; expected ({n},)")
    return sharding.put_global({"s": scores}, mesh, rules)["s"]


def check_rl_train_keys(config, stage: str, minibatch_key: str) -> None:
    """Refuses `train` keys the RL stages do not read, in one sentence each."""
    t = config.train
    if t.grad_accum != 1:
        raise ValueError(
            f"train.grad_accum={t.grad_accum}: the {stage} stage does not accumulate gradients; "
            f"{stage}.{minibatch_key} sets the rows of each gradient step (lower it to save "
            "memory, raise epochs for more updates)"
        )
    if t.steps < 1:
        raise ValueError(f"train.steps={t.steps}: the {stage} stage needs at least 1 iteration")
