"""LM stage through `lm.run`: training lowers loss, kill-and-resume is bitwise, NaN stops the run,
a checkpoint written on 8 devices resumes on 4."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from experiments import pretrain
from rlhf_jax.data import lm_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.infra import checkpoint, metrics
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.stages import lm


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    docs = lm_data.read_documents(pretrain.get_config().data.train)
    return tok_lib.train_tokenizer(docs, path, 512)


def tiny_config(tok_path, **train):
    c = pretrain.get_config()
    c.tokenizer.path = tok_path
    c.train.update(
        steps=8,
        batch_size=8,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        log_every=2,
        ckpt_every=4,
        eval_every=4,
        eval_batches=1,
    )
    c.train.update(train)
    return c


def run(config, workdir, devices=None):
    devices = devices or jax.devices()
    mesh = mesh_lib.build_mesh(config.mesh, devices)
    return lm.run(config, mesh, str(workdir))


def bitwise_equal(a, b):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(la) == len(lb)
    return all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


class Crash(Exception):
    pass


@pytest.mark.slow
def test_kill_and_resume_is_bitwise(tmp_path, tok_path, monkeypatch):
    config = tiny_config(tok_path)
    straight = run(config, tmp_path / "a")

    real_write = metrics.MetricsWriter.write

    def crash_at_6(self, step, m):
        real_write(self, step, m)
        if step == 6:
            raise Crash("simulated preemption after step 6 (last checkpoint: 4)")

    monkeypatch.setattr(metrics.MetricsWriter, "write", crash_at_6)
    with pytest.raises(Crash):
        run(config, tmp_path / "b")
    monkeypatch.undo()
    assert checkpoint.Checkpointer(str(tmp_path / "b" / "checkpoints")).latest_step() == 4
    resumed = run(config, tmp_path / "b")

    assert bitwise_equal(straight["params"], resumed["params"])
    assert bitwise_equal(straight["opt_state"], resumed["opt_state"])
    # Same data position: the iterator states saved with the final checkpoints agree.
    for sub in ("a", "b"):
        assert os.path.exists(tmp_path / sub / "checkpoints" / "8" / "data")
    da = _data_state(tmp_path / "a")
    db = _data_state(tmp_path / "b")
    assert da == db and da
    # The resumed run's log has each step once, in order.
    steps = [
        r["step"]
        for r in metrics.read_metrics(str(tmp_path / "b" / "metrics.jsonl"))
        if "train/loss" in r
    ]
    assert steps == [2, 4, 6, 8]


def _data_state(workdir):
    # The data item is plain JSON inside the committed step directory.
    root = workdir / "checkpoints" / "8" / "data"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return [json.loads(p.read_text()) for p in files if p.suffix in ("", ".json")]


def test_nan_loss_stops_run_and_writes_no_later_checkpoint(tmp_path, tok_path):
    # An absurd learning rate blows the weights up within a few steps.
    config = tiny_config(
        tok_path,
        lr=1e9,
        warmup_steps=0,
        grad_clip=0.0,
        steps=40,
        ckpt_every=2,
        log_every=1,
        eval_every=0,
    )
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step (\d+)") as err:
        run(config, tmp_path)
    bad = int(err.value.args[0].split("at step ")[1].split(";")[0])
    steps = checkpoint.Checkpointer(str(tmp_path / "checkpoints")).all_steps()
    assert all(s < bad for s in steps)


@pytest.mark.slow
def test_resume_on_a_different_mesh(tmp_path, tok_path):
    """Written by 8 devices (data=8), resumed by 4 devices laid out (data=2, fsdp=2)."""
    config = tiny_config(tok_path, steps=4)
    run(config, tmp_path)
    config.train.steps = 8
    config.mesh.ici.update(data=2, fsdp=2, tensor=1)
    state = run(config, tmp_path, devices=jax.devices()[:4])
    assert int(state["step"]) == 8
    emb = state["params"]["embed"]
    assert len(emb.sharding.device_set) == 4 and emb.sharding.mesh.shape["fsdp"] == 2
    losses = [
        r["train/loss"]
        for r in metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
        if "train/loss" in r
    ]
    assert len(losses) == 4 and np.isfinite(losses).all()


def test_pretraining_lowers_loss(tmp_path, tok_path):
    config = tiny_config(tok_path, steps=60, log_every=10, eval_every=60, ckpt_every=60)
    run(config, tmp_path)
    rows = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    assert train[-1] < 0.6 * train[0]
    assert any("eval/loss" in r for r in rows)


def test_mesh_shape_errors_are_clear():
    cfg = pretrain.get_config().mesh
    cfg.ici.update(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="needs 3 devices, but there are 8"):
        mesh_lib.build_mesh(cfg)
    assert isinstance(mesh_lib.build_mesh(pretrain.get_config().mesh), Mesh)


def test_grad_accum_weighs_microbatches_by_their_tokens():
    """Microbatches with unequal token counts: the accumulated step is the one-pass gradient of
    the token-mean NLL (each microbatch weighed by its tokens, not averaged)."""
    import jax.numpy as jnp
    import optax

    from rlhf_jax.infra import sharding
    from rlhf_jax.infra import state as state_lib
    from rlhf_jax.models import config as model_config

    mesh = Mesh(np.array(jax.devices()[:2]).reshape(2, 1, 1), ("data", "fsdp", "tensor"))
    rules = sharding.DEFAULT_RULES
    cfg = model_config.preset("tiny", family="llama", n_kv_heads=2, dtype="float32")
    tx = optax.sgd(1.0)  # new params = params - grad: the step exposes the gradient exactly
    graphdef, state, shardings = state_lib.create_train_state(cfg, tx, mesh, rules, seed=0)
    toks = np.random.default_rng(0).integers(4, cfg.vocab_size, (8, 13)).astype(np.int32)
    mask = np.ones((8, 12), np.float32)
    # 4 rows per device: accumulate.microbatches gives microbatch 0 rows 0, 2, 4, 6 and
    # microbatch 1 the odd rows: 4 * 3 = 12 targets against 3 * 12 = 36.
    mask[0::2, :9] = 0
    mask[1] = 0  # a row with no target at all
    host = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "mask": mask}
    assert (mask[0::2].sum(), mask[1::2].sum()) == (12, 36)
    params0 = jax.device_get(state["params"])
    train, _ = lm.compile_steps(graphdef, tx, shardings, mesh, rules, 2)
    new, m = train(state, sharding.put_batch(host, mesh, rules))

    def one_pass(p):  # the whole batch's token-mean NLL
        nll, n = lm.lm_sums(p, jax.tree.map(jnp.asarray, host), graphdef)
        return nll / n

    loss, grads = jax.jit(jax.value_and_grad(one_pass))(params0)
    got = jax.tree.map(lambda a, b: a - b, params0, jax.device_get(new["params"]))
    for g, want in zip(jax.tree.leaves(got), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(g, want, atol=1e-6, rtol=1e-4)  # f32 sum order
    np.testing.assert_allclose(m["train/loss"], loss, rtol=1e-6)
    assert float(m["train/tokens"]) == 48 and float(m["train/grad_norm"]) > 1e-3
