"""The shared loop's hooks for a stage of more than one model (PPO's layout), without a model:
custom checkpoint items, host state in the checkpoint meta, the after-step hook, resume, the NaN
stop before any checkpoint of that step, and perplexity only where a stage asks for it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import pretrain
from rlhf_jax.infra import checkpoint, metrics, sharding
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.stages import loop, ppo


class Counter:
    """A data iterator whose position is its state."""

    def __init__(self):
        self.n = 0

    def __next__(self):
        self.n += 1
        return {"x": np.full((1, 1), self.n, np.float32)}

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = state["n"]


class Host:
    """Host-side state carried in the checkpoint meta (PPO: the KL coefficient)."""

    def __init__(self):
        self.coef = 1.0

    def get_state(self):
        return {"kl_coef": self.coef}

    def set_state(self, meta):
        self.coef = meta["kl_coef"]


def setup_for(workdir, steps, nan_at=None, perplexity=False):
    config = pretrain.get_config()
    config.train.update(log_every=4, ckpt_every=2, eval_every=0, keep_ckpts=10)
    mesh = mesh_lib.build_mesh(config.mesh, jax.devices()[:1])
    rep = sharding.replicated(mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    # Each model is a tree of one scalar "w" (orbax saves trees, not bare arrays).
    abstract = {"params": {"policy": {"w": scalar}, "value": {"w": scalar}}}
    abstract["opt_state"] = {"w": scalar}
    put = lambda v: {"w": jax.device_put(jnp.float32(v), rep)}
    host, seen = Host(), []

    def step_fn(state, batch):
        p = state["params"]
        x = batch["x"].sum()
        new = {"policy": {"w": p["policy"]["w"] + x}, "value": {"w": p["value"]["w"] + 2 * x}}
        n = int(state["step"]) + 1
        loss = jnp.float32(np.nan) if n == nan_at else new["policy"]["w"]
        state = {
            "step": state["step"] + 1,
            "params": new,
            "opt_state": {"w": state["opt_state"]["w"] + 1},
        }
        return state, {"ppo/loss": loss}

    def after_step(n, m, is_log, writer):
        host.coef += 1.0  # the next step's value, as PPO's KL controller
        seen.append((n, is_log))

    s = loop.Setup(
        config=config,
        mesh=mesh,
        workdir=str(workdir),
        model_cfg=None,
        tx=None,
        steps=steps,
        train_iter=Counter(),
        step_fn=step_fn,
        loss_key="ppo/loss",
        tokens_per_step=1,
        perplexity=perplexity,
        layout=loop.Layout(
            abstract=abstract,
            shardings={"step": rep},
            init=lambda: {
                "params": {"policy": put(0), "value": put(0)},
                "opt_state": put(0),
            },
            to_items=ppo._items,
            from_items=ppo._from_items,
        ),
        host_state=host,
        after_step=after_step,
    )
    _, state, _, start, ckpt = loop.restore_or_init(s, config.sharding.rules)
    return s, state, start, ckpt, host, seen


def test_custom_layout_resumes_items_host_state_and_data(tmp_path):
    s, state, start, ckpt, host, seen = setup_for(tmp_path / "a", steps=4)
    assert start == 0
    final = jax.device_get(loop.train(s, state, start, ckpt))
    assert final["params"] == {"policy": {"w": 10.0}, "value": {"w": 20.0}}  # 1 + 2 + 3 + 4
    assert seen == [(1, False), (2, False), (3, False), (4, True)]
    assert not any(
        "ppo/perplexity" in r for r in metrics.read_metrics(str(tmp_path / "a" / "metrics.jsonl"))
    )
    # PPO's items: the policy as "params" (what LM-stage readers load), "value", "opt_state".
    ck = checkpoint.Checkpointer(str(tmp_path / "a" / "checkpoints"))
    assert ck.latest_step() == 4 and ck.read_meta(2)["kl_coef"] == 3.0
    ck.close()
    assert {"params", "value", "opt_state"} <= set(os.listdir(tmp_path / "a" / "checkpoints" / "4"))

    # A run stopped after step 2 resumes its items, host state and data position.
    s, state, start, ckpt, host, _ = setup_for(tmp_path / "b", steps=2)
    loop.train(s, state, start, ckpt)
    s, state, start, ckpt, host, _ = setup_for(tmp_path / "b", steps=4)
    assert start == 2 and host.coef == 3.0 and s.train_iter.n == 2
    assert jax.device_get(state["params"]) == {"policy": {"w": 3.0}, "value": {"w": 6.0}}
    assert jax.device_get(loop.train(s, state, start, ckpt)) == final


def test_nan_stops_before_the_checkpoint_of_its_step(tmp_path):
    s, state, start, ckpt, _, _ = setup_for(tmp_path, steps=4, nan_at=3)
    with pytest.raises(
        FloatingPointError, match=r"at step 3; stopping: the last checkpoint is step 2"
    ):
        loop.train(s, state, start, ckpt)
    assert checkpoint.Checkpointer(str(tmp_path / "checkpoints")).latest_step() == 2


def test_perplexity_only_where_the_stage_asks(tmp_path):
    s, state, start, ckpt, _, _ = setup_for(tmp_path, steps=4, perplexity=True)
    loop.train(s, state, start, ckpt)
    rows = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
    # The mean loss over the 4 steps of the log row: (1 + 3 + 6 + 10) / 4.
    assert [r["ppo/perplexity"] for r in rows] == [pytest.approx(np.exp(5.0))]
