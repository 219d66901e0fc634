"""KTO: the loss and reference point against a naive numpy loop, the data conversion and its
mismatched pairs, and the stage: 0.5 at the reference, learning a preference, gradient
accumulation equal to the one-pass step, and the KTO row format through the real entry."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import kto as kto_exp
from rlhf_jax.data import kto_data
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.rl import kto
from rlhf_jax.stages import kto as kto_stage


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def naive_kto(logp, logp_ref, kl_lp, kl_ref, label, weight, beta, lam_d, lam_u):
    real = [i for i in range(len(label)) if weight[i] > 0]
    z0 = max(0.0, sum(float(kl_lp[i]) - float(kl_ref[i]) for i in real) / len(real))
    losses, right = [], 0
    for i in real:
        r = float(logp[i]) - float(logp_ref[i])
        if label[i]:
            losses.append(lam_d - lam_d * sigmoid(beta * (r - z0)))
            right += r > z0
        else:
            losses.append(lam_u - lam_u * sigmoid(beta * (z0 - r)))
            right += r < z0
    return sum(losses) / len(losses), z0, right / len(real)


@pytest.mark.parametrize("beta,lam_d,lam_u,shift", [(0.1, 1.0, 1.0, 3.0), (0.5, 1.33, 1.0, -3.0)])
def test_kto_loss_matches_numpy(beta, lam_d, lam_u, shift):
    """`shift` moves the mismatched log-ratios up (z0 > 0) or down (z0 clamped at 0)."""
    rng = np.random.default_rng(0)
    n = 10
    logp = rng.normal(-20, 3, n).astype(np.float32)
    logp_ref = (logp + rng.normal(0, 2, n)).astype(np.float32)
    kl_lp = rng.normal(-30, 3, n).astype(np.float32)
    kl_ref = (kl_lp - shift + rng.normal(0, 1, n)).astype(np.float32)
    label = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 0], np.float32)
    weight = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], np.float32)  # two padding rows
    logp[-1] = np.nan  # a padding row's garbage reaches nothing
    z0 = jax.jit(kto.reference_point)(kl_lp - kl_ref, weight)
    loss, m = jax.jit(functools.partial(kto.kto_loss, beta=beta, desirable_weight=lam_d,
                                        undesirable_weight=lam_u))(
        logp, logp_ref, label, weight, z0)  # fmt: skip
    want, want_z0, want_acc = naive_kto(logp, logp_ref, kl_lp, kl_ref, label, weight, beta,
                                        lam_d, lam_u)  # fmt: skip
    np.testing.assert_allclose(float(z0), want_z0, rtol=1e-5, atol=1e-6)
    assert (float(z0) > 0) == (shift > 0)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["accuracy"]), want_acc, rtol=1e-6)
    assert m["rows"] == 8 and m["desirable"] == 4 and m["undesirable"] == 4
    # z0 is a constant of the gradient: d loss / d kl-inputs is zero.
    g = jax.grad(lambda x: kto.kto_loss(logp, logp_ref, label, weight,
                                        kto.reference_point(x, weight), beta=beta)[0])(
        kl_lp - kl_ref)  # fmt: skip
    assert not np.any(np.asarray(g))


def test_comparisons_unpair_and_mismatch(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [
        {"prompt": "a", "responses": ["x", "y", "z"], "ranking": [1, 0, 2]},  # y > x > z
        {"prompt": "b", "chosen": "good", "rejected": "bad"},
        {"prompt": "c", "responses": ["p", "q"], "ranking": [[0, 1]]},  # a tie: skipped
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kto_path = tmp_path / "k.jsonl"
    kto_path.write_text(json.dumps({"prompt": "d", "completion": "w", "label": False}) + "\n")
    import collections

    skipped = collections.Counter()
    got = kto_data.read_kto_rows([str(path), str(kto_path)], 9, skipped)
    assert [(r["prompt"], r["completion"], r["label"]) for r in got] == [
        ("a", "y", True), ("a", "z", False), ("b", "good", True), ("b", "bad", False),
        ("d", "w", False),
    ]  # fmt: skip
    assert skipped["middle"] == 1 and skipped["all_tie"] == 1
    # Each row's mismatched completion comes from the next row with another prompt.
    assert kto_data.mismatched(got) == [2, 2, 4, 4, 0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "d", "completion": "w", "label": "yes"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'label'"):
        kto_data.read_kto_rows(str(bad), 9, skipped)


def tiny_state(seed):
    cfg = model_config.preset("tiny", family="gpt2", dtype="float32")
    mesh = mesh_lib.build_mesh(kto_exp.get_config().mesh, jax.devices())
    tx = optax.sgd(1.0)
    graphdef, state, _ = state_lib.create_train_state(cfg, tx, mesh, sharding.DEFAULT_RULES, seed)
    return cfg, mesh, tx, graphdef, state


def test_grad_accum_equals_the_full_batch_gradient():
    """Two microbatches give the one-pass gradient and metrics, z0 taken over the whole batch;
    the microbatches hold unequal numbers of real rows (padding rows in one only)."""
    cfg, mesh, tx, graphdef, state = tiny_state(0)
    # A sharper reference (weights x2) puts less mass on random tokens than the policy does,
    # so the mismatched log-ratios average above 0 and z0 is not clamped.
    ref = jax.tree.map(lambda x: 2.0 * x, tiny_state(1)[4]["params"])
    rules = sharding.DEFAULT_RULES
    rng = np.random.default_rng(0)
    b, n = 16, 12
    lengths = rng.integers(6, n + 1, (b, 2))
    mask = np.arange(n)[None, None, :] < lengths[:, :, None]
    host = {
        "tokens": np.where(mask, rng.integers(3, cfg.vocab_size, (b, 2, n)), 0).astype(np.int32),
        "mask": mask,
        "prompt_len": rng.integers(2, 5, b).astype(np.int32),
        "label": (np.arange(b) % 3 == 0).astype(np.float32),
        "weight": np.ones(b, np.float32),
    }
    host["weight"][[0, 2, 4]] = 0.0  # even rows: microbatch 0 of their devices
    batch = sharding.put_batch(host, mesh, rules)
    params0 = jax.tree.map(np.asarray, state["params"])
    c = kto_exp.get_config().kto

    def step(accum):
        fn = functools.partial(kto_stage.train_step, graphdef=graphdef, tx=tx, c=c, mesh=mesh,
                               rules=rules, grad_accum=accum)  # fmt: skip
        new, m = jax.jit(fn)(jax.tree.map(jnp.copy, state), ref, batch)
        grads = jax.tree.map(lambda a, x: a - np.asarray(x), params0, new["params"])
        return grads, jax.tree.map(float, m)

    g1, m1 = step(1)
    g2, m2 = step(2)
    assert m1["kto/rows"] == 13 and m1["kto/z0"] > 0.1
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for a, x in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(x, a, rtol=1e-4, atol=1e-6)
