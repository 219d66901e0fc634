"""Sharding: rules -> specs, params born sharded, and a 2x2x2 mesh equal to one device."""

import functools

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec

from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as S
from rlhf_jax.models import config as model_config
from rlhf_jax.stages import lm

RULES = sharding.DEFAULT_RULES


def mesh_of(shape, devices=None):
    devices = devices or jax.devices()[: int(np.prod(shape))]
    return Mesh(np.array(devices).reshape(shape), ("data", "fsdp", "tensor"))


def test_logical_to_spec_maps_drops_and_replicates():
    mesh = mesh_of((2, 2, 2))
    assert sharding.logical_to_spec(("embed", "mlp"), RULES, mesh) == PartitionSpec(
        "fsdp", "tensor"
    )
    assert sharding.logical_to_spec(("act_batch", "act_len"), RULES, mesh) == PartitionSpec(
        ("data", "fsdp"), None
    )
    # A mesh axis of size 1 is dropped; an indivisible dim is replicated, not padded.
    flat = mesh_of((8, 1, 1))
    assert sharding.logical_to_spec(("embed", "mlp"), RULES, flat) == PartitionSpec(None, None)
    assert sharding.logical_to_spec(("heads", None), RULES, mesh, shape=(3, 4)) == PartitionSpec(
        None, None
    )
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        sharding.normalize_rules([("embed", "model")])


def test_params_are_born_sharded_by_rules():
    mesh = mesh_of((2, 2, 2))
    cfg = model_config.preset("tiny", family="llama", n_kv_heads=2)
    _, abstract, shardings = S.param_shardings(cfg, mesh, RULES)
    params = S.init_params(cfg, 0, shardings)
    q = params["blocks"][0]["attn"]["q"]  # [D, N, H] = (embed, heads, head_dim)
    assert q.sharding.spec == PartitionSpec("fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (32, 2, 16)
    emb = params["embed"]  # [V, D] = (vocab, embed)
    assert emb.sharding.spec == PartitionSpec("tensor", "fsdp")


def test_175b_shardings_divide_memory_across_devices():
    """Shape/sharding check for the largest InstructGPT size without allocating it."""
    mesh = mesh_of((1, 4, 2))
    cfg = model_config.preset("175b", scan_layers=True)
    _, abstract, shardings = S.param_shardings(cfg, mesh, RULES)
    total = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
    per_device = sum(
        int(np.prod(s.shard_shape(a.shape)))
        for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
    )
    assert per_device / total < 0.13  # ~1/8: only norms and biases are replicated


def one_step(mesh_shape, batch_np, accum=1):
    mesh = mesh_of(mesh_shape)
    cfg = model_config.preset("tiny", family="llama", n_kv_heads=2, dtype="float32")
    # Plain SGD with lr 1 so new params - old params is exactly -grad (Adam's first step,
    # ~lr * sign(g), would amplify rounding in tiny gradients).
    tx = optax.sgd(1.0)
    graphdef, state, shardings = S.create_train_state(cfg, tx, mesh, RULES, seed=0)
    train, _ = lm.compile_steps(graphdef, tx, shardings, mesh, RULES, accum)
    state, m = train(state, sharding.put_batch(batch_np, mesh, RULES))
    return jax.device_get(state["params"]), jax.device_get(m)


@functools.cache
def batch(b=8, t=16):
    rng = np.random.default_rng(0)
    toks = rng.integers(4, 512, size=(b, t + 1)).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    mask[:, :3] = 0  # some ignored targets, as SFT prompts will have
    return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": mask}


@pytest.mark.slow
def test_2x2x2_mesh_matches_single_device():
    """Loss, grad norm and gradients agree to fp32 rounding (atol 1e-6, rtol 1e-5)."""
    p1, m1 = one_step((1, 1, 1), batch())
    p8, m8 = one_step((2, 2, 2), batch())
    np.testing.assert_allclose(m8["train/loss"], m1["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["train/grad_norm"], m1["train/grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_grad_accumulation_equals_full_batch():
    p1, m1 = one_step((2, 1, 1), batch())
    p4, m4 = one_step((2, 1, 1), batch(), accum=4)
    np.testing.assert_allclose(m4["train/loss"], m1["train/loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_eval_in_microbatches_equals_one_pass():
    """The eval step runs a batch in the train step's grad_accum pieces (its logits are then a
    microbatch's); summed NLL and token count equal the one-pass eval's."""
    mesh = mesh_of((2, 1, 1))
    cfg = model_config.preset("tiny", family="llama", n_kv_heads=2, dtype="float32")
    tx = optax.sgd(1.0)
    graphdef, state, shardings = S.create_train_state(cfg, tx, mesh, RULES, seed=0)
    b = sharding.put_batch(batch(), mesh, RULES)
    outs = [lm.compile_steps(graphdef, tx, shardings, mesh, RULES, a)[1] for a in (1, 4)]
    (nll1, n1), (nll4, n4) = (jax.device_get(ev(state["params"], b)) for ev in outs)
    assert n1 == n4 == 8 * 13  # 3 masked targets per row
    np.testing.assert_allclose(nll4, nll1, rtol=1e-6)
    assert "while" in outs[1].lower(state["params"], b).as_text()  # really a loop over pieces


def test_put_batch_places_rows_across_batch_axes():
    mesh = mesh_of((2, 2, 2))
    out = sharding.put_batch(batch(), mesh, RULES)
    x = out["inputs"]
    assert x.shape == (8, 16) and x.sharding.spec == PartitionSpec(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(x), batch()["inputs"])
    assert sharding.data_parallel_size(mesh, RULES) == 4
