"""Tests for rlhf_jax.infra.checkpoint: round trips, resharding, retention, atomicity, clear
errors."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.infra import checkpoint

N_BLOCKS = 3


def _mesh8():
    return Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))


def _mesh4():
    return Mesh(np.array(jax.devices()[:4]).reshape(1, 2, 2), ("data", "fsdp", "tensor"))


def _specs():
    """Param layout on the 8-device mesh; int keys as nnx's to_pure_dict gives them."""
    return {
        "embed": P("fsdp", "tensor"),  # [V, D]
        "blocks": {i: {"attn": {"q": P("fsdp", "tensor", None)}} for i in range(N_BLOCKS)},
    }


def _train_state():
    """Random params and an adamw state after one update (mu, nu, count all non-trivial)."""
    mesh = _mesh8()
    rng = np.random.default_rng(0)
    host = {
        "embed": rng.standard_normal((16, 8), np.float32),
        "blocks": {
            i: {"attn": {"q": rng.standard_normal((8, 4, 2), np.float32)}} for i in range(N_BLOCKS)
        },
    }
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), host, _specs())
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: 0.1 * p, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {"params": params, "opt_state": opt_state}


def _abstract_like(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


DATA = {"epoch": 2, "shards": [{"file": "a.jsonl", "pos": 17}, {"file": "b.jsonl", "pos": 0}]}
META = {"config": {"lr": 1e-3, "model": {"d": 8}}, "seed": 7, "kl_coef": 0.02}


@pytest.fixture(scope="module")
def state():
    return _train_state()


def test_round_trip_is_bitwise_and_keeps_structure(tmp_path, state):
    with checkpoint.Checkpointer(str(tmp_path / "checkpoints")) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(5, state, data=DATA, meta=META)
    with checkpoint.Checkpointer(str(tmp_path / "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [5]
        restored, data, meta = ckpt.restore(None, _abstract_like(state))
    _assert_bitwise_equal(restored, state)
    # int keys and optax namedtuples come back as such, not as '0' strings or lists
    assert set(restored["params"]["blocks"]) == set(range(N_BLOCKS))
    assert type(restored["opt_state"][0]) is type(state["opt_state"][0])
    assert data == DATA
    assert meta == META
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert got.sharding == want.sharding


def test_restore_onto_smaller_mesh_with_other_layout(tmp_path, state):
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, state)
    mesh4 = _mesh4()

    def sharding(x):
        # transpose the layout: dim 0 over tensor, dim 1 over (data, fsdp) where it divides
        if x.ndim == 0:
            return NamedSharding(mesh4, P())
        return NamedSharding(mesh4, P("tensor", ("data", "fsdp"), *([None] * (x.ndim - 2))))

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(x)), state
    )
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        restored, data, meta = ckpt.restore(1, abstract)
    assert data is None and meta is None
    _assert_bitwise_equal(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract), strict=True):
        assert got.sharding == want.sharding
        assert set(got.sharding.device_set) <= set(jax.devices()[:4])


def test_max_to_keep_keeps_the_last_k(tmp_path, state):
    params = {"params": state["params"]}
    with checkpoint.Checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
        for step in (10, 20, 30, 40):
            ckpt.save(step, params)
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.all_steps() == [30, 40]
        assert ckpt.latest_step() == 40
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["30", "40"]


def test_half_written_checkpoints_are_never_picked(tmp_path, state):
    params = {"params": state["params"]}
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(100, params, meta={"which": 100})
    # A save killed mid-write leaves orbax's tmp dir; a half-copied step lacks the commit file.
    tmp_dir = tmp_path / "300.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "100", tmp_dir)
    shutil.copytree(tmp_path / "100", tmp_path / "200")
    (tmp_path / "200" / "commit_success.txt").unlink()
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.all_steps() == [100]
        assert ckpt.latest_step() == 100
        restored, _, meta = ckpt.restore(None, _abstract_like(params))
        assert meta == {"which": 100}
        with pytest.raises(FileNotFoundError, match="no committed step 200"):
            ckpt.restore(200, _abstract_like(params))
        with pytest.raises(FileExistsError, match="never committed"):
            ckpt.save(200, params)
    _assert_bitwise_equal(restored, params)


def test_shape_mismatch_names_key_path_and_both_shapes(tmp_path, state):
    params = {"params": state["params"]}
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(100, params)
    abstract = _abstract_like(params)
    replicated = NamedSharding(_mesh8(), P())
    abstract["params"]["blocks"][1]["attn"]["q"] = jax.ShapeDtypeStruct(
        (8, 2, 2), jnp.float32, sharding=replicated
    )
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt, pytest.raises(ValueError) as e:
        ckpt.restore(None, abstract)
    assert str(e.value) == (
        f"checkpoint {tmp_path} step 100: 'params/blocks/1/attn/q' has shape (8, 4, 2) "
        "but the model expects (8, 2, 2)"
    )


def test_dtype_mismatch_is_named(tmp_path, state):
    params = {"params": state["params"]}
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, params)
    abstract = _abstract_like(params)
    emb = abstract["params"]["embed"]
    abstract["params"]["embed"] = jax.ShapeDtypeStruct(
        emb.shape, jnp.bfloat16, sharding=emb.sharding
    )
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt, pytest.raises(ValueError) as e:
        ckpt.restore(1, abstract)
    assert "'params/embed' has dtype float32 but the model expects bfloat16" in str(e.value)


def test_missing_and_unexpected_keys_are_named(tmp_path, state):
    params = {"params": state["params"]}
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, params)
    replicated = NamedSharding(_mesh8(), P())

    bigger = _abstract_like(params)
    bigger["params"]["head"] = jax.ShapeDtypeStruct((8, 1), jnp.float32, sharding=replicated)
    smaller = _abstract_like(params)
    del smaller["params"]["blocks"][2]
    renamed = _abstract_like(params)
    renamed["params"]["wte"] = renamed["params"].pop("embed")

    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        with pytest.raises(ValueError) as e:
            ckpt.restore(1, bigger)
        assert str(e.value) == (
            f"checkpoint {tmp_path} step 1 lacks 'params/head' that the model expects"
        )
        with pytest.raises(ValueError) as e:
            ckpt.restore(1, smaller)
        assert "holds 'params/blocks/2/attn/q' that the model does not expect" in str(e.value)
        with pytest.raises(ValueError) as e:
            ckpt.restore(1, renamed)
        assert "lacks 'params/wte'" in str(e.value)
        assert "holds 'params/embed'" in str(e.value)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match="has no item 'value'; it holds 'params'"):
            ckpt.restore(1, {"value": _abstract_like(params)["params"]})


def test_restore_params_from_workdir_reads_params_only(tmp_path, state):
    workdir = tmp_path / "pretrain"
    with checkpoint.Checkpointer(str(workdir / "checkpoints")) as ckpt:
        ckpt.save(10, state, data=DATA, meta={"step": 10})
        ckpt.save(20, state, data=DATA, meta={"step": 20})
    abstract = _abstract_like(state["params"])
    params = checkpoint.restore_params(str(workdir), abstract)
    _assert_bitwise_equal(params, state["params"])
    # the checkpoints dir itself is accepted too, and a given step is honoured
    params = checkpoint.restore_params(str(workdir / "checkpoints"), abstract, step=10)
    _assert_bitwise_equal(params, state["params"])
    assert checkpoint.read_meta(str(workdir)) == {"step": 20}
    assert checkpoint.read_meta(str(workdir), step=10) == {"step": 10}
    # a read-only hand-off must not create anything in the previous stage's workdir
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.is_dir()) == [
        "10",
        "20",
    ]


def test_restore_params_without_checkpoint_names_the_path(tmp_path, state):
    abstract = _abstract_like(state["params"])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        checkpoint.restore_params(str(tmp_path / "nowhere"), abstract)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no checkpoint found in {tmp_path / 'empty'}"):
        checkpoint.restore_params(str(tmp_path / "empty"), abstract)


def test_async_save_then_immediate_close_is_complete(tmp_path, state):
    copy = jax.tree.map(jnp.copy, state)
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=True)
    assert ckpt.save(7, copy, data=DATA, meta=META)
    # save() returned: the arrays were copied to host, so a donating step may free them now
    for x in jax.tree.leaves(copy):
        x.delete()
    ckpt.close()
    assert (tmp_path / "7" / "commit_success.txt").exists()
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        restored, data, meta = ckpt.restore(7, _abstract_like(state))
    _assert_bitwise_equal(restored, state)
    assert (data, meta) == (DATA, META)


def test_existing_step_is_kept_unless_forced(tmp_path, state):
    params = {"params": state["params"]}
    doubled = {"params": jax.tree.map(lambda x: 2 * x, state["params"])}
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        assert ckpt.save(3, params)
        ckpt.wait()
        assert not ckpt.save(3, doubled)
        ckpt.wait()
        restored, _, _ = ckpt.restore(3, _abstract_like(params))
        _assert_bitwise_equal(restored, params)
        assert ckpt.save(3, doubled, force=True)
        restored, _, _ = ckpt.restore(3, _abstract_like(params))
        _assert_bitwise_equal(restored, doubled)


def test_bad_json_and_names_fail_before_saving(tmp_path, state):
    params = {"params": state["params"]}
    with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
        with pytest.raises(TypeError, match="data changes in a JSON round trip"):
            ckpt.save(1, params, data={"positions": {0: 5}})
        with pytest.raises(TypeError, match="meta is not JSON-serializable"):
            ckpt.save(1, params, meta={"fn": print})
        with pytest.raises(ValueError, match="state item name 'meta' is invalid"):
            ckpt.save(1, {"meta": state["params"]})
        assert ckpt.all_steps() == []


def test_rebuild_matches_int_keys_by_path_not_by_order():
    # If orbax handed back string keys, their sorted order ('10' < '2') differs from the ints'.
    sds = jax.ShapeDtypeStruct((), jnp.float32)
    abstract = {"blocks": {0: sds, 2: sds, 10: sds}}
    restored = {"blocks": {"0": 0.0, "2": 2.0, "10": 10.0}}
    assert checkpoint._rebuild_like(abstract, restored) == {"blocks": {0: 0.0, 2: 2.0, 10: 10.0}}
