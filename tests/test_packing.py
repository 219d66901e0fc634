"""Packed rows (data/packing.py): the best-fit packer against a naive one, packing that loses
nothing, a packed forward equal to each example's own forward, and the SFT loss and gradient on
packed rows equal to those on the padded rows of the same demonstrations; an SFT run packed."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import pretrain, sft
from rlhf_jax.data import lm_data, packing, sft_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import metrics
from rlhf_jax.models import config as model_config
from rlhf_jax.models import transformer as M
from rlhf_jax.stages import lm, setup


def naive_best_fit(lengths, capacity):
    """Every row scanned for each example: the fullest one that still holds it, earliest first."""
    rows, left = [], []
    for i, n in enumerate(lengths):
        fits = [r for r in range(len(rows)) if left[r] >= n]
        if not fits:
            rows.append([i])
            left.append(capacity - n)
            continue
        r = min(fits, key=lambda r: (left[r], r))
        rows[r].append(i)
        left[r] -= n
    return rows


def test_best_fit_equals_a_naive_scan_and_fills_rows():
    rng = np.random.default_rng(0)
    lengths = np.minimum(1 + rng.geometric(1 / 12, size=500), 64)  # long-tailed
    rows = packing.best_fit(lengths, 64)
    assert rows == naive_best_fit(list(lengths), 64)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert len(rows) <= 1.1 * lengths.sum() / 64 + 1  # nearly full rows
    with pytest.raises(ValueError, match="example 1 takes 65 positions"):
        packing.best_fit([3, 65], 64)


def test_pack_keeps_every_example_with_its_segment_and_positions():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 9, size=40)
    L = 8
    ex = {"inputs": np.full((40, L), 7, np.int32), "mask": np.zeros((40, L), np.float32)}
    for i, n in enumerate(lengths):
        ex["inputs"][i, :n] = 100 * i + np.arange(n)
        ex["mask"][i, :n] = rng.random(n)
    out = packing.pack(ex, lengths, 16, seed=3)
    again = packing.pack(ex, lengths, 16, seed=3)
    assert all(np.array_equal(out[k], again[k]) for k in out)  # the seed fixes the rows
    first = [int(out["inputs"][r, 0]) // 100 for r in range(len(out["inputs"]))]
    assert first != sorted(first)  # not file order
    seen = {}
    for r in range(len(out["inputs"])):
        seg, pos = out["segments"][r], out["positions"][r]
        for k in range(1, seg.max() + 1):
            at = np.nonzero(seg == k)[0]
            assert list(at) == list(range(at[0], at[0] + len(at)))  # contiguous
            assert list(pos[at]) == list(range(len(at)))
            i = int(out["inputs"][r, at[0]]) // 100
            np.testing.assert_array_equal(out["inputs"][r, at], ex["inputs"][i, : lengths[i]])
            np.testing.assert_array_equal(out["mask"][r, at], ex["mask"][i, : lengths[i]])
            seen[i] = True
        assert np.all(out["inputs"][r, seg == 0] == 7) and np.all(out["mask"][r, seg == 0] == 0)
    assert len(seen) == 40
    assert packing.pad_fraction(out["segments"]) == pytest.approx(
        1 - lengths.sum() / out["segments"].size
    )
    assert packing.pad_fraction(lengths, L) == pytest.approx(1 - lengths.sum() / (40 * L))


@pytest.mark.parametrize(
    "arch",
    [
        dict(family="gpt2"),
        dict(family="llama", n_kv_heads=2, sliding_window=4, window_pattern="LG"),
    ],
    ids=["gpt2", "llama_gqa_window"],
)
def test_packed_forward_equals_each_examples_own_forward(arch):
    cfg = model_config.preset("tiny", dtype="float32", **arch)
    model = M.build(cfg, seed=0)
    rng = np.random.default_rng(2)
    lengths = [5, 9, 3, 7]
    seqs = [rng.integers(3, 500, size=n).astype(np.int32) for n in lengths]
    ex = {"inputs": np.zeros((4, 9), np.int32)}
    for i, s in enumerate(seqs):
        ex["inputs"][i, : len(s)] = s
    out = packing.pack(ex, lengths, 16)
    assert len(out["inputs"]) == 2  # 9 + 7 and 5 + 3 (+ padding)
    fwd = jax.jit(lambda x, p, m: model(x, positions=p, key_mask=m)[0])
    packed = np.asarray(fwd(*(jnp.asarray(out[k]) for k in ("inputs", "positions", "segments"))))
    for r in range(2):
        seg = out["segments"][r]
        for k in range(1, seg.max() + 1):
            at = seg == k
            own = np.asarray(
                jax.jit(lambda x: model(x)[0])(jnp.asarray(out["inputs"][r, at][None]))
            )
            np.testing.assert_allclose(packed[r, at], own[0], atol=2e-5, rtol=2e-5)
    # Without the segments (one causal row) the later examples see the earlier ones.
    plain = np.asarray(jax.jit(lambda x: model(x)[0])(jnp.asarray(out["inputs"])))
    second = out["segments"][0] == 2
    assert np.abs(plain[0, second] - packed[0, second]).max() > 1e-3


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    docs = lm_data.read_documents(pretrain.get_config().data.train)
    return tok_lib.Tokenizer.load(tok_lib.train_tokenizer(docs, path, 512))


def test_sft_loss_and_gradient_packed_equal_padded(tok):
    """The same 12 demonstrations as 12 padded rows and as packed rows: one summed-NLL mean and
    one gradient (float32)."""
    demos = sft_data.read_demos(sft.get_config().data.train)[:12]
    template = sft_data.PROMPT_TEMPLATE
    padded, _, pad = sft_data.encode_for_training(demos, tok, template, 96, packed=False)
    packed, _, packed_pad = sft_data.encode_for_training(demos, tok, template, 96, packed=True)
    assert len(packed["inputs"]) < 12 and packed_pad < pad
    cfg = model_config.preset("tiny", dtype="float32", vocab_size=tok.vocab_size)
    graphdef, params = nnx.split(M.build(cfg, seed=0))
    grad = jax.jit(
        jax.value_and_grad(functools.partial(lm.lm_loss, graphdef=graphdef), has_aux=True)
    )
    (a, ma), ga = grad(params, jax.tree.map(jnp.asarray, padded))
    (b, mb), gb = grad(params, jax.tree.map(jnp.asarray, packed))
    assert float(ma["tokens"]) == float(mb["tokens"]) == float(padded["mask"].sum())
    np.testing.assert_allclose(float(b), float(a), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_sft_runs_packed_and_reports_the_pad_fraction(tmp_path):
    pre_dir = tmp_path / "pre"
    pre = pretrain.get_config()
    pre.train.update(steps=2, batch_size=8, seq_len=64, eval_every=0, ckpt_every=2)
    mesh = mesh_lib.build_mesh(pre.mesh)
    lm.run(pre, mesh, str(pre_dir))
    c = sft.get_config()
    demos = tmp_path / "demos.jsonl"  # 48 of the bundled demonstrations: a short epoch
    demos.write_text("".join(Path(c.data.train).read_text().splitlines(True)[:48]))
    c.data.train = str(demos)
    c.init_from = str(pre_dir)
    c.data.packing = True
    c.sft.eval_samples = 0
    c.train.update(epochs=1.0, steps=0, batch_size=8, eval_every=0, ckpt_every=1000, log_every=1)
    lm.run(c, mesh, str(tmp_path / "sft"))
    tok = tok_lib.Tokenizer.load(str(pre_dir / setup.TOKENIZER_FILE))
    info = sft_data.build_sft_data(
        c.data.train, tok, template=c.data.prompt_template, seq_len=c.train.seq_len,
        batch_size=8, seed=c.seed, packed=True,
    )[3]  # fmt: skip
    rows = [
        r
        for r in metrics.read_metrics(str(tmp_path / "sft" / "metrics.jsonl"))
        if "train/loss" in r
    ]
    # One epoch over packed rows: fewer steps than over one demonstration per row.
    assert len(rows) == int(np.ceil(info["train_rows"] / 8)) < int(np.ceil(info["train_demos"] / 8))
    assert all(np.isfinite(r["train/loss"]) for r in rows)
    assert 0 <= info["pad_fraction"] < 0.5
    assert rows[0]["data/pad_fraction"] == pytest.approx(info["pad_fraction"])  # logged once
    assert rows[0]["data/train_rows"] == info["train_rows"] and "data/train_rows" not in rows[1]


def test_packing_is_refused_where_nothing_packs():
    """data.packing on a stage that does not pack stops at the entry with one line naming the
    key; the SFT stage (alone or in a pipeline) passes."""
    from experiments import kto, pipeline

    c = kto.get_config()
    c.data.packing = True
    msg = r"config.data.packing=True: only the sft, rm and dpo stages pack their rows.*'kto'"
    with pytest.raises(ValueError, match=msg):
        setup.check_packing(c)
    p = pipeline.get_config("size=tiny")
    for stage in ("sft", "rm", "dpo", "simpo"):  # SimPO is the DPO stage
        p.stages[stage].data.packing = True
    setup.check_packing(p)
    p.stages.kto.data.packing = True
    with pytest.raises(ValueError, match=r"config.stages.kto.data.packing=True"):
        setup.check_packing(p)
    p.stages.kto.data.packing = False
    p.data.packing = True
    with pytest.raises(ValueError, match=r"set config.stages.<stage>.data.packing"):
        setup.check_packing(p)
    s = sft.get_config()
    s.data.packing = True
    setup.check_packing(s)
    assert setup.is_packed(s) and not setup.is_packed(sft.get_config())
