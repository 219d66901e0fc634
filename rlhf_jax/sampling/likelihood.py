"""Teacher-forced log-likelihood of tokens under a model, and KL(policy || reference) from
samples.

Owns `teacher_forced_logprobs`, the ONE function that computes per-token log-probs of given
tokens under a model (the sampler's teacher-forced reference, PPO's and GRPO's logp_old / logp_ref
/ logp, DPO's, SimPO's and KTO's response sums, the likelihoods and KL below all call it), and
on the host `response_logprobs` (the summed log-probability of each response given its prompt)
and `kl_to_reference`, the sample estimate

    KL(pi || pi_ref) = E_{x, y ~ pi} [ log pi(y|x) - log pi_ref(y|x) ]

over completions sampled from the policy (the records `generate` writes). A sequence is laid out
exactly as sampling and SFT see it: [bos] + template(prompt) + response tokens, plus the EOS that
ended the response when it finished (a response cut at the length limit has none), so its
log-probability is the one the sampler reports for the same tokens when it samples at the same
`temperature` without top-k / top-p. Logits come from the model's float32 head (HIGHEST-precision
matmul) whatever the compute dtype.

Temperature: samples drawn at temperature T come from pi_T = softmax(logits / T), so the KL they
estimate is KL(pi_T || pi_ref_T), both models tempered alike (the reference as it would be
sampled under the same decoding settings). Scoring them under the untempered models, as the
pipeline did, gives E_{pi_T}[log pi - log pi_ref], which is no KL at T != 1 (it can be negative).

Both terms of the KL are recomputed teacher-forced from the response *text*: the sampled token
ids are not stored, and re-encoding a sampled text may tokenize it differently, so the records'
own "logprob" (of the sampled tokenization) would not pair with the reference's term. With both
terms from the same ids, the KL of a model to itself is exactly 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data import sft_data
from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.rl import losses
from rlhf_jax.sampling import load


def teacher_forced_logprobs(
    graphdef,
    params,
    tokens,
    mask,
    *,
    start: int = 0,
    temperature=1.0,
    right_padded: bool = False,
    return_logits: bool = False,
    positions=None,
    segments=None,
):
    """Teacher-forced log p_T(tokens[:, t+1] | tokens[:, :t+1]) of padded rows, in float32.

    p_T = softmax(logits / temperature): the distribution `sampler.make_sampler` draws from at
    that temperature without top-k / top-p, so these are the log-probs of what it sampled. The
    logits come from the model's float32 head at HIGHEST precision (`model.unembed`) whatever
    the compute dtype. Positions count real tokens only and padding is masked out of attention,
    so a row's log-probs do not depend on its padding's side or amount. The head runs only at
    the predicting positions start .. S-2: scoring the responses of [B, P + T] rollouts
    (start = P - 1) builds [B, T, V] logits, never the prompt's. Call it inside a jitted
    function (under `sharding.use_rules` to apply the model's sharding constraints).

    Args:
      graphdef, params: an LM-head model (NNX graphdef and its params pure dict).
      tokens: [B, S] int32.
      mask: [B, S] bool, True at real tokens.
      start: the first predicting position (static); 0 scores every token after the first.
      temperature: > 0, divides the logits (a Python float or a traced scalar).
      right_padded: every row is its real tokens then padding (DPO's comparison rows): causal
        attention already keeps the padding out of every real token, so the model runs with its
        default positions and no key mask (the attention kernel needs no mask bias) and gives
        the same log-probs.
      return_logits: also return the logits the log-probs are taken from (PPO's entropy).
      positions, segments: packed rows (data/packing.py) [B, S] int32: the model reads the
        segment ids as its key mask and the positions as given (`mask` is then segments > 0).

    Returns:
      logp [B, S-1-start] float32: entry t scores tokens[:, start+t+1]; 0 where it or the token
      before it is padding. With `return_logits`, (logp, logits / temperature [B, S-1-start, V]
      float32).
    """
    model = state_lib.merge(graphdef, params)
    mask = mask.astype(bool)
    if segments is not None:
        hidden, _ = model(tokens, positions=positions, key_mask=segments, return_hidden=True)
    elif right_padded:
        hidden, _ = model(tokens, return_hidden=True)  # [B, S, D]
    else:
        positions = jnp.maximum(jnp.cumsum(mask, axis=-1, dtype=jnp.int32) - 1, 0)  # [B, S]
        hidden, _ = model(tokens, positions=positions, key_mask=mask, return_hidden=True)
    logits = model.unembed(hidden[:, start:-1]) / temperature  # [B, S-1-start, V] float32
    logp = losses.token_logprobs(logits, tokens[:, start + 1 :])
    logp = jnp.where(mask[:, start:-1] & mask[:, start + 1 :], logp, 0.0)
    return (logp, logits) if return_logits else logp


def packed_response_sums(graphdef, params, batch, with_lengths: bool = False):
    """log pi(response | prompt) [M C, K] of packed comparison rows (data/packing.py's
    `pack_comparisons`: tokens, segments, positions, scored [M, T]; seg_of [M, C, K]), 0 at
    absent slots; with `with_lengths` also the scored tokens per response [M C, K] (SimPO's |y|).

    Each sequence is its own segment, so its log-probs are those of its unpacked row; they are
    summed per segment with float32 adds (no matmul, so no backend matmul precision enters),
    then read out at each comparison's segment ids."""
    tokens, segments = batch["tokens"], batch["segments"]
    m, c, k = batch["seg_of"].shape
    logp = teacher_forced_logprobs(
        graphdef, params, tokens, segments > 0, positions=batch["positions"], segments=segments
    )  # [M, T-1]: entry t scores token t + 1
    scored, seg = batch["scored"][:, 1:], segments[:, 1:]
    one = seg[:, :, None] == jnp.arange(c * k + 1)[None, None, :]  # [M, T-1, CK+1]

    def per_response(values):  # [M, T-1] -> [M C, K]
        sums = jnp.sum(jnp.where(one & scored[:, :, None], values[:, :, None], 0.0), axis=1)
        return jnp.take_along_axis(sums, batch["seg_of"].reshape(m, c * k), 1).reshape(m * c, k)

    total = per_response(logp)
    if with_lengths:
        return total, per_response(jnp.ones_like(logp))
    return total


@functools.lru_cache(maxsize=8)
def _jitted_logprob_sums(graphdef, mesh, rules):
    """jit of (params, tokens [B, S], mask [B, S], targets [B, S-1], temperature []) -> summed
    logprobs [B]."""
    rows = lambda ndim: sharding.batch_sharding(mesh, rules, ndim)

    def fn(params, tokens, mask, target_mask, temperature):
        with sharding.use_rules(mesh, rules):
            logp = teacher_forced_logprobs(
                graphdef, params, tokens, mask, temperature=temperature
            )  # [B, S-1]
            return jnp.sum(jnp.where(target_mask, logp, 0.0), axis=-1)

    # None: params keep the sharding they were restored with (and the temperature is replicated:
    # traced, so every temperature shares one compile).
    shardings = (None, rows(2), rows(2), rows(2), None)
    return jax.jit(fn, in_shardings=shardings, out_shardings=rows(1))


def sequence_logprob_sums(
    graphdef,
    params,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    mesh,
    rules,
    max_len: int | None = None,
    batch_size: int = 16,
    temperature: float = 1.0,
) -> np.ndarray:
    """Sum over response tokens of log p(token | everything before it), teacher-forced.

    Args:
      graphdef, params: an LM-head model (params sharded or not).
      prompt_ids: per row, the prompt tokens (with bos), at least one.
      response_ids: per row, the response tokens to score (with EOS if it is to be scored).
      pad_id: fills the right padding.
      mesh, rules: rows are sharded over `act_batch`.
      max_len: the model's learned positions (GPT-2); a longer row is an error. None: no limit.
      batch_size: rows per compiled call (rounded to the data-parallel size).
      temperature: > 0; the log-probs of softmax(logits / temperature).

    Returns:
      float64 [N]; 0 for an empty response.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: log-probs need a temperature > 0")
    rules = sharding.normalize_rules(rules)  # hashable, for the compile cache
    n = len(prompt_ids)
    if n == 0:
        return np.zeros(0)
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    if min(len(p) for p in prompt_ids) < 1:
        raise ValueError("every prompt needs at least one token (bos)")
    longest = max(lengths)
    if max_len is not None and longest > max_len:
        i = lengths.index(longest)
        raise ValueError(
            f"row {i} is {longest} tokens (prompt + response) but the model has {max_len} positions"
        )
    # One width (a multiple of 8) and one batch shape for every call: one compile.
    width = 8 * math.ceil(longest / 8)
    if max_len is not None:
        width = min(width, max_len)
    dp = sharding.data_parallel_size(mesh, rules)
    batch = dp * math.ceil(min(batch_size, n) / dp)
    fn = _jitted_logprob_sums(graphdef, mesh, rules)
    out = []
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        tokens = np.full((batch, width), pad_id, np.int32)
        mask = np.zeros((batch, width), bool)
        targets = np.zeros((batch, width - 1), bool)  # [B, S-1]: targets[t] scores tokens[t+1]
        mask[:, 0] = True  # dummy rows (filling the last batch) keep one real token
        for j, i in enumerate(range(lo, hi)):
            p, r = list(prompt_ids[i]), list(response_ids[i])
            tokens[j, : len(p) + len(r)] = p + r
            mask[j, : len(p) + len(r)] = True
            targets[j, len(p) - 1 : len(p) + len(r) - 1] = True
        dev = sharding.put_global({"t": tokens, "m": mask, "y": targets}, mesh, rules)
        sums = fn(params, dev["t"], dev["m"], dev["y"], jnp.float32(temperature))
        out.append(sharding.to_host(sums).astype(np.float64)[: hi - lo])
    return np.concatenate(out)


def encode_responses(tok, records: Sequence[dict], template: str):
    """(prompt ids, response ids) of records {"prompt", "response", "finished"}: the response
    text re-encoded, plus EOS when it finished (a missing "finished" counts as finished); a
    finished answer to a conversation as the tokenizer's chat template renders it
    (`sft_data.response_ids`, as the RM was trained)."""
    prompts = [sft_data.prompt_ids(tok, template, r["prompt"]) for r in records]

    def response(r):
        if r.get("finished", True):
            return sft_data.response_ids(tok, template, r["prompt"], r["response"])
        return tok.encode(r["response"])

    return prompts, [response(r) for r in records]


def _template(template: str | None, meta: dict) -> str:
    """The given template, else the checkpoint config's, else the raw prompt (as generate)."""
    if template is not None:
        return template
    return meta.get("config", {}).get("data", {}).get("prompt_template") or "{prompt}"


def response_logprobs(
    model_dir: str,
    records: Sequence[dict],
    *,
    mesh,
    rules=None,
    template: str | None = None,
    batch_size: int = 16,
    temperature: float = 1.0,
) -> np.ndarray:
    """log p(response | prompt) under the LM in `model_dir`, per record.

    Args:
      model_dir: a stage workdir with an LM head (pretrain, SFT, PPO policy, rsft round).
      records: dicts with "prompt", "response" (text) and "finished" (EOS is scored when True).
      mesh, rules: where the model is placed; rules default to sharding.DEFAULT_RULES.
      template: the prompt format; None: the checkpoint config's `data.prompt_template`.
      batch_size: rows per compiled call.
      temperature: > 0; the log-probs of the model's distribution at that temperature.

    Returns:
      float64 [N].
    """
    rules = rules if rules is not None else sharding.DEFAULT_RULES
    graphdef, params, cfg, tok, meta = load.load_model(model_dir, mesh, rules)
    if cfg.head != "lm":
        raise ValueError(f"{model_dir} has a {cfg.head!r} head; log-likelihoods need an LM head")
    prompts, responses = encode_responses(tok, records, _template(template, meta))
    return sequence_logprob_sums(
        graphdef,
        params,
        prompts,
        responses,
        pad_id=tok.pad_id,
        mesh=mesh,
        rules=rules,
        max_len=cfg.max_len if cfg.family == "gpt2" else None,
        batch_size=batch_size,
        temperature=temperature,
    )


def kl_to_reference(
    records: Sequence[dict],
    policy_dir: str,
    reference_dir: str,
    *,
    mesh,
    rules=None,
    template: str | None = None,
    batch_size: int = 16,
    temperature: float = 1.0,
) -> dict:
    """Sample estimate of KL(policy_T || reference_T) in nats per response, both models at the
    temperature T the records were sampled at (module docstring).

    Args:
      records: completions sampled from the policy, as `generate` writes them ("prompt",
        "response", "finished"; other fields are ignored).
      policy_dir: the workdir that sampled them.
      reference_dir: the reference model's workdir (e.g. the SFT stage).
      mesh, rules: where the models are placed (one at a time).
      template: the prompt format for both; None: each checkpoint config's own.
      batch_size: rows per compiled call.
      temperature: the temperature the records were sampled at (> 0; greedy records have no
        sampling distribution to take a KL of).

    Returns:
      {"kl": mean of log pi_T - log pi_ref_T, "kl_std", "kl_sem" (standard error of the mean),
       "policy_logprob", "reference_logprob" (means), "n"}.
    """
    if not records:
        raise ValueError("kl_to_reference needs at least one record")
    kw = dict(mesh=mesh, rules=rules, template=template, batch_size=batch_size)
    kw["temperature"] = temperature
    logp = response_logprobs(policy_dir, records, **kw)
    logp_ref = response_logprobs(reference_dir, records, **kw)
    diff = logp - logp_ref
    return {
        "kl": float(diff.mean()),
        "kl_std": float(diff.std()),
        "kl_sem": float(diff.std() / math.sqrt(len(diff))),
        "policy_logprob": float(logp.mean()),
        "reference_logprob": float(logp_ref.mean()),
        "n": len(diff),
    }
