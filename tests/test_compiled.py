"""infra/compiled.py: one jitted step per (function, static arguments, shardings) in a process."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import pretrain
from rlhf_jax.infra import compiled
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import state as state_lib
from rlhf_jax.stages import lm


def scaled(x, *, c, power):
    return x * c.scale**power


def test_equal_arguments_give_the_same_jitted_function():
    c = ml_collections.ConfigDict({"scale": 2.0})
    f = compiled.jit(scaled, c=c, power=2)
    # A new ConfigDict with the same values, and new sharding objects equal to the first.
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    same = compiled.jit(scaled, c=ml_collections.ConfigDict({"scale": 2.0}), power=2)
    assert same is f
    g = compiled.jit(scaled, c=c, power=3)
    h = compiled.jit(scaled, c=ml_collections.ConfigDict({"scale": 3.0}), power=2)
    assert len({id(f), id(g), id(h)}) == 3
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    a = compiled.jit(scaled, in_shardings=(sh,), c=c, power=2)
    b = compiled.jit(scaled, in_shardings=(sh,), c=c, power=2)
    assert a is b and a is not f
    # The step reads the config's values (as a read-only FrozenConfigDict).
    assert float(f(jnp.float32(1.5))) == 6.0 and float(h(jnp.float32(1.0))) == 9.0


def test_an_unhashable_argument_is_jitted_without_memo():
    def times(x, *, t):
        return x * t["scale"]

    # A dict of arrays flattens to leaves that cannot be hashed: a fresh jit each time.
    f = compiled.jit(times, t={"scale": np.ones(2)})
    g = compiled.jit(times, t={"scale": np.ones(2)})
    assert f is not g and np.allclose(f(jnp.ones(2)), 1.0)


def test_make_optimizer_is_one_object_per_config():
    a = state_lib.make_optimizer(state_lib.OptimConfig(lr=1e-3, total_steps=10))
    b = state_lib.make_optimizer(state_lib.OptimConfig(lr=1e-3, total_steps=10))
    c = state_lib.make_optimizer(state_lib.OptimConfig(lr=2e-3, total_steps=10))
    assert a is b and c is not a


def test_a_second_run_of_a_stage_does_not_trace_its_steps_again(tmp_path, monkeypatch):
    traced, original = [], lm.train_step

    @functools.wraps(original)
    def counting(*args, **kw):
        traced.append(1)  # runs once per trace, never when an executable runs
        return original(*args, **kw)

    monkeypatch.setattr(lm, "train_step", counting)
    config = pretrain.get_config()
    config.train.update(steps=2, batch_size=4, seq_len=32, warmup_steps=1, log_every=1)
    config.train.update(ckpt_every=2, eval_every=0)
    config.data.cache = False
    mesh = mesh_lib.build_mesh(config.mesh, jax.devices()[:1])
    first = jax.device_get(lm.run(config, mesh, str(tmp_path / "a")))
    assert len(traced) == 1
    second = jax.device_get(lm.run(config, mesh, str(tmp_path / "b")))
    assert len(traced) == 1  # the same jitted step: no new trace, the same executable
    for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(x, y)
