"""Reward model: padding-invariant score, a learnable synthetic preference, the normalisation
bias, and the per-pair ablation through the real stage."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import pretrain, rm
from rlhf_jax.data import lm_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.infra import checkpoint, metrics, sharding
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import transformer as M
from rlhf_jax.sampling import reward
from rlhf_jax.stages import rm as rm_stage
from rlhf_jax.stages import setup


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    docs = lm_data.read_documents(pretrain.get_config().data.train)
    return tok_lib.Tokenizer.load(tok_lib.train_tokenizer(docs, path, 512))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_score_ignores_padding_side_and_amount(family):
    cfg = model_config.preset("tiny", family=family, dtype="float32", head="scalar")
    model = M.build(cfg, seed=0)
    graphdef, params = nnx.split(model)
    # A non-zero head so scores differ between positions.
    params["score_head"] = nnx.Param(jax.random.normal(jax.random.key(1), (64,)))
    score = jax.jit(
        lambda t, m, rp: reward.sequence_scores(graphdef, params, t, m, right_padded=rp),
        static_argnums=2,
    )
    seq = np.random.default_rng(0).integers(4, 512, size=(2, 11)).astype(np.int32)

    def pad(width, left):
        t = np.zeros((2, width), np.int32)
        m = np.zeros((2, width), bool)
        if left:
            t[:, -11:], m[:, -11:] = seq, True
        else:
            t[:, :11], m[:, :11] = seq, True
        return jnp.asarray(t), jnp.asarray(m)

    ref = score(*pad(32, False), False)
    for width in (32, 64):
        for left in (False, True):
            np.testing.assert_allclose(score(*pad(width, left), False), ref, atol=1e-5)
        np.testing.assert_allclose(score(*pad(width, False), True), ref, atol=1e-5)
    # The score is read at the last real token: changing it changes the score.
    t, m = pad(32, False)
    assert not np.allclose(score(t.at[:, 10].set(5), m, True), ref)


def synthetic_comparisons(path, n, seed):
    """Chosen responses always contain 'apples'; rejected ones never do."""
    r = random.Random(seed)
    words = ["bob", "went", "to", "the", "park", "with", "coins", "stones", "cards", "pens"]
    with open(path, "w") as f:
        for _ in range(n):
            body = lambda: " ".join(r.choice(words) for _ in range(r.randint(3, 7)))
            k = r.randint(2, 4)
            good = r.randrange(k)
            resp = [body() for _ in range(k)]
            resp[good] = "apples " + resp[good]
            others = [i for i in range(k) if i != good]
            ranking = [good] + ([others] if len(others) > 1 else others)
            f.write(
                json.dumps(
                    {"prompt": f"say {r.randrange(30)}", "responses": resp, "ranking": ranking}
                )
                + "\n"
            )


def rm_config(tok, train, steps, batching="per_prompt", norm=None):
    c = rm.get_config()
    c.tokenizer.path = tok.path
    c.data.train = train
    c.rm.batching = batching
    c.rm.norm_data = norm or pretrain.get_config().data.train.replace("corpus", "demos")
    c.rm.norm_max = 64
    c.train.update(
        steps=steps,
        batch_size=8,
        seq_len=64,
        eval_every=steps,
        ckpt_every=steps,
        log_every=10,
        lr=3e-3,
        warmup_steps=5,
    )
    return c


@pytest.mark.slow
def test_tiny_rm_learns_synthetic_preference_and_bias_centres(tmp_path, tok):
    synthetic_comparisons(tmp_path / "cmp.jsonl", 400, seed=0)
    config = rm_config(tok, str(tmp_path / "cmp.jsonl"), steps=60)
    config.data.eval_fraction = 0.0
    synthetic_comparisons(tmp_path / "eval.jsonl", 64, seed=1)
    config.data.eval = str(tmp_path / "eval.jsonl")
    mesh = mesh_lib.build_mesh(config.mesh)
    state = rm_stage.run(config, mesh, str(tmp_path / "rm"))
    rows = metrics.read_metrics(str(tmp_path / "rm" / "metrics.jsonl"))
    acc = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert acc[-1] > 0.95, acc
    # The pairwise loss is blind to the head's bias: it never moves (Adam would otherwise walk
    # it on rounding noise), so scores differ from 1 to 2 processes only as their spread does.
    assert float(jax.device_get(state["params"]["score_bias"])) == 0.0

    # Normalisation: with the stored bias the reference responses average 0.
    bias = rm_stage.load_bias(str(tmp_path / "rm"))
    assert bias == checkpoint.read_meta(str(tmp_path / "rm"))["reward_bias"]
    model_cfg, _ = setup.resolve_model(config, tok)
    graphdef, _, _ = M.abstract(
        model_config.ModelConfig(**{**model_cfg.__dict__, "head": "scalar"})
    )
    with open(config.rm.norm_data) as f:
        demos = [json.loads(line) for line in f][:64]
    scores = reward.score_texts(
        graphdef,
        state["params"],
        tok,
        [(d["prompt"], d["response"]) for d in demos],
        template=config.data.prompt_template,
        seq_len=64,
        mesh=mesh,
        rules=config.sharding.rules,
        bias=bias,
    )
    assert abs(scores.mean()) < 1e-3 and abs(bias) > 1e-3


@pytest.mark.slow
def test_per_pair_ablation_runs_and_logs(tmp_path, tok):
    synthetic_comparisons(tmp_path / "cmp.jsonl", 80, seed=2)
    config = rm_config(tok, str(tmp_path / "cmp.jsonl"), steps=4, batching="per_pair")
    mesh = mesh_lib.build_mesh(config.mesh)
    rm_stage.run(config, mesh, str(tmp_path / "rm"))
    rows = metrics.read_metrics(str(tmp_path / "rm" / "metrics.jsonl"))
    assert any("rm/accuracy" in r for r in rows) and any("eval/accuracy" in r for r in rows)
    assert sharding.data_parallel_size(mesh, config.sharding.rules) == 8


@pytest.mark.slow
def test_score_command_writes_scores_with_bias(tmp_path, tok):
    synthetic_comparisons(tmp_path / "cmp.jsonl", 80, seed=3)
    config = rm_config(tok, str(tmp_path / "cmp.jsonl"), steps=2)
    rm_stage.run(config, mesh_lib.build_mesh(config.mesh), str(tmp_path / "rm"))
    rows = [{"prompt": "say 1", "response": r} for r in ("apples bob", "bob went", "the park")]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from rlhf_jax.tools import score

    args = ["--checkpoint", str(tmp_path / "rm"), "--data", str(tmp_path / "in.jsonl")]
    score.main([*args, "--out", str(tmp_path / "a.jsonl")])
    score.main([*args, "--out", str(tmp_path / "b.jsonl"), "--no-bias"])
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    bias = rm_stage.load_bias(str(tmp_path / "rm"))
    assert [r["response"] for r in a] == [r["response"] for r in rows]
    np.testing.assert_allclose(
        [r["score"] - s["score"] for r, s in zip(a, b, strict=True)], bias, atol=1e-6
    )
    with pytest.raises(SystemExit):
        score.main(["--checkpoint", str(tmp_path / "nope"), "--data", "x", "--out", "y"])
