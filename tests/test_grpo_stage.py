"""GRPO stage through `grpo.run`: the first minibatch is exactly on-policy, the rollout scores
come from the reward function, kill-and-resume is bitwise, and the config reaches the steps
(group rows, advantages, the KL's place, each loss normalisation) as a naive loop says."""

import dataclasses
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_grpo_math
import test_rl_data
from flax import nnx

from experiments import grpo, pretrain
from rlhf_jax.data import lm_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.infra import checkpoint, metrics, sharding
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.models import transformer as M
from rlhf_jax.sampling import sampler
from rlhf_jax.stages import grpo as grpo_stage
from rlhf_jax.stages import grpo_steps, rl_data, setup

pytestmark = pytest.mark.slow  # in-process stage runs


def count_a(prompts, responses):
    """A reward a random policy's samples already vary in, so groups are rarely flat."""
    return [min(r.count("a"), 5) / 5 for r in responses]


def write_init_dir(root):
    """A seeded tiny LM written as a stage workdir `root/sft` (no training needed to test a
    loop), and its tokenizer at `root/tok.model`."""
    docs = lm_data.read_documents(pretrain.get_config().data.train)
    tok_path = tok_lib.train_tokenizer(docs, str(root / "tok.model"), 512)
    tok = tok_lib.Tokenizer.load(tok_path)
    cfg = setup.model_config_from(grpo.get_config(), tok.vocab_size)
    mesh = mesh_lib.build_mesh(grpo.get_config().mesh, jax.devices())
    _, _, shard = state_lib.param_shardings(cfg, mesh, grpo.get_config().sharding.rules)
    params = state_lib.init_params(cfg, 0, shard)
    ckpt = checkpoint.Checkpointer(str(root / "sft" / "checkpoints"))
    ckpt.save(1, {"params": params}, meta={"model": dataclasses.asdict(cfg), "stage": "sft"})
    ckpt.close()
    shutil.copyfile(tok_path, root / "sft" / setup.TOKENIZER_FILE)
    return root


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    return write_init_dir(tmp_path_factory.mktemp("grpo"))


def grpo_config(root):
    c = grpo.get_config()
    c.init_from = str(root / "sft")
    c.grpo.reward_fn = "test_grpo_stage:count_a"
    c.grpo.update(prompts=4, group_size=4, minibatch=8, epochs=2, prompt_len=32)
    c.grpo.update(max_new_tokens=8, eval_prompts=4, ptx_coef=1.0, ptx_batch=8, ptx_seq_len=32)
    c.data.ptx = pretrain.get_config().data.train
    c.train.update(steps=4, log_every=1, ckpt_every=2, eval_every=4, lr=1e-3)
    return c


def run(config, workdir):
    return grpo_stage.run(config, mesh_lib.build_mesh(config.mesh, jax.devices()), str(workdir))


class Crash(Exception):
    pass


def test_on_policy_first_minibatch_and_bitwise_resume(init_dir, monkeypatch, capsys):
    config = grpo_config(init_dir)
    straight = run(config, init_dir / "a")
    # Prompts longer than grpo.prompt_len are counted and reported, as PPO reports them.
    assert "'prompts_cut': " in capsys.readouterr().out
    rows = [r for r in metrics.read_metrics(str(init_dir / "a" / "metrics.jsonl"))]
    train = [r for r in rows if "grpo/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:
        # One in exact arithmetic; score and update are compiled apart (a few float32 ulps).
        assert r["grpo/first_ratio_max"] == pytest.approx(1.0, abs=1e-5)
        assert r["grpo/first_ratio_min"] == pytest.approx(1.0, abs=1e-5)
        assert 0.0 < r["grpo/score"] <= 1.0 and r["grpo/flat_groups"] < 1.0
    assert any(r["grpo/ratio_max"] > 1.0 + 1e-4 for r in train)  # later minibatches moved
    assert any("eval/score" in r for r in rows) and all(r["grpo/ptx_loss"] > 0 for r in train)

    real_write = metrics.MetricsWriter.write

    def crash_at_3(self, step, m):
        real_write(self, step, m)
        if step == 3:
            raise Crash("simulated preemption after iteration 3 (last checkpoint: 2)")

    monkeypatch.setattr(metrics.MetricsWriter, "write", crash_at_3)
    with pytest.raises(Crash):
        run(config, init_dir / "b")
    monkeypatch.undo()
    assert checkpoint.Checkpointer(str(init_dir / "b" / "checkpoints")).latest_step() == 2
    resumed = run(config, init_dir / "b")
    for key in ("params", "opt_state"):
        a = jax.tree.leaves(jax.device_get(straight[key]))
        b = jax.tree.leaves(jax.device_get(resumed[key]))
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_bad_grpo_config_is_one_sentence(init_dir):
    config = grpo_config(init_dir)
    config.grpo.kl_in = "both"
    with pytest.raises(ValueError, match="unknown grpo.kl_in"):
        run(config, init_dir / "c")
    config.grpo.kl_in, config.grpo.group_size = "loss", 1
    with pytest.raises(ValueError, match="at least 2"):
        run(config, init_dir / "c")
    config.grpo.group_size, config.grpo.temperature = 4, 0.0
    with pytest.raises(ValueError, match=r"^grpo.temperature must be > 0"):
        run(config, init_dir / "c")
    config.grpo.temperature, config.grpo.advantage, config.grpo.std_scope = 1.0, "rloo", "batch"
    with pytest.raises(ValueError, match=r"^grpo.std_scope='batch' scales GRPO's advantages"):
        run(config, init_dir / "c")
    config.grpo.advantage, config.grpo.std_scope, config.grpo.clip_high = "grpo", "group", -0.1
    with pytest.raises(ValueError, match=r"^grpo.clip must be in \(0, 1\) and grpo.clip_high > 0"):
        run(config, init_dir / "c")
    config.grpo.clip_high, config.train.grad_accum = None, 2  # refused, not ignored
    with pytest.raises(ValueError, match=r"^train.grad_accum=2: the grpo stage does not"):
        run(config, init_dir / "c")


N, G, P, T = 2, 4, 6, 5  # prompts, samples per prompt, prompt and response slots
LENGTHS = (5, 1, 3, 4, 2, 5, 1, 3)  # ragged response lengths, so the loss norms differ


@functools.cache
def grouped_rollout():
    """A tiny policy and reference, and N prompts x G samples at temperature 0.7 laid out by
    rl_data.RolloutData, responses cut to LENGTHS (as EOS would). -> (graphdef, policy, ref,
    prompts [N, P], rollout, the sampler's log-probs [B, T])."""
    cfg = model_config.preset("tiny", dtype="float32", family="llama")
    graphdef, policy = nnx.split(M.build(cfg, 0), nnx.Param)
    policy = nnx.to_pure_dict(policy)
    ref = nnx.to_pure_dict(nnx.split(M.build(cfg, 1), nnx.Param)[1])
    prompts = np.random.default_rng(0).integers(4, 500, (N, P)).astype(np.int32)
    mask = np.ones((N, P), bool)
    mask[1, :2] = False  # a left-padded prompt
    host = {"tokens": prompts, "mask": mask, "index": np.arange(N, dtype=np.int32)}
    batch = next(rl_data.RolloutData(test_rl_data.Prompts(host), group_size=G))
    sample = sampler.make_sampler(graphdef, max_new_tokens=T, eos_id=-1, pad_id=0)
    keys = rl_data.rollout_keys(0, 0, 0, jnp.asarray(batch["sample"]))
    out = jax.device_get(sample(policy, batch["tokens"], batch["mask"], keys, temperature=0.7))
    rmask = np.arange(T)[None] < np.asarray(LENGTHS)[:, None]  # [B, T]
    roll = {"tokens": out["tokens"], "prompt_mask": batch["mask"], "response_mask": rmask}
    return graphdef, policy, ref, prompts, roll, out["logprobs"]


def naive_advantages(scores, rows_of, kind, scale_std, std_scope="group"):
    """Per-row advantages, each group being the rows of one prompt wherever they sit."""
    adv = np.zeros_like(scores)
    for rows in rows_of:
        s = scores[rows]
        for j, i in enumerate(rows):
            if kind == "rloo":
                adv[i] = s[j] - np.delete(s, j).mean()
            else:
                adv[i] = s[j] - s.mean()
                if scale_std:
                    std = scores.std(ddof=1) if std_scope == "batch" else s.std(ddof=1)
                    adv[i] /= std + 1e-6
    return adv


@pytest.mark.parametrize(
    "over",
    [
        dict(advantage="grpo", scale_std=True, kl_in="loss", loss_norm="sequence"),
        dict(advantage="grpo", scale_std=False, kl_in="reward", loss_norm="token"),
        dict(advantage="rloo", kl_in="loss", loss_norm="constant"),
        dict(advantage="grpo", std_scope="batch", clip_high=0.28, kl_in="loss", loss_norm="token"),
    ],
)
def test_config_reaches_score_and_update_as_a_naive_loop_says(over):
    graphdef, policy, ref, prompts, roll, sampler_logp = grouped_rollout()
    config = grpo.get_config()
    config.grpo.update(prompts=N, group_size=G, minibatch=N * G, epochs=1, temperature=0.7)
    config.grpo.update(beta=0.3, **over)
    g = grpo_steps.grpo_config_from(config)
    mesh = mesh_lib.build_mesh(config.mesh, jax.devices()[:1])
    kw = dict(g=g, p=P, mesh=mesh, rules=sharding.normalize_rules(config.sharding.rules))
    rmask = roll["response_mask"]
    scores = (roll["tokens"][:, P:] % 7 * rmask).sum(1).astype(np.float32) / 10  # [B]
    frozen = {"ref": ref, "reward_bias": jnp.float32(0.0)}
    score = jax.jit(functools.partial(grpo_steps.score_step, graphdefs={"policy": graphdef}, **kw))
    scored, m = jax.device_get(score(policy, frozen, roll, jnp.asarray(scores)))

    # Teacher-forced logp_old is the sampler's own log-prob at temperature 0.7: on-policy.
    lp, lp_ref = scored["logp_old"], scored["logp_ref"]
    np.testing.assert_allclose(lp[rmask], sampler_logp[rmask], atol=2e-5)
    seq_kl = np.where(rmask, lp - lp_ref, 0.0).sum(1)
    np.testing.assert_allclose(float(m["grpo/kl_per_seq"]), seq_kl.mean(), rtol=1e-5, atol=1e-6)
    # Groups are the rows of one prompt (found by content): np.tile for np.repeat would mix them.
    rows_of = [[i for i in range(N * G) if (roll["tokens"][i, :P] == p).all()] for p in prompts]
    assert rows_of == [[0, 1, 2, 3], [4, 5, 6, 7]]
    used = scores - 0.3 * seq_kl if over["kl_in"] == "reward" else scores
    scope = over.get("std_scope", "group")
    want = naive_advantages(used, rows_of, over["advantage"], over.get("scale_std", True), scope)
    np.testing.assert_allclose(scored["advantages"], want, rtol=1e-4, atol=1e-5)
    assert np.abs(want).max() > 0.1

    # One minibatch, ratio 1: the loss is the naive loss at logp = logp_old, with the KL term
    # only when it is in the loss, normalised as grpo.loss_norm says.
    tx = optax.sgd(1e-3)
    state = {"step": jnp.zeros((), jnp.int32), "params": policy, "opt_state": tx.init(policy)}
    update = functools.partial(grpo_steps.update_step, graphdef=graphdef, tx=tx, **kw)
    _, um = jax.jit(update)(state, scored, None, jax.random.key(0))
    beta = 0.3 if over["kl_in"] == "loss" else 0.0
    mask = rmask.astype(np.float32)
    want_loss = test_grpo_math.naive_loss(
        lp, lp, lp_ref, scored["advantages"], mask, g.clip, beta, g.loss_norm
    )[0]
    assert float(um["grpo/policy_loss"]) == pytest.approx(want_loss, rel=1e-4, abs=1e-5)
    if "clip_high" not in over:
        return
    # Off-policy tokens (ratio 1.25 and 0.7) meet grpo.clip_high on the high side and grpo.clip
    # on the low side, as the naive loss with DAPO's asymmetric band says.
    shift = np.where(np.arange(T)[None] % 2 == 0, np.log(1.25), np.log(0.7)).astype(np.float32)
    mb = dict(scored, logp_old=(lp - shift).astype(np.float32))
    loss_fn = functools.partial(grpo_steps.grpo_loss, graphdef=graphdef, g=g, p=P)
    loss, lm = jax.jit(loss_fn)(policy, mb, None)
    args = (lp, mb["logp_old"], lp_ref, scored["advantages"], mask, g.clip, beta, g.loss_norm)
    want_loss, want_frac, _, _ = test_grpo_math.naive_loss(*args, clip_high=0.28)
    assert float(loss) == pytest.approx(want_loss, rel=1e-4, abs=1e-5)
    assert float(lm["grpo/clipfrac"]) == pytest.approx(want_frac, abs=1e-6)
    assert want_loss != pytest.approx(test_grpo_math.naive_loss(*args)[0], rel=1e-3)
