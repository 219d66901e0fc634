"""Defects found by a line-by-line audit (issue 23), each pinned by a test that failed before its
fix: the source hash, the head's matmul precision, unfinished responses in the score tool, the
pipeline's KL at the sampling temperature, and what an HF export's config.json states."""

import argparse
import dataclasses
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore

from experiments import pipeline as pipeline_exp
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import provenance, sharding
from rlhf_jax.models import config as model_config
from rlhf_jax.models import hf
from rlhf_jax.models import transformer as M
from rlhf_jax.sampling import likelihood, sampler
from rlhf_jax.stages import pipeline_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = sharding.DEFAULT_RULES


def _tiny(seed=0, **over):
    cfg = model_config.preset("tiny", **{"dtype": "float32", **over})
    graphdef, params = nnx.split(M.build(cfg, seed=seed), nnx.Param)
    return cfg, graphdef, nnx.to_pure_dict(params)


# --- provenance -------------------------------------------------------------------------------


def test_source_hash_hashes_the_sources_and_changes_with_them(tmp_path):
    empty = hashlib.sha256().hexdigest()[:16]
    assert provenance.source_hash() != empty  # the default root is the checkout's
    assert provenance.source_hash() == provenance.source_hash(ROOT)
    for sub in ("rlhf_jax", "launch"):  # a copy of part of the checkout, as on a TPU VM
        shutil.copytree(
            os.path.join(ROOT, sub), tmp_path / sub, ignore=shutil.ignore_patterns("__pycache__")
        )
    before = provenance.source_hash(str(tmp_path))
    assert before != empty
    (tmp_path / "rlhf_jax" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "rlhf_jax" / "notes.txt").write_text("not source")
    assert provenance.source_hash(str(tmp_path)) == before  # only .py files count
    with open(tmp_path / "rlhf_jax" / "rl" / "ppo_math.py", "a") as f:
        f.write("\n# an edit\n")
    edited = provenance.source_hash(str(tmp_path))
    assert edited != before
    os.rename(tmp_path / "launch" / "run.py", tmp_path / "launch" / "run2.py")
    assert provenance.source_hash(str(tmp_path)) != edited  # paths are hashed too
    with pytest.raises(FileNotFoundError, match="holds no rlhf_jax/__init__.py"):
        provenance.source_hash(str(tmp_path / "launch"))


# --- the head's precision -----------------------------------------------------------------------


def _dots(closed):
    """Every dot_general of a jaxpr, nested jaxprs (jit, remat, scan) included."""

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                yield e
            for v in e.params.values():
                for sub in v if isinstance(v, (list, tuple)) else [v]:
                    if isinstance(sub, jcore.ClosedJaxpr):
                        yield from walk(sub.jaxpr)
                    elif isinstance(sub, jcore.Jaxpr):
                        yield from walk(sub)

    return list(walk(closed.jaxpr))


def _head_dots(closed, cfg):
    """The head's matmuls: those with a [D, V] or [D] (score) operand."""
    heads = {(cfg.d_model, cfg.vocab_size), (cfg.d_model,)}
    return [e for e in _dots(closed) if any(tuple(v.aval.shape) in heads for v in e.invars)]


HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize(
    "over",
    [
        dict(family="llama", tie_embeddings=True, dtype="bfloat16"),
        dict(family="gpt2", scan_layers=True),
        dict(family="llama", head="scalar", dtype="bfloat16"),
    ],
)
def test_every_head_matmul_asks_for_highest_precision(over):
    """On TPU / recent GPUs the default float32 matmul is one bf16 pass / TF32: the float32
    head must say HIGHEST, for logits, scores and every log-prob path."""
    cfg, graphdef, params = _tiny(**over)
    tokens = jnp.zeros((2, 6), jnp.int32)
    forward = jax.make_jaxpr(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, tokens)
    dots = _head_dots(forward, cfg)
    assert dots and all(e.params["precision"] == HIGHEST for e in dots), dots
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in dots)
    if cfg.head == "scalar":
        return
    mask = jnp.ones((2, 6), bool)
    paths = {  # the sampler's teacher-forced log-probs (likelihood.py, the pipeline's KL, DPO)
        "sequence_logprobs": lambda p: sampler.sequence_logprobs(
            graphdef, p, tokens, mask, start=2, temperature=0.7
        ),
    }
    for name, fn in paths.items():
        dots = _head_dots(jax.make_jaxpr(fn)(params), cfg)
        assert dots and all(e.params["precision"] == HIGHEST for e in dots), name


# --- the score tool and unfinished responses ------------------------------------------------


class _CharTok:
    """A tokenizer with no file: one id per character."""

    bos_id, eos_id, pad_id, add_bos = 1, 2, 0, True
    eos_ids = (2,)

    def encode(self, text):
        return [3 + ord(c) % 90 for c in text]


def test_score_tool_appends_eos_only_to_finished_responses(tmp_path, monkeypatch):
    from rlhf_jax.sampling import load
    from rlhf_jax.tools import score

    cfg, graphdef, params = _tiny(family="llama", head="scalar")
    params["score_head"] = np.asarray(jax.random.normal(jax.random.key(1), (cfg.d_model,)))
    template, seq_len, bias = "Q: {prompt}\nA: ", 40, 0.5
    meta = {"config": {"data": {"prompt_template": template}, "train": {"seq_len": seq_len}}}
    meta["reward_bias"] = bias
    tok = _CharTok()
    monkeypatch.setattr(load, "load_model", lambda *a, **k: (graphdef, params, cfg, tok, meta))
    rows = [
        {"prompt": "add 2", "response": "four", "finished": True},
        {"prompt": "add 3", "response": "five and", "finished": False},  # cut at the limit
        {"prompt": "add 4", "response": "six"},  # no field: finished
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = argparse.Namespace(
        checkpoint="rm", data=str(tmp_path / "in.jsonl"), out=str(tmp_path / "out.jsonl"),
        batch_size=8, seq_len=0, no_bias=False,
    )  # fmt: skip
    score.run(args)
    got = [json.loads(line)["score"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    forward = jax.jit(lambda t: nnx.merge(graphdef, params)(t)[0])
    want, with_eos = [], []
    for r in rows:  # one unpadded row each, read at its last token
        ids = [tok.bos_id] + tok.encode(template.format(prompt=r["prompt"]))
        ids += tok.encode(r["response"])
        last = lambda x: float(forward(jnp.asarray([x], jnp.int32))[0, -1]) + bias
        with_eos.append(last(ids + [tok.eos_id]))
        want.append(with_eos[-1] if r.get("finished", True) else last(ids))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert abs(want[1] - with_eos[1]) > 1e-3  # the EOS would have changed the cut row's score

    (tmp_path / "bad.jsonl").write_text(json.dumps({**rows[0], "finished": "yes"}) + "\n")
    args.data = str(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match=r"bad.jsonl: record 1: field \"finished\" must be true"):
        score.run(args)


# --- KL from SFT at the sampling temperature ------------------------------------------------


def _softmax64(logits, t):
    z = np.asarray(logits, np.float64) / t
    z = z - z.max()
    return np.exp(z) / np.exp(z).sum()


def test_tempered_logprobs_give_the_exact_kl_of_the_tempered_distributions():
    """Every token of a tiny vocabulary as a one-token response: sum_y pi_T(y) (log pi_T(y) -
    log ref_T(y)) from the teacher-forced sums equals KL(pi_T || ref_T) computed in numpy from
    the models' logits. At T = 1 the same sums (what was computed before) are another number."""
    v, temperature = 32, 0.5
    cfg, g_pi, p_pi = _tiny(seed=0, family="llama", vocab_size=v)
    _, g_ref, p_ref = _tiny(seed=1, family="llama", vocab_size=v)
    prompt = [1, 7, 5, 9]
    mesh = mesh_lib.build_mesh(mesh_lib.config(), jax.devices())

    def sums(graphdef, params, t):
        return likelihood.sequence_logprob_sums(
            graphdef, params, [prompt] * v, [[y] for y in range(v)], pad_id=0, mesh=mesh,
            rules=RULES, batch_size=v, temperature=t,
        )  # fmt: skip

    def next_logits(graphdef, params):
        return nnx.merge(graphdef, params)(jnp.asarray([prompt], jnp.int32))[0][0, -1]

    pi = _softmax64(next_logits(g_pi, p_pi), temperature)
    ref = _softmax64(next_logits(g_ref, p_ref), temperature)
    exact = float(np.sum(pi * (np.log(pi) - np.log(ref))))
    lp, lr = sums(g_pi, p_pi, temperature), sums(g_ref, p_ref, temperature)
    np.testing.assert_allclose(lp, np.log(pi), atol=1e-5)
    assert abs(np.sum(pi * (lp - lr)) - exact) < 1e-5
    at_one = np.sum(pi * (sums(g_pi, p_pi, 1.0) - sums(g_ref, p_ref, 1.0)))
    assert abs(at_one - exact) > 1e-2
    with pytest.raises(ValueError, match="temperature=0"):
        sums(g_pi, p_pi, 0)


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_pipeline_eval_scores_the_kl_at_the_sampling_temperature(tmp_path, monkeypatch,
                                                                 temperature):  # fmt: skip
    config = pipeline_exp.get_config()
    config.evaluate.temperature = temperature
    models = [
        dict(key=k, label=k, method=k, round=1, workdir=str(tmp_path / k)) for k in ("sft", "ppo")
    ]
    seen = []

    def kl(records, policy_dir, reference_dir, **kw):
        seen.append(kw["temperature"])
        return {"kl": 0.25, "kl_sem": 0.01}

    monkeypatch.setattr(pipeline_eval, "has_checkpoint", lambda w: True)
    monkeypatch.setattr(pipeline_eval, "sample", lambda *a, **k: [{"prompt": "p"}])
    monkeypatch.setattr(pipeline_eval, "gold_entry", lambda recs, n: {"gold_score": 0.0})
    monkeypatch.setattr(pipeline_eval, "heldout_loss", lambda *a: 1.0)
    monkeypatch.setattr(likelihood, "kl_to_reference", kl)
    out = pipeline_eval.evaluate(config, str(tmp_path), {"eval_prompts": "", "heldout": ""},
                                 models, None, RULES, {})  # fmt: skip
    with open(out) as f:
        entries = json.load(f)["models"]
    if temperature:
        assert seen == [temperature, temperature] and entries["ppo"]["kl_from_sft"] == 0.25
    else:  # greedy decoding samples no distribution: no KL is claimed
        assert seen == [] and entries["ppo"]["kl_from_sft"] is None


# --- Hugging Face export config.json --------------------------------------------------------


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_export_config_reward_bias_and_pad_id(tmp_path, monkeypatch, head):
    """A policy's meta carries its RM's bias (PPO records it) but only an RM's config.json may;
    a Llama 3 RM states no pad id, and transformers then scores one row at a time."""
    from rlhf_jax.infra import checkpoint
    from rlhf_jax.tools import convert

    cfg, _, params = _tiny(family="llama", head=head)
    ids = {"bos_token_id": 128000, "eos_token_id": [128001, 128009], "pad_token_id": None}
    meta = {"model": dataclasses.asdict(cfg), "hf": ids, "reward_bias": 0.75}
    monkeypatch.setattr(checkpoint, "read_meta", lambda *a, **k: meta)
    monkeypatch.setattr(checkpoint, "restore_params", lambda *a, **k: params)
    mesh = mesh_lib.build_mesh(mesh_lib.config(), jax.devices()[:1])
    convert.export_workdir(str(tmp_path / "work"), str(tmp_path / "hf"), mesh, RULES)
    written = hf.read_config(str(tmp_path / "hf"))
    if head == "lm":
        assert hf.REWARD_BIAS_FIELD not in written and written["pad_token_id"] is None
    else:
        assert written[hf.REWARD_BIAS_FIELD] == 0.75
        assert written["pad_token_id"] == 128001  # the first EOS
    assert written["eos_token_id"] == [128001, 128009]


def test_hf_export_target_is_ignored_by_git():
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "/hf/" in f.read().split()


def test_config_counts_are_checked_at_every_depth():
    from rlhf_jax.stages import setup

    c = ml_collections.ConfigDict({"train": {"steps": 3}, "stages": {"rm": {"train": {}}}})
    c.stages.rm.train.steps = -5
    with pytest.raises(ValueError, match=r"^config.stages.rm.train.steps=-5 must be >= 0$"):
        setup.check_counts(c)
    c.stages.rm.train.steps = 0
    setup.check_counts(c)
