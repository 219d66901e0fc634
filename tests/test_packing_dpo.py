"""Packed comparison rows (data/packing.py `pack_comparisons`) for the RM and for DPO and its
loss variants: every comparison whole in one row and recoverable, the packed loss, metrics and
gradient equal to the unpacked ones on the same comparisons (through the stages' jitted train
steps, in two microbatches; the RM's eval sums too), the RM's packed data, and a packed DPO
stage run reporting its pad fraction."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_dpo_stage import dpo_config, setup_dir  # noqa: F401  (the module fixture)

from experiments import dpo, rm
from rlhf_jax.data import dpo_data, packing, rm_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import metrics, sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.stages import dpo as dpo_stage
from rlhf_jax.stages import rm as rm_stage


def comparisons(n: int, k: int, length: int, vocab: int, seed: int) -> dict:
    """Random comparisons in dpo_data's layout: ragged prompts and responses, K = 2 or 3 slots
    present, and one comparison with no response at all (it weighs nothing)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, length + 1, (n, k))
    ranks = np.tile(np.arange(k, dtype=np.int32), (n, 1))
    ranks[::2, k - 1] = -1
    ranks[3] = -1
    kmask = (ranks >= 0).astype(np.float32)
    mask = (np.arange(length)[None, None, :] < lengths[:, :, None]) & (kmask[:, :, None] > 0)
    tokens = np.where(mask, rng.integers(3, vocab, (n, k, length)), 0).astype(np.int32)
    prompt_len = rng.integers(1, 4, n).astype(np.int32)
    tokens[:, :, : int(prompt_len.max())] = np.where(  # a comparison's K rows share its prompt
        mask[:, :, : int(prompt_len.max())], tokens[:, :1, : int(prompt_len.max())], 0
    )
    return dict(tokens=tokens, mask=mask, ranks=ranks, kmask=kmask, prompt_len=prompt_len)


def test_pack_comparisons_keeps_every_comparison_whole_in_one_row():
    ex = comparisons(40, 3, 10, 50, seed=1)
    out, per_row = packing.pack_comparisons(ex, seed=0)
    m, width = out["tokens"].shape
    assert width == 30 and out["seg_of"].shape == (m, per_row, 3)
    fields = packing.comparison_fields(scored=True)  # the layout the stages' shardings read
    assert {k: (a.ndim, a.dtype) for k, a in out.items()} == {
        k: (nd, np.dtype(dt)) for k, (nd, dt) in fields.items()
    }
    # Best fit of whole comparisons (sizes: their present sequences' tokens) in that order.
    sizes = np.maximum((ex["mask"].sum(-1) * (ex["kmask"] > 0)).sum(-1), 1)
    order = np.random.default_rng(0).permutation(40)
    assert m == len(packing.best_fit(sizes[order], 30)) < 40
    seen = []
    for r in range(m):
        segs = out["segments"][r]
        for c in range(per_row):
            if not out["kmask"][r, c].any():
                assert (out["ranks"][r, c] == -1).all() and (out["seg_of"][r, c] == 0).all()
                continue
            seqs = []
            for j in range(3):
                s = out["seg_of"][r, c, j]
                assert (s > 0) == (out["kmask"][r, c, j] > 0)
                if not s:
                    seqs.append(())
                    continue
                at = np.nonzero(segs == s)[0]
                assert (np.diff(at) == 1).all() and (
                    out["positions"][r, at] == np.arange(len(at))
                ).all()
                seqs.append(tuple(out["tokens"][r, at]))
                scored = out["scored"][r, at]
                assert not scored[0] and scored.sum() == len(at) - np.argmax(scored)  # a suffix
            seen.append((tuple(out["ranks"][r, c]), tuple(seqs)))
    want = []
    for i in range(40):
        if not ex["kmask"][i].any():
            continue  # the empty comparison: present as a slot with nothing to score
        seqs = tuple(
            tuple(ex["tokens"][i, j][ex["mask"][i, j]]) if ex["kmask"][i, j] else ()
            for j in range(3)
        )
        want.append((tuple(ex["ranks"][i]), seqs))
    assert sorted(seen) == sorted(want)
    # The scored tokens are each response's: its sequence's positions from prompt_len on.
    n_scored = sum(
        max(int(ex["mask"][i, j].sum()) - max(int(ex["prompt_len"][i]), 1), 0)
        for i in range(40)
        for j in range(3)
        if ex["kmask"][i, j]
    )
    assert out["scored"].sum() == n_scored


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_packed_dpo_step_equals_the_unpacked_one(loss):
    """sgd(1): new params = params - grad. The same 16 comparisons unpacked (16 rows of K x L)
    and packed (fewer rows of K L, padded with empty rows to 16), each step in 2 microbatches:
    equal loss, metrics and gradient (float32, tight tolerances)."""
    cfg = model_config.preset("tiny", family="gpt2", dtype="float32")
    c = dpo.get_config()
    c.dpo.loss = loss
    mesh = mesh_lib.build_mesh(c.mesh, jax.devices())
    rules = sharding.DEFAULT_RULES
    tx = optax.sgd(1.0)
    graphdef, state, _ = state_lib.create_train_state(cfg, tx, mesh, rules, seed=0)
    _, ref, _ = state_lib.create_train_state(cfg, tx, mesh, rules, seed=1)
    ex = comparisons(16, 3, 12, cfg.vocab_size, seed=0)
    packed, _ = packing.pack_comparisons(ex, seed=0)
    assert len(packed["tokens"]) < 16  # several comparisons share a row
    packed = dpo_data._pad_rows(packed, 16)
    params0 = jax.tree.map(np.asarray, state["params"])

    def step(host):
        fn = functools.partial(
            dpo_stage.train_step, graphdef=graphdef, tx=tx, c=c.dpo, mesh=mesh, rules=rules,
            grad_accum=2,
        )  # fmt: skip
        batch = sharding.put_batch(host, mesh, rules)
        new, m = jax.jit(fn)(jax.tree.map(jnp.copy, state), ref["params"], batch)
        grads = jax.tree.map(lambda a, x: a - np.asarray(x), params0, new["params"])
        return grads, jax.tree.map(float, m)

    g1, m1 = step(ex)
    g2, m2 = step(packed)
    assert m1["dpo/prompts"] == 15 and m1["dpo/loss"] != pytest.approx(np.log(2))
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for a, x in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(x, a, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_dpo_runs_packed_and_reports_the_pad_fraction(setup_dir, tmp_path, capsys):  # noqa: F811
    root, tok = setup_dir
    c = dpo_config(root, tok)
    c.data.packing = True
    c.train.update(steps=4, eval_every=4, ckpt_every=4, seq_len=64)
    c.dpo.kl_prompts = 0
    dpo_stage.run(c, mesh_lib.build_mesh(c.mesh, jax.devices()), str(tmp_path))
    assert "'unpacked_pad_fraction'" in capsys.readouterr().out  # the start-up line's data info
    kw = dict(template=c.data.prompt_template, seq_len=64, batch_size=8, seed=0, eval_fraction=0.2)
    info = dpo_data.build_dpo_data(c.data.train, tok_lib.load_tokenizer(tok), packed=True, **kw)[3]
    # 146 training comparisons of 2 responses (27 tokens or fewer) in rows of 2 x 64 positions.
    assert info["pad_fraction"] < 0.5 < info["unpacked_pad_fraction"]
    assert info["train_rows"] < info["train_comparisons"] == 146 == info["train_pairs"]
    rows = [r for r in metrics.read_metrics(str(tmp_path / "metrics.jsonl")) if "dpo/loss" in r]
    assert len(rows) == 4 and rows[0]["dpo/loss"] == pytest.approx(np.log(2), abs=1e-6)
    # The first training row says the data's rows and padding (once: not at later rows).
    assert rows[0]["data/pad_fraction"] == pytest.approx(info["pad_fraction"])
    assert rows[0]["data/train_rows"] == info["train_rows"]
    assert not any("data/pad_fraction" in r for r in rows[1:])
    # A packed row of 64 positions holds several comparisons: more pairs per batch of 8 rows.
    assert min(r["dpo/pairs"] for r in rows) > 8
    ev = [r for r in metrics.read_metrics(str(tmp_path / "metrics.jsonl")) if "eval/loss" in r]
    assert ev and np.isfinite(ev[-1]["eval/loss"])


@pytest.mark.parametrize("batching", ["per_prompt", "per_pair"])
def test_packed_rm_step_and_eval_equal_the_unpacked_ones(batching):
    """As the DPO test, for the RM's K-choose-2 loss (a comparison's last-token scores), with a
    random score head; per_pair trains on pairs (K = 2 rows), which pack the same way."""
    cfg = model_config.preset("tiny", family="gpt2", dtype="float32", head="scalar")
    mesh = mesh_lib.build_mesh(rm.get_config().mesh, jax.devices())
    rules = sharding.DEFAULT_RULES
    tx = optax.sgd(1.0)
    graphdef, state, _ = state_lib.create_train_state(cfg, tx, mesh, rules, seed=0)
    head = state["params"]["score_head"]
    state["params"]["score_head"] = jax.device_put(
        jax.random.normal(jax.random.key(1), head.shape), head.sharding
    )
    ex = comparisons(16, 3, 12, cfg.vocab_size, seed=2)
    del ex["prompt_len"]
    if batching == "per_pair":
        ex = rm_data.pair_examples(ex)
        ex = dpo_data._pad_rows(ex, 16)  # pairs: a multiple of 8 devices x 2 microbatches
    packed, _ = packing.pack_comparisons(ex, seed=0)
    assert len(packed["tokens"]) < len(ex["tokens"]) and "scored" not in packed
    packed = dpo_data._pad_rows(packed, 16)
    params0 = jax.tree.map(np.asarray, state["params"])
    kw = dict(graphdef=graphdef, margin=0.0, mesh=mesh, rules=rules)

    def step(host):
        fn = functools.partial(
            rm_stage.train_step, tx=tx, batching=batching, grad_accum=2, **kw
        )  # fmt: skip
        batch = sharding.put_batch(host, mesh, rules)
        new, m = jax.jit(fn)(jax.tree.map(jnp.copy, state), batch)
        grads = jax.tree.map(lambda a, x: a - np.asarray(x), params0, new["params"])
        ev = jax.jit(functools.partial(rm_stage.eval_step, **kw))(state["params"], batch)
        return grads, jax.tree.map(float, m), jax.tree.map(float, ev)

    g1, m1, e1 = step(ex)
    g2, m2, e2 = step(packed)
    assert m1["rm/pairs"] > 16 and 0 < m1["rm/accuracy"] < 1
    for key in m1:
        np.testing.assert_allclose(m2[key], m1[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for key in e1:
        np.testing.assert_allclose(e2[key], e1[key], rtol=1e-5, atol=1e-5, err_msg=key)
    # Packed rows sum a weight's gradient over other rows and positions: float32 rounding of
    # sums whose terms reach the gradient's largest entries, so within 1e-5 of that scale (a
    # leaf whose gradient is 0 holds rounding noise of ~1e-9 either way).
    scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(g1))
    for a, x in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(x, a, rtol=1e-4, atol=1e-5 * scale)


def test_rm_data_packs_train_and_eval_with_one_slot_count(tmp_path):
    """build_rm_data(packed=True): rows of K L, train and eval with the same comparison slots C,
    the pair counts of the unpacked data, and the pad fractions in its info."""
    from test_dpo_stage import pairwise_comparisons

    from rlhf_jax.data import tokenizer as tok_lib

    tok = tok_lib.load_tokenizer(
        tok_lib.train_tokenizer(
            ["bob went to the park with apples"] * 50, str(tmp_path / "t.model"), 300
        )
    )
    pairwise_comparisons(tmp_path / "cmp.jsonl", 120, seed=3)
    kw = dict(template=rm.get_config().data.prompt_template, seq_len=96, batch_size=4, seed=0)
    plain = rm_data.build_rm_data(str(tmp_path / "cmp.jsonl"), tok, eval_fraction=0.2, **kw)
    it, evals, info = rm_data.build_rm_data(
        str(tmp_path / "cmp.jsonl"), tok, eval_fraction=0.2, packed=True, **kw
    )
    assert info["train_pairs"] == plain[2]["train_pairs"] and info["k"] == 2
    assert info["train_rows"] < info["train_comparisons"]
    assert info["pad_fraction"] < info["unpacked_pad_fraction"] == plain[2]["pad_fraction"]
    batch = next(it)
    assert (
        batch["tokens"].shape == (4, 2 * 96)
        and batch["seg_of"].shape[1:] == evals[0]["seg_of"].shape[1:]
    )
    assert sum(float((e["kmask"].sum(-1) == 2).sum()) for e in evals) == info["eval_comparisons"]


def test_planner_lowers_packed_rm_and_dpo_steps_with_the_packed_layout():
    """`launch.aot` plans packed RM and DPO steps (lowered for v5e:2x2, not compiled): rows of
    K L positions and [B, C, K] tables as packing.comparison_fields lays them out, the attention
    counted over the whole row (more FLOPs than K rows of L for the same tokens)."""
    pytest.importorskip("libtpu", reason="needs libtpu (pip install -e '.[tpu]')")
    from rlhf_jax.infra import plan
    from rlhf_jax.stages import aot

    for module, scored in ((rm, False), (dpo, True)):
        out = {}
        for packed in (False, True):
            config = module.get_config("fsdp=4")
            config.data.packing = packed
            mesh = mesh_lib.build_mesh(config.mesh, plan.topology_devices("v5e:2x2"))
            train = aot.functions(config, mesh)[0]
            assert train.lower().as_text()
            out[packed] = train
        batch = out[True].args[-1]
        assert set(batch) == set(packing.comparison_fields(scored))
        k, n, b = (dpo.get_config().dpo.k_max if scored else rm.get_config().rm.k_max,
                   config.train.seq_len, config.train.batch_size)  # fmt: skip
        assert batch["tokens"].shape == (b, k * n) and batch["seg_of"].shape[::2] == (b, k)
        assert out[True].tokens == out[False].tokens and out[True].flops > out[False].flops
        assert "packed rows of" in out[True].note
