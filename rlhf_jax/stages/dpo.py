"""DPO stage: the SFT policy trained directly on the reward model's comparisons, no RM, no RL.

The data are the comparisons the RM reads (data/dpo_data.py: same files, forms, ranks and
held-out split), and a K-way ranking is used whole: all ranked pairs of a prompt are ONE batch
element weighted 1/C as the RM loss weighs them (`dpo.loss=sigmoid`, `ipo`; conservative DPO
with `dpo.label_smoothing`), or the whole ranking's Plackett-Luce likelihood
(`dpo.loss=plackett_luce`); rlhf_jax/rl/dpo.py has the math and says how ties are treated.

Policy and reference: the policy starts from `init_from` (an SFT workdir, or `hf:DIR`); the
frozen reference is `dpo.reference_from`, else the same `init_from` checkpoint (else, with no
`init_from`, the policy's own seeded initial params, for tests). Reference log-probs are
computed IN THE STEP, as one more forward pass on the frozen params (an ordinary argument,
never donated, never in the optimizer): for one epoch this is the same work as a pass over the
data up front, it needs no second copy of the data or a table to keep in step with the
shuffled iterator, and it resumes with nothing extra to restore. Log-probs sum over response
tokens only (EOS included), from the float32 head. With LoRA (`lora.rank` > 0) and no
`dpo.reference_from`, the reference is the policy's own frozen base with the adapters off
(`lora.adapters_off`, the step's reference argument an empty dict): no second copy is held, and
at step 0 policy and reference are the same computation.

Packed rows (`data.packing`): whole comparisons several to a row of K L positions
(data/packing.py `pack_comparisons`, likelihood.packed_response_sums), the same loss.

Resuming is the supervised loop's (stages/loop.py): params, optimizer state and the data
position from `<workdir>/checkpoints`; the reference is restored again from its source.

Metrics: `dpo/loss`, `dpo/accuracy` (implicit-reward wins r_w > r_l over ranked pairs;
`dpo/tie_frac` the equal ones, all of them at step 0), `dpo/margin` (mean r_w - r_l),
`dpo/chosen_logp` / `dpo/rejected_logp` and `dpo/chosen_reward` / `dpo/rejected_reward` (means
over pairs of winner and loser), the same under `eval/` on the held-out comparisons, and
`eval/kl`: KL(policy || reference) in nats per response, the mean over `dpo.kl_prompts`
held-out prompts of log pi(y|x) - log pi_ref(y|x) for y sampled from the policy at
temperature 1 (`eval/kl_sem` its standard error).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.data import dpo_data, packing, sft_data
from rlhf_jax.infra import compiled, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import lora
from rlhf_jax.models import transformer as model_lib
from rlhf_jax.rl import dpo
from rlhf_jax.sampling import likelihood, rollout, sampler
from rlhf_jax.stages import accumulate, loop, setup

BATCH_NDIM = {"tokens": 3, "mask": 3, "ranks": 2, "kmask": 2, "prompt_len": 1}
# Packed rows (data/packing.py `pack_comparisons`, `data.packing`): [M, T] and [M, C, K].
PACKED_NDIM = {k: nd for k, (nd, _) in packing.comparison_fields(scored=True).items()}


def check_config(c) -> None:
    """One clear sentence for a bad `config.dpo`."""
    if c.loss not in dpo.LOSSES:
        raise ValueError(f"unknown dpo.loss: {c.loss!r}; expected one of {dpo.LOSSES}")
    if not c.beta > 0:
        raise ValueError(f"dpo.beta must be > 0, got {c.beta}")
    if not 0.0 <= c.label_smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {c.label_smoothing}")
    if c.label_smoothing and c.loss not in ("sigmoid", "simpo"):
        raise ValueError(
            f"dpo.label_smoothing={c.label_smoothing} applies to dpo.loss='sigmoid' or 'simpo' "
            f"only, not {c.loss!r}"
        )
    if c.loss in dpo.REFERENCE_FREE and c.reference_from:
        raise ValueError(
            f"dpo.loss={c.loss!r} uses no reference model; dpo.reference_from="
            f"{c.reference_from!r} would be ignored (clear it)"
        )


def response_logprobs(graphdef, params, tokens, mask, prompt_len, with_lengths=False):
    """log pi(response | prompt) [P, K] of comparison rows tokens [P, K, L] (right-padded).

    Sums the float32 log-probs (`likelihood.teacher_forced_logprobs`) of the tokens at positions
    >= prompt_len [P] where `mask` is True. The rows are right-padded, so the model runs with no
    key mask (causal attention keeps the padding out of every real token). With
    `with_lengths`, also the number of summed tokens [P, K] (SimPO's |y|).
    """
    p, k, n = tokens.shape
    flat, flat_mask = tokens.reshape(p * k, n), mask.reshape(p * k, n)
    logp = likelihood.teacher_forced_logprobs(
        graphdef, params, flat, flat_mask, right_padded=True
    )  # [PK, L-1]
    start = jnp.repeat(prompt_len, k)[:, None]  # [PK, 1]
    scored = flat_mask[:, 1:] & (jnp.arange(1, n)[None, :] >= start)
    total = jnp.where(scored, logp, 0.0).sum(axis=-1).reshape(p, k)
    if with_lengths:
        return total, scored.sum(axis=-1).reshape(p, k)
    return total


def reference(params, ref_params):
    """The reference's params: `ref_params`, or where that is empty (a LoRA policy without
    reference_from) the policy's own base, adapters off and no gradient."""
    return ref_params or lora.adapters_off(params)


def batch_loss(params, ref_params, batch, *, graphdef, c):
    """(loss, metrics) of a comparison batch under `c.loss`; SimPO never reads `ref_params`.
    Packed rows (`segments` in the batch) hold [M, C, K] comparisons, read as [M C, K]."""
    if "segments" in batch:
        sums = lambda w, **kw: likelihood.packed_response_sums(graphdef, w, batch, **kw)  # noqa: E731
        ranks, kmask = (batch[x].reshape(-1, batch[x].shape[-1]) for x in ("ranks", "kmask"))
    else:
        args = (batch["tokens"], batch["mask"], batch["prompt_len"])
        sums = lambda w, **kw: response_logprobs(graphdef, w, *args, **kw)  # noqa: E731
        ranks, kmask = batch["ranks"], batch["kmask"]
    if c.loss == "simpo":
        logp, lengths = sums(params, with_lengths=True)
        return dpo.simpo_loss(
            logp, lengths, ranks, kmask, beta=c.beta, gamma=c.simpo_gamma,
            label_smoothing=c.label_smoothing,
        )  # fmt: skip
    logp, logp_ref = sums(params), sums(reference(params, ref_params))
    return dpo.dpo_loss(
        logp, logp_ref, ranks, kmask, beta=c.beta, loss=c.loss,
        label_smoothing=c.label_smoothing,
    )  # fmt: skip


def train_step(state, ref_params, batch, *, graphdef, tx, c, mesh, rules, grad_accum: int = 1):
    """One optimizer step on a comparison batch (data/dpo_data.py layout); with `grad_accum`
    > 1 as that many microbatches whose gradients combine exactly (stages/accumulate.py: each
    microbatch's loss weighs by its prompts with a pair, pair metrics pool over pairs)."""
    with sharding.use_rules(mesh, rules):
        fn = lambda p, mb: batch_loss(p, ref_params, mb, graphdef=graphdef, c=c)  # noqa: E731
        means = dict.fromkeys(PAIR_MEANS, "pairs")
        loss, m, grads = accumulate.accumulate(
            fn, state["params"], batch, grad_accum, weight="prompts", means=means
        )
        params, opt_state = state_lib.apply_gradients(
            tx, grads, state["params"], state["opt_state"]
        )
        out = {
            "dpo/loss": loss,
            "dpo/grad_norm": optax.tree.norm(grads),
            **{f"dpo/{k}": v for k, v in m.items()},
        }
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, out


PAIR_MEANS = (
    "accuracy",
    "tie_frac",
    "margin",
    "chosen_reward",
    "rejected_reward",
    "chosen_logp",
    "rejected_logp",
)


def eval_step(params, ref_params, batch, *, graphdef, c, mesh, rules, microbatches: int = 1):
    """Sums over one eval batch, so batches add up exactly; in the train step's microbatches,
    so the eval never holds more activations than a training microbatch."""

    def sums(mb):
        loss, m = batch_loss(params, ref_params, mb, graphdef=graphdef, c=c)
        out = {"loss_sum": loss * m["prompts"], "prompts": m["prompts"], "pairs": m["pairs"]}
        return {**out, **{k: m[k] * m["pairs"] for k in PAIR_MEANS}}

    with sharding.use_rules(mesh, rules):
        return accumulate.sum_over(sums, batch, microbatches)


def summarize(sums: list[dict]) -> dict:
    total = jax.tree.map(lambda *x: float(np.sum(x)), *sharding.to_host(sums))
    pairs = max(total["pairs"], 1.0)
    return {
        "eval/loss": total["loss_sum"] / max(total["prompts"], 1.0),
        **{f"eval/{k}": total[k] / pairs for k in PAIR_MEANS},
    }


def compile_steps(graphdef, tx, shardings, config, mesh, rules):
    """The jitted train and eval steps with explicit shardings; state donated, reference not.
    A reference-free loss (SimPO) takes an empty reference `{}`: nothing of it is held."""
    ndim = PACKED_NDIM if setup.is_packed(config) else BATCH_NDIM
    batch_sh = {k: sharding.batch_sharding(mesh, rules, nd) for k, nd in ndim.items()}
    free = config.dpo.loss in dpo.REFERENCE_FREE
    ref_sh = None if free else reference_shardings(config, "dpo", shardings)
    kw = dict(graphdef=graphdef, c=config.dpo, mesh=mesh, rules=rules)
    train = compiled.jit(
        train_step,
        in_shardings=(shardings, ref_sh, batch_sh),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
        tx=tx, grad_accum=config.train.grad_accum, **kw,
    )  # fmt: skip
    evaluate = compiled.jit(
        eval_step,
        in_shardings=(shardings["params"], ref_sh, batch_sh),
        out_shardings=sharding.replicated(mesh),
        microbatches=config.train.grad_accum, **kw,
    )  # fmt: skip
    return train, evaluate


def make_kl_eval(config, graphdef, ref_params, tok, prompts, mesh, rules, section="dpo"):
    """(params) -> {"eval/kl", "eval/kl_sem", "eval/response_length"} on held-out prompts, or
    None when there are none. The same prompts and sampling keys at every eval, so the curve
    moves with the policy, not with the draw; every process holds the whole batch. The keys
    (kl_prompts, kl_prompt_len, kl_max_new_tokens) are `config.<section>`'s."""
    c = config[section]
    prompts = prompts[: c.kl_prompts]
    if not prompts:
        return None
    ex, _ = sft_data.encode_prompts(prompts, tok, config.data.prompt_template, c.kl_prompt_len)
    n = len(prompts)
    width = math.lcm(sharding.data_parallel_size(mesh, rules), jax.process_count())
    rows = np.arange(-(-n // width) * width) % n  # repeats fill the last devices, not counted
    root = jax.random.fold_in(jax.random.key(config.seed), 17)
    host = {
        "tokens": ex["tokens"][rows],
        "mask": ex["mask"][rows],
        "keys": jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(len(rows))),
    }
    p = c.kl_prompt_len

    def seq_kl(params, ref, tokens, mask, response_mask):
        with sharding.use_rules(mesh, rules):
            full = jnp.concatenate([mask, response_mask], axis=1)
            lp = lambda w: sampler.sequence_logprobs(graphdef, w, tokens, full, start=p - 1)
            diff = jnp.where(response_mask, lp(params) - lp(reference(params, ref)), 0.0)
            return diff.sum(axis=1)

    rows_sh = lambda nd: sharding.batch_sharding(mesh, rules, nd)
    kl_fn = jax.jit(seq_kl, in_shardings=(None, None, rows_sh(2), rows_sh(2), rows_sh(2)))

    def evaluate(params):
        dev = sharding.put_global(host, mesh, rules)
        out = rollout.generate(
            graphdef,
            params,
            dev["tokens"],
            dev["mask"],
            dev["keys"],
            rollout_cfg=config.get("rollout"),
            max_new_tokens=c.kl_max_new_tokens,
            eos_id=tok.eos_ids,
            pad_id=tok.pad_id,
            mesh=mesh,
            rules=rules,
        )
        kl = kl_fn(params, ref_params, out["tokens"], dev["mask"], out["response_mask"])
        kl, lengths = sharding.to_host((kl, out["lengths"]))
        kl = kl[:n].astype(np.float64)
        return {
            "eval/kl": float(kl.mean()),
            "eval/kl_sem": float(kl.std() / math.sqrt(n)),
            "eval/response_length": float(lengths[:n].mean()),
        }

    return evaluate


def reference_shardings(config, section: str, shardings):
    """The step's reference argument shardings: the params', or none for the empty dict that
    stands for a LoRA policy's own base."""
    shared = lora.has_adapters(shardings["params"]) and not config[section].reference_from
    return None if shared else shardings["params"]


def reference_params(config, model_cfg, mesh, rules, section="dpo"):
    """The frozen reference: `<section>.reference_from`, else `init_from`, else the seeded
    init (tests). A LoRA policy's reference is `{}` (its own base, `reference`) without
    `reference_from`; with it, that model plus zero adapters, so the policy's step runs it."""
    if setup.reference_is_own_base(config, section, model_cfg):
        return {}
    base_cfg = lora.base_config(model_cfg)
    _, _, p_shard = state_lib.param_shardings(base_cfg, mesh, rules)
    ref_from = config[section].reference_from
    src = ref_from or config.init_from
    if not src:
        params = state_lib.init_params(base_cfg, config.seed, p_shard)
    else:
        if ref_from:
            meta = setup.read_init_meta(src) or {}
            setup.check_same_model(meta, base_cfg, src, merged=True)  # a LoRA SFT, merged
            if meta.get("model", {}).get("head", "lm") != "lm":
                raise ValueError(f"{section}.reference_from {src!r} is not an LM-head model")
        abstract = state_lib.abstract_params(base_cfg, mesh, rules)
        params = setup.restore_init_params(src, abstract, rules=rules)
    if not model_cfg.lora_rank:
        return params
    _, _, lora_sh = state_lib.param_shardings(model_cfg, mesh, rules)
    return state_lib.lora_params(model_cfg, config.seed, lora_sh, base=params)


def prepare(config, mesh, workdir: str, section: str, build_data):
    """What a preference stage (DPO and its variants, KTO) sets up before its steps: checks,
    tokenizer, the policy's config, data (`build_data`: dpo_data.build_dpo_data or
    kto_data.build_kto_data) and the optimizer. Returns a dict of them."""
    rules = config.sharding.rules
    t, c = config.train, config[section]
    setup.check_batch(config, mesh, rules)
    tok = setup.load_tokenizer(config, workdir)
    model_cfg, _ = setup.resolve_model(config, tok)
    if model_cfg.head != "lm":
        raise ValueError(
            f"init_from {config.init_from!r} has a {model_cfg.head!r} head; {section} "
            "trains a policy (an SFT or pretraining workdir)"
        )
    kl_len = c.kl_prompt_len + c.kl_max_new_tokens
    if c.kl_prompts and model_cfg.family == "gpt2" and kl_len > model_cfg.max_len:
        raise ValueError(
            f"{section}.kl_prompt_len + {section}.kl_max_new_tokens = {kl_len} exceeds "
            f"model.max_len={model_cfg.max_len}"
        )
    pc, pi = jax.process_count(), jax.process_index()
    packed = {"packed": True} if setup.is_packed(config) else {}  # DPO and its variants only
    train_iter, eval_batches, eval_prompts, info = build_data(
        config.data.train,
        tok,
        template=config.data.prompt_template,
        seq_len=t.seq_len,
        batch_size=t.batch_size // pc,
        seed=config.seed,
        k_max=c.k_max,
        eval_paths=config.data.eval,
        eval_fraction=config.data.eval_fraction,
        process_index=pi,
        process_count=pc,
        **packed,
    )
    eval_batches = eval_batches[: t.eval_batches] if t.eval_batches > 0 else eval_batches
    optim_cfg = setup.optim_config_from(t, t.steps)
    return dict(tok=tok, model_cfg=model_cfg, train_iter=train_iter, eval_batches=eval_batches,
                eval_prompts=eval_prompts, info=info, optim_cfg=optim_cfg,
                tx=state_lib.make_optimizer(optim_cfg))  # fmt: skip


def train(config, mesh, workdir, section, p, *, compile_fn, summarize_fn, ref, kl_ref, loss_key,
          tokens_per_step, title):  # fmt: skip
    """The shared loop (stages/loop.py) for a preference stage set up by `prepare`: steps from
    `compile_fn(graphdef, tx, shardings, config, mesh, rules)` taking (state, ref, batch), evals
    of held-out batches (`summarize_fn` of the eval step's sums) and the KL to `kl_ref`."""
    rules = config.sharding.rules
    tok, model_cfg, t = p["tok"], p["model_cfg"], config.train
    s = loop.Setup(
        data_info=packing.info_metrics(p["info"]),
        config=config,
        mesh=mesh,
        workdir=workdir,
        model_cfg=model_cfg,
        tx=p["tx"],
        steps=t.steps,
        train_iter=p["train_iter"],
        step_fn=None,
        loss_key=loss_key,
        tokens_per_step=tokens_per_step,
        init_params=(lambda a: setup.restore_init_params(config.init_from, a, rules=rules))
        if config.init_from
        else None,
        meta=setup.checkpoint_meta(config, model_cfg, tok, config.stage),
    )
    graphdef, state, shardings, start, ckpt = loop.restore_or_init(s, rules)
    train_fn, eval_fn = compile_fn(graphdef, p["tx"], shardings, config, mesh, rules)
    s.step_fn = lambda st, batch: train_fn(st, ref, batch)
    kl_eval = None
    if kl_ref is not None:
        kl_eval = make_kl_eval(config, graphdef, kl_ref, tok, p["eval_prompts"], mesh, rules,
                               section)  # fmt: skip
    eval_batches = p["eval_batches"]

    def evaluate(params, step):
        out = {}
        if eval_batches:
            put = lambda b: sharding.put_batch(b, mesh, rules)
            out.update(summarize_fn([eval_fn(params, ref, put(b)) for b in eval_batches]))
        if kl_eval is not None:
            out.update(kl_eval(params))
        return out

    if eval_batches or kl_eval is not None:
        s.evaluate = evaluate
    if jax.process_index() == 0:
        n_params = model_lib.param_count(state["params"])
        print(
            f"{title}: {model_cfg.family} {n_params / 1e6:.2f}M params; data: {p['info']}; "
            f"{t.steps} steps; starting at step {start}",
            flush=True,
        )
    return loop.train(s, state, start, ckpt, schedule=state_lib.lr_schedule(p["optim_cfg"]))


def run(config, mesh, workdir: str):
    """DPO training (and SimPO, `dpo.loss=simpo`); resumes from `<workdir>/checkpoints`."""
    c = config.dpo
    check_config(c)
    p = prepare(config, mesh, workdir, "dpo", dpo_data.build_dpo_data)
    # A reference-free loss (SimPO) holds the starting model only for the eval's KL (none
    # with dpo.kl_prompts=0); its steps take an empty reference.
    free = c.loss in dpo.REFERENCE_FREE
    rules = config.sharding.rules
    kl_ref = None
    if not free or c.kl_prompts:
        kl_ref = reference_params(config, p["model_cfg"], mesh, rules)
    t = config.train
    return train(
        config, mesh, workdir, "dpo", p, compile_fn=compile_steps, summarize_fn=summarize,
        ref={} if free else kl_ref, kl_ref=kl_ref, loss_key="dpo/loss",
        tokens_per_step=t.batch_size * p["info"]["k"] * t.seq_len,
        title=f"dpo ({c.loss}, beta={c.beta})",
    )  # fmt: skip
