"""PPO-ptx stage (InstructGPT step 3): the loop around rollout -> score -> update.

Models: policy and reference from the SFT workdir (`init_from`; the reference from
`ppo.reference_from` when set, e.g. a later round starting from a PPO policy), value from the RM
workdir (`ppo.value_init="rm"`, as InstructGPT) or the SFT backbone with a fresh head
(`"sft"`), reward from the RM workdir (`ppo.reward_from`) with its normalisation bias, or a
Python function `ppo.reward_fn="module:function"` taking (prompts, responses) lists and
returning scores.

One iteration: sample `ppo.rollout_batch` prompts -> generate (compiled on-device loop) ->
score_step (jit) -> update_step (jit; epochs x minibatches, one loss) -> scalar metrics to the host
once. The KL coefficient is fixed, or adapted toward `ppo.kl_target` (Ziegler et al. 2019).
A killed run resumes from its last checkpoint: policy, value, both optimizer states, the KL
coefficient, the iteration (all RNG derives from seed and iteration) and both data iterators.

The pure steps are ppo_steps.py's; this file stays one piece (a little over 400 lines) because
what remains is the setup `run` builds and the loop itself, read top to bottom by whoever forks
the stage.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import iterators, lm_data, sft_data
from rlhf_jax.infra import checkpoint, metrics, preemption, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.rl import ppo_math
from rlhf_jax.sampling import sampler
from rlhf_jax.stages import ppo_steps, setup
from rlhf_jax.stages import rm as rm_stage


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """The static (hashable) subset of `config.ppo` the compiled steps need."""

    minibatch_rows: int
    epochs: int
    updates_per_epoch: int
    eos_id: tuple[int, ...]  # the tokenizer's eos_ids: any ends a response
    kl_kind: str
    discount: float
    lam: float
    clip: float
    value_clip: float
    vf_coef: float
    ptx_coef: float
    whiten_advantages: bool
    score_clip: float
    whiten_scores: bool
    no_eos_penalty: float
    policy_lr: float
    value_lr: float
    warmup_updates: int
    weight_decay: float
    grad_clip: float
    min_lr_ratio: float
    temperature: float = 1.0  # the rollout's; every log-prob is taken at it (ppo_steps)


def ppo_config_from(config, eos_id) -> PPOConfig:
    c, pc = config.ppo, jax.process_count()
    if c.rollout_batch % c.minibatch or c.rollout_batch % pc:
        raise ValueError(
            f"ppo.rollout_batch={c.rollout_batch} must be divisible by "
            f"ppo.minibatch={c.minibatch} and by the {pc} processes"
        )
    ppo_steps.check_sampling(c.temperature, c.top_k, c.top_p)
    names = {f.name for f in dataclasses.fields(PPOConfig)}
    kw = {k: c[k] for k in names if k in c}
    return PPOConfig(
        **kw,
        minibatch_rows=c.minibatch,
        eos_id=sampler.stop_ids(eos_id),
        updates_per_epoch=c.rollout_batch // c.minibatch,
    )


def load_reward_fn(spec: str):
    """`module:function` -> the callable (config files and reward hooks are code by design)."""
    if ":" not in spec:
        raise ValueError(f"ppo.reward_fn={spec!r} is not of the form module:function")
    mod, fn = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"ppo.reward_fn={spec!r} cannot be loaded: {e}") from None


def _restore(workdir, cfg, mesh, rules, held=None):
    """Params of `workdir` as stored (`cfg`), held in `held.param_dtype` when given."""
    abstract = state_lib.abstract_params(cfg, mesh, rules)
    return setup.restore_init_params(workdir, abstract, held and held.param_dtype)


def build_models(config, tok, mesh, rules, fresh: bool = True):
    """(configs, graphdefs, trained params {"policy", "value"} or None when not `fresh` (a
    resumed run restores its own), frozen {"ref", ["reward"]}, reward bias)."""
    c = config.ppo
    policy_cfg, _ = setup.resolve_model(config, tok)
    cfgs = {"policy": policy_cfg, "ref": policy_cfg}
    reward_meta = setup.read_init_meta(c.reward_from) if c.reward_from else None
    if reward_meta is not None:
        cfgs["reward"] = dataclasses.replace(
            model_config.ModelConfig(**reward_meta["model"]), dtype=policy_cfg.dtype
        )
    if c.value_init == "rm":
        if reward_meta is None:
            raise ValueError("ppo.value_init='rm' needs ppo.reward_from (an RM workdir)")
        cfgs["value"] = cfgs["reward"]
    elif c.value_init == "sft":
        cfgs["value"] = dataclasses.replace(policy_cfg, head="scalar")
    else:
        raise ValueError(f"unknown ppo.value_init: {c.value_init!r}; expected 'rm' or 'sft'")
    held = setup.frozen_configs(cfgs, c.frozen_dtype)
    graphdefs = {k: model_lib.abstract(v)[0] for k, v in held.items()}
    # The KL reference is the SFT policy even when the policy starts elsewhere (a later round
    # of iterated RLHF continues from the previous round's policy).
    ref_from = c.reference_from or config.init_from
    frozen = {"ref": _restore(ref_from, policy_cfg, mesh, rules, held["ref"])}
    if "reward" in cfgs:
        frozen["reward"] = _restore(c.reward_from, cfgs["reward"], mesh, rules, held["reward"])
    params = None
    if fresh:
        params = {"policy": _restore(config.init_from, policy_cfg, mesh, rules)}
        if c.value_init == "rm":
            params["value"] = _restore(c.reward_from, cfgs["value"], mesh, rules)
        else:
            meta = {"model": dataclasses.asdict(policy_cfg)}
            params["value"] = rm_stage.backbone_params(config, cfgs["value"], mesh, rules, meta)
    bias = float((reward_meta or {}).get("reward_bias", 0.0))
    return held, graphdefs, params, frozen, bias


def train_state_shardings(cfgs, tx, mesh, rules):
    """(state shardings, abstract params, abstract optimizer state with shardings)."""
    keys = ("policy", "value")
    p_shard = {k: state_lib.param_shardings(cfgs[k], mesh, rules)[2] for k in keys}
    abstract = {k: state_lib.abstract_params(cfgs[k], mesh, rules) for k in keys}
    opt = {k: state_lib.opt_shardings(tx[k], abstract[k], p_shard[k], mesh) for k in keys}
    o_shard = {k: opt[k][1] for k in keys}
    abstract_opt = {k: state_lib.with_sharding(opt[k][0], o_shard[k]) for k in keys}
    shardings = {"step": sharding.replicated(mesh), "params": p_shard, "opt_state": o_shard}
    return shardings, abstract, abstract_opt


def prompt_data(config, tok):
    c, t = config.ppo, config.data
    prompts = sft_data.read_prompts(t.train)
    if t.eval:
        train_p, eval_p = prompts, sft_data.read_prompts(t.eval)
    else:
        train_p, eval_p = lm_data.split_documents(prompts, t.eval_fraction, config.seed)
    ex, cut = sft_data.encode_prompts(train_p, tok, t.prompt_template, c.prompt_len)
    pc, pi = jax.process_count(), jax.process_index()
    it = iterators.make_train_iterator(
        ex, batch_size=c.rollout_batch // pc, seed=config.seed, process_index=pi, process_count=pc
    )
    return (
        it,
        eval_p,
        {"train_prompts": len(train_p), "eval_prompts": len(eval_p), "prompts_cut": cut},
    )


def ptx_data(config, tok, workdir: str, stage: str = "ppo"):
    """The pretraining-text iterator of the ptx term (`config.<stage>.ptx_*`, shared by PPO and
    GRPO), or None when the term is off."""
    c = config[stage]
    if c.ptx_coef == 0 or not config.data.ptx:
        if c.ptx_coef != 0:
            raise ValueError(f"{stage}.ptx_coef > 0 needs config.data.ptx (pretraining text files)")
        return None
    pc, pi = jax.process_count(), jax.process_index()
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
    return it


def _stack_ptx(it, n: int):
    batches = [next(it) for _ in range(n)]
    return {k: np.stack([b[k] for b in batches], axis=1) for k in batches[0]}  # [b, n, L]


class Iteration:
    """Compiled pieces of one PPO iteration, bound to models, shapes and the mesh."""

    def __init__(self, config, tok, cfgs, graphdefs, tx, shardings, mesh, rules, ppo_cfg):
        c = config.ppo
        self.mesh, self.rules, self.c, self.tok = mesh, rules, c, tok
        p = c.prompt_len
        if cfgs["policy"].family == "gpt2" and p + c.max_new_tokens > cfgs["policy"].max_len:
            raise ValueError(
                f"ppo.prompt_len + ppo.max_new_tokens = {p + c.max_new_tokens} "
                f"exceeds model.max_len={cfgs['policy'].max_len}"
            )
        self.sample = sampler.make_sampler(
            graphdefs["policy"],
            max_new_tokens=c.max_new_tokens,
            eos_id=tok.eos_ids,
            pad_id=tok.pad_id,
            mesh=mesh,
            rules=rules,
        )
        kw = dict(graphdefs=graphdefs, cfg=ppo_cfg, p=p, mesh=mesh, rules=rules)
        self.score = jax.jit(functools.partial(ppo_steps.score_step, **kw))
        self.update = jax.jit(
            functools.partial(ppo_steps.update_step, tx=tx, **kw),
            in_shardings=(shardings, None, None, None),
            out_shardings=(shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )

    def rollout(self, params, batch, iteration: int, seed: int, stream: int = 0):
        """Samples responses; row keys derive from (seed, stream, iteration, prompt index), so
        a resumed run draws exactly the samples the killed one would have."""
        b = sharding.put_batch(batch, self.mesh, self.rules)
        root = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), iteration)
        keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(b["index"])
        out = self.sample(
            params["policy"],
            b["tokens"],
            b["mask"],
            keys,
            temperature=self.c.temperature,
            top_k=self.c.top_k,
            top_p=self.c.top_p,
        )
        return {
            "tokens": out["tokens"],
            "prompt_mask": b["mask"],
            "response_mask": out["response_mask"],
        }


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


def external_scores(fn, tok, rollout, p: int, mesh, rules):
    """Scores [B] from a reward function on the decoded rollout (all rows, every process)."""
    n = rollout["tokens"].shape[0]
    prompts, responses = decode_rows(tok, rollout, p, range(n))
    scores = np.asarray(fn(prompts, responses), np.float32)
    if scores.shape != (n,):
        raise ValueError(f"ppo.reward_fn returned shape {scores.shape}; expected ({n},)")
    return sharding.put_global({"s": scores}, mesh, rules)["s"]


def kl_update(coef: float, observed_kl: float, config) -> float:
    c = config.ppo
    if not c.adaptive_kl:
        return coef
    return float(
        ppo_math.adaptive_kl_update(coef, observed_kl, c.rollout_batch, c.kl_target, c.kl_horizon)
    )


def _eval_batches(prompts, tok, config):
    """Held-out prompts as this process's rollout-shaped host batches (the last global batch
    filled with repeats; every process builds the same global order and takes its rows)."""
    c = config.ppo
    if not prompts:
        return []
    ex, _ = sft_data.encode_prompts(prompts, tok, config.data.prompt_template, c.prompt_len)
    n, big = len(prompts), c.rollout_batch
    b = big // jax.process_count()
    idx = np.arange(-(-n // big) * big) % n
    lo = jax.process_index() * b
    return [
        {k: v[idx[i + lo : i + lo + b]] for k, v in ex.items()} for i in range(0, len(idx), big)
    ]


def run(config, mesh, workdir: str):
    """PPO-ptx training; resumes from `<workdir>/checkpoints` when it holds a checkpoint."""
    rules = sharding.normalize_rules(config.sharding.rules)
    c, t = config.ppo, config.train
    if not config.init_from:
        raise ValueError("stage 'ppo' needs config.init_from (the SFT workdir)")
    if not (c.reward_from or c.reward_fn):
        raise ValueError("set ppo.reward_from (an RM workdir) or ppo.reward_fn (module:function)")
    for key in ("rollout_batch", "minibatch") + (("ptx_batch",) if c.ptx_coef > 0 else ()):
        sharding.check_batch(c[key], f"ppo.{key}", mesh, rules)
    tok = setup.load_tokenizer(config, workdir)
    ppo_cfg = ppo_config_from(config, tok.eos_ids)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=t.keep_ckpts)
    start = ckpt.latest_step()
    cfgs, graphdefs, params, frozen, bias = build_models(
        config, tok, mesh, rules, fresh=start is None
    )
    if c.reward_fn:
        frozen.pop("reward", None)
        reward_fn = load_reward_fn(c.reward_fn)
    tx = ppo_steps.make_tx(ppo_cfg, t.steps)
    shardings, abstract_params, abstract_opt = train_state_shardings(cfgs, tx, mesh, rules)
    prompt_it, eval_prompts, info = prompt_data(config, tok)
    n_updates = ppo_cfg.epochs * ppo_cfg.updates_per_epoch
    ptx_it = ptx_data(config, tok, workdir)
    kl_coef = float(c.beta)
    if start is not None:
        # The policy is saved as "params" so a PPO workdir serves `generate`, `init_from` and
        # evaluation like any LM stage's; the value model is its own item.
        restored, data_state, meta = ckpt.restore(
            start,
            {
                "params": abstract_params["policy"],
                "value": abstract_params["value"],
                "opt_state": abstract_opt,
            },
        )
        state = {
            "step": jax.device_put(jnp.asarray(start, jnp.int32), shardings["step"]),
            "params": {"policy": restored["params"], "value": restored["value"]},
            "opt_state": restored["opt_state"],
        }
        prompt_it.set_state(data_state["prompts"])
        if ptx_it is not None:
            ptx_it.set_state(data_state["ptx"])
        kl_coef = float(meta["kl_coef"])
    else:
        start = 0
        init = lambda p: {k: tx[k].init(p[k]) for k in p}
        opt_state = jax.jit(init, out_shardings=shardings["opt_state"])(params)
        state = {
            "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
            "params": params,
            "opt_state": opt_state,
        }
    step = Iteration(config, tok, cfgs, graphdefs, tx, shardings, mesh, rules, ppo_cfg)
    evals = _eval_batches(eval_prompts[: c.eval_prompts], tok, config)
    meta = setup.checkpoint_meta(
        config,
        cfgs["policy"],
        tok,
        "ppo",
        value_model=dataclasses.asdict(cfgs["value"]),
        reward_bias=bias,
    )
    writer = metrics.MetricsWriter(workdir, total_steps=t.steps, start_step=start, desc="ppo")
    if jax.process_index() == 0:
        print(
            f"ppo: policy {model_lib.param_count(abstract_params['policy']) / 1e6:.2f}M, "
            f"value {model_lib.param_count(abstract_params['value']) / 1e6:.2f}M params; "
            f"data: {info}; {t.steps} iterations; starting at {start}",
            flush=True,
        )

    def score_batch(rollout, coef):
        ext = (
            external_scores(reward_fn, tok, rollout, c.prompt_len, mesh, rules)
            if c.reward_fn
            else jnp.zeros((rollout["tokens"].shape[0],), jnp.float32)
        )
        fz = {
            **frozen,
            "kl_coef": jnp.float32(coef),
            "reward_bias": jnp.float32(bias),
            "ext_scores": ext,
        }
        return step.score(state["params"], fz, rollout)

    def evaluate(it):
        ms = []
        for b in evals:
            roll = step.rollout(state["params"], b, it, config.seed, stream=1)
            ms.append(score_batch(roll, kl_coef)[1])
        ms = sharding.to_host(ms)
        return {
            f"eval/{k.split('/')[1]}": float(np.mean([m[k] for m in ms]))
            for k in ("ppo/score", "ppo/kl_per_seq", "ppo/response_length", "ppo/no_eos_fraction")
        }

    try:
        if start == 0 and c.eval_every > 0 and evals:
            writer.write(0, evaluate(0))
        for it in range(start, t.steps):
            t0 = time.time()
            roll = step.rollout(state["params"], next(prompt_it), it, config.seed)
            jax.block_until_ready(roll)
            t1 = time.time()
            batch, sm = score_batch(roll, kl_coef)
            jax.block_until_ready(batch)
            t2 = time.time()
            ptx = None
            if ptx_it is not None:
                ptx = sharding.put_batch(_stack_ptx(ptx_it, n_updates), mesh, rules)
            upd_key = jax.random.fold_in(jax.random.key(config.seed + 1), it)
            state, um = step.update(state, batch, ptx, upd_key)
            m = sharding.to_host({**sm, **um})
            t3 = time.time()
            n = it + 1
            if not np.isfinite(m["ppo/loss"]):
                raise FloatingPointError(
                    f"non-finite loss ({m['ppo/loss']}) at iteration {n}; "
                    f"stopping. The last checkpoint was written before it."
                )
            out = {k: float(v) for k, v in m.items()}
            out.update(
                {
                    "time/rollout": t1 - t0,
                    "time/score": t2 - t1,
                    "time/update": t3 - t2,
                    "time/iteration": t3 - t0,
                    "ppo/samples_per_sec": c.rollout_batch / (t3 - t0),
                }
            )
            writer.write(n, out)
            if n % t.log_every == 0 or n == t.steps:
                writer.write_text(n, "ppo/samples", sample_table(tok, roll, batch, c))
            kl_coef = kl_update(kl_coef, out["ppo/kl_per_seq"], config)
            preempted = preemption.stop_requested()
            is_eval = c.eval_every > 0 and evals and (n % c.eval_every == 0 or n == t.steps)
            if is_eval and not preempted:
                writer.write(n, evaluate(n))
            if n % t.ckpt_every == 0 or n == t.steps or preempted:
                data_state = {
                    "prompts": prompt_it.get_state(),
                    "ptx": None if ptx_it is None else ptx_it.get_state(),
                }
                ckpt.save(
                    n,
                    {
                        "params": state["params"]["policy"],
                        "value": state["params"]["value"],
                        "opt_state": state["opt_state"],
                    },
                    data=data_state,
                    meta={**meta, "kl_coef": kl_coef},
                )
            if preempted:
                raise preemption.Preempted(n, config.stage)
    finally:
        ckpt.close()
        writer.close()
    return state


def sample_table(tok, rollout, batch, c) -> str:
    """A few prompts, responses and their scores (reward model or function), as plain text."""
    rows = range(min(c.sample_rows, rollout["tokens"].shape[0]))
    prompts, responses = decode_rows(tok, rollout, c.prompt_len, rows)
    scores = sharding.to_host(batch["scores"])
    return "\n".join(f"[{scores[i]:+.3f}] {prompts[i]!r} -> {responses[i]!r}" for i in rows)
