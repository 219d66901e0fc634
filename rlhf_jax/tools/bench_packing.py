"""Packing benchmarks: padded rows and packed rows side by side on the same data, for SFT
(demonstrations) and DPO (comparisons).

  python -m rlhf_jax.tools.bench sft --size mini --seq-len 256 --batch 16 --epochs 2
  python -m rlhf_jax.tools.bench dpo --size mini --seq-len 128 --batch 16 --epochs 2

DPO (`bench_dpo`): the same comparison of layouts with the DPO stage's train and eval steps
(`dpo.compile_steps`, `dpo.loss=sigmoid`, the reference a frozen copy of the init) on `comparisons`
(the bundled K-way rankings, experiments/data/tiny_comparisons.jsonl) and `long_tail` (synthetic
pairs: the chosen response copies the prompt, the rejected one is random tokens, both of
1 + a geometric number of tokens), padded as [B, K, L] and packed as rows of K L
(data/packing.py `pack_comparisons`); the held-out DPO loss on one fixed padded set.

SFT (`bench_sft`):

One process, one model init, the LM stage's own train and eval steps (`lm.compile_steps`), for
two sets: `demos` (the bundled demonstrations, experiments/data/tiny_demos.jsonl, tokenized by a
tokenizer trained here on the bundled corpus) and `long_tail` (synthetic: prompts of 4-16 random
tokens, responses copying the prompt over and over for 1 + a geometric number of tokens of mean
--tail-mean, cut at the row: lengths skewed as real conversations are). Each set trains
--epochs epochs padded (one demonstration per row) and packed (data/packing.py, best fit) from
the same init, each over its own rows, shuffled by the same seed; a packed step takes --batch x
(packed rows / padded rows) rows, the same demonstrations per step on average, so both make the
same number of optimizer updates per epoch. Prints one JSON line: per set
and layout the rows per epoch, pad fraction, median step time, real (non-padding) tokens per
second and loss tokens per second, the training loss at each epoch's end, and the held-out loss
after each epoch on one fixed padded eval set (so the two layouts are scored alike: their
curves should agree within the spread of --seed).
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from rlhf_jax.data import dpo_data, iterators, lm_data, packing, rm_data, sft_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.infra import sharding
from rlhf_jax.infra import state as state_lib
from rlhf_jax.models import config as model_config
from rlhf_jax.stages import dpo, lm

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "data")
_FIELDS = (("inputs", np.int32), ("targets", np.int32), ("mask", np.float32))


def demos_set(seq_len: int):
    """([(train examples, lengths), (eval examples, lengths)], vocab) of the bundled demos."""
    docs = lm_data.read_documents(os.path.join(DATA, "tiny_corpus.jsonl"))
    with tempfile.TemporaryDirectory() as d:
        tok = tok_lib.Tokenizer.load(tok_lib.train_tokenizer(docs, os.path.join(d, "t.model"), 512))
    demos = sft_data.read_demos(os.path.join(DATA, "tiny_demos.jsonl"))
    train, held = lm_data.split_documents(demos, 0.1, 0)
    out = []
    for part in (train, held):
        lengths: list[int] = []
        ex, _ = sft_data.encode_demos(part, tok, sft_data.PROMPT_TEMPLATE, seq_len, lengths=lengths)
        out.append((ex, lengths))
    return out, tok.vocab_size


def long_tail_set(seq_len: int, n: int, tail_mean: float, vocab: int, seed: int):
    """Synthetic demonstrations (module docstring): [(train examples, lengths), (eval ...)]."""
    rng = np.random.default_rng(seed)
    out = []
    for count in (n, max(16, n // 10)):
        ex = {k: np.zeros((count, seq_len), dt) for k, dt in _FIELDS}
        lengths = []
        for i in range(count):
            prompt = rng.integers(3, vocab, size=rng.integers(4, 17))
            resp = np.resize(prompt, 1 + rng.geometric(1 / tail_mean))
            ids = np.concatenate([[1], prompt, resp, [2]])[: seq_len + 1]
            m = len(ids) - 1
            ex["inputs"][i, :m], ex["targets"][i, :m] = ids[:-1], ids[1:]
            ex["mask"][i, len(prompt) : m] = 1.0  # the response and its end token
            lengths.append(m)
        out.append((ex, lengths))
    return out


def _train(cfg, mesh, rules, train_ex, evals, packed, batch_rows: int, args) -> dict:
    n_rows = len(train_ex["inputs"])
    steps_per_epoch = n_rows // batch_rows
    tx = state_lib.make_optimizer(
        state_lib.OptimConfig(lr=args.lr, warmup_steps=0, total_steps=steps_per_epoch * args.epochs)
    )
    graphdef, state, shardings = state_lib.create_train_state(cfg, tx, mesh, rules, seed=0)
    train, _ = lm.compile_steps(graphdef, tx, shardings, mesh, rules, 1, packed)
    _, eval_fn = lm.compile_steps(graphdef, tx, shardings, mesh, rules, 1, False)  # padded evals
    it = iterators.make_train_iterator(train_ex, batch_size=batch_rows, seed=args.seed)
    times, losses, heldout = [], [], []
    for _ in range(args.epochs):
        for _ in range(steps_per_epoch):
            batch = sharding.put_batch(next(it), mesh, rules)
            t0 = time.perf_counter()
            state, m = train(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        losses.append(round(float(m["train/loss"]), 4))
        sums = [eval_fn(state["params"], sharding.put_batch(b, mesh, rules)) for b in evals]
        heldout.append(round(sum(float(s[0]) for s in sums) / sum(float(s[1]) for s in sums), 4))
    step_s = statistics.median(times[1:])  # the first step compiles
    epoch_rows = steps_per_epoch * batch_rows
    return {
        "rows_per_epoch": n_rows,
        "batch_rows": batch_rows,
        "steps_per_epoch": steps_per_epoch,
        "median_step_ms": round(step_s * 1e3, 2),
        "train_loss": losses,
        "heldout_loss": heldout,
        "_epoch_rows": epoch_rows,
        "_step_s": step_s,
    }


def bench_sft(args, environment, make_mesh) -> dict:
    cfg_kw = dict(dtype="float32", max_len=max(args.seq_len, 256))
    mesh, rules = make_mesh(1, 1), sharding.DEFAULT_RULES
    (demo_train, demo_eval), vocab = demos_set(args.seq_len)
    sets = {
        "demos": (demo_train, demo_eval, vocab),
        "long_tail": (
            *long_tail_set(args.seq_len, args.rows, args.tail_mean, 512, args.seed),
            512,
        ),
    }
    result = {"bench": "sft_packing", "size": args.size, "seq_len": args.seq_len}
    for name, ((ex, lengths), (eval_ex, _), v) in sets.items():
        cfg = model_config.preset(args.size, vocab_size=v, **cfg_kw)
        evals = iterators.eval_batches(eval_ex, batch_size=args.batch)
        real = int(np.sum(lengths))
        loss_tokens = float(ex["mask"].sum())
        packed_ex = packing.pack(ex, lengths, args.seq_len, seed=args.seed)
        # Packed steps take as many demonstrations as padded ones on average, so both make the
        # same number of updates per epoch and their loss curves compare step for step.
        same = max(1, round(args.batch * len(packed_ex["inputs"]) / len(ex["inputs"])))
        for layout in ("padded", "packed"):
            packed = layout == "packed"
            data = packed_ex if packed else ex
            rows_per_step = same if packed else args.batch
            r = _train(cfg, mesh, rules, data, evals, packed, rows_per_step, args)
            rows, step_s = len(data["inputs"]), r.pop("_step_s")
            frac = r.pop("_epoch_rows") / rows  # rows an epoch visits (the last batch dropped)
            epoch_s = r["steps_per_epoch"] * step_s
            r["pad_fraction"] = round(
                packing.pad_fraction(data["segments"])
                if packed
                else packing.pad_fraction(lengths, args.seq_len),
                4,
            )
            r["real_tokens_per_s"] = round(real * frac / epoch_s)
            r["loss_tokens_per_s"] = round(loss_tokens * frac / epoch_s)
            result[f"{name}/{layout}"] = r
    return _finish(result, list(sets), environment)


def _finish(result: dict, sets, environment) -> dict:
    """Each set's packed / padded ratio of real tokens/s, the environment and the command."""
    for name in sets:
        pad, pack = result[f"{name}/padded"], result[f"{name}/packed"]
        result[f"{name}/speedup"] = round(pack["real_tokens_per_s"] / pad["real_tokens_per_s"], 2)
    result.update(environment())
    result["command"] = "python -m rlhf_jax.tools.bench " + " ".join(sys.argv[1:])
    return result


def add_parser(sub, sizes):
    for name, what, seq_len, lr in (("sft", "demonstrations", 256, 3e-3),
                                    ("dpo", "comparisons", 128, 1e-3)):  # fmt: skip
        s = sub.add_parser(name, help=f"{name.upper()} steps on padded vs packed rows of {what}")
        s.add_argument("--size", default="mini", choices=sizes)
        s.add_argument("--seq-len", type=int, default=seq_len)
        s.add_argument("--batch", type=int, default=16, help=f"padded {what} per step")
        s.add_argument("--epochs", type=int, default=2)
        s.add_argument("--rows", type=int, default=1024, help=f"long_tail: {what}")
        s.add_argument("--tail-mean", type=float, default=24.0, help="long_tail: mean response")
        s.add_argument("--lr", type=float, default=lr)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--out", default="", help="append the JSON result line to this file")


def comparisons_set(seq_len: int):
    """([(train examples), (eval examples)], vocab) of the bundled comparisons (dpo_data's
    layout, K = 3), tokenized by a tokenizer trained here on the bundled corpus."""
    docs = lm_data.read_documents(os.path.join(DATA, "tiny_corpus.jsonl"))
    with tempfile.TemporaryDirectory() as d:
        tok = tok_lib.Tokenizer.load(tok_lib.train_tokenizer(docs, os.path.join(d, "t.model"), 512))
    comps = rm_data.read_comparisons(
        os.path.join(DATA, "tiny_comparisons.jsonl"), 9, collections.Counter()
    )
    parts = rm_data.split_by_prompt(comps, 0.1, 0)
    k = max(len(c["ranks"]) for c in comps)
    out = [dpo_data.encode(p, tok, sft_data.PROMPT_TEMPLATE, seq_len, k)[0] for p in parts]
    return out, tok.vocab_size


def long_tail_comparisons(seq_len: int, n: int, tail_mean: float, vocab: int, seed: int):
    """Synthetic pairs (module docstring) in dpo_data's layout: [train examples, eval examples]."""
    rng = np.random.default_rng(seed)
    out = []
    for count in (n, max(16, n // 10)):
        ex = {
            "tokens": np.zeros((count, 2, seq_len), np.int32),
            "mask": np.zeros((count, 2, seq_len), bool),
            "ranks": np.tile(np.array([0, 1], np.int32), (count, 1)),
            "kmask": np.ones((count, 2), np.float32),
            "prompt_len": np.zeros(count, np.int32),
        }
        for i in range(count):
            prompt = np.concatenate([[1], rng.integers(3, vocab, size=rng.integers(4, 17))])
            chosen = np.resize(prompt[1:], 1 + rng.geometric(1 / tail_mean))
            rejected = rng.integers(3, vocab, size=1 + rng.geometric(1 / tail_mean))
            for j, resp in enumerate((chosen, rejected)):
                ids = np.concatenate([prompt, resp, [2]])[:seq_len]
                ex["tokens"][i, j, : len(ids)], ex["mask"][i, j, : len(ids)] = ids, True
            ex["prompt_len"][i] = len(prompt)
        out.append(ex)
    return out


def _train_dpo(cfg, mesh, rules, config, train_ex, evals, batch_rows: int, args) -> dict:
    n_rows = len(train_ex["tokens"])
    steps_per_epoch = n_rows // batch_rows
    config.train.update(lr=args.lr, warmup_steps=0, steps=steps_per_epoch * args.epochs)
    tx = state_lib.make_optimizer(
        state_lib.OptimConfig(lr=args.lr, warmup_steps=0, total_steps=config.train.steps)
    )
    graphdef, state, shardings = state_lib.create_train_state(cfg, tx, mesh, rules, seed=0)
    ref = jax.tree.map(lambda x: x.copy(), state["params"])
    train, _ = dpo.compile_steps(graphdef, tx, shardings, config, mesh, rules)
    padded = config.copy_and_resolve_references()
    padded.data.packing = False
    _, eval_fn = dpo.compile_steps(graphdef, tx, shardings, padded, mesh, rules)
    it = iterators.make_train_iterator(train_ex, batch_size=batch_rows, seed=args.seed)
    times, losses, heldout, pairs = [], [], [], []
    for _ in range(args.epochs):
        for _ in range(steps_per_epoch):
            batch = sharding.put_batch(next(it), mesh, rules)
            t0 = time.perf_counter()
            state, m = train(state, ref, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
            pairs.append(float(m["dpo/pairs"]))
        losses.append(round(float(m["dpo/loss"]), 4))
        sums = [eval_fn(state["params"], ref, sharding.put_batch(b, mesh, rules)) for b in evals]
        heldout.append(round(dpo.summarize(sums)["eval/loss"], 4))
    return {
        "rows_per_epoch": n_rows,
        "batch_rows": batch_rows,
        "steps_per_epoch": steps_per_epoch,
        "median_step_ms": round(statistics.median(times[1:]) * 1e3, 2),  # the first compiles
        "pairs_per_step": round(statistics.mean(pairs), 2),
        "train_loss": losses,
        "heldout_loss": heldout,
        "_epoch_rows": steps_per_epoch * batch_rows,
        "_step_s": statistics.median(times[1:]),
    }


def bench_dpo(args, environment, make_mesh) -> dict:
    from experiments import dpo as dpo_experiment

    # Positions restart in every sequence, so max_len need only cover L; the larger table (3 L)
    # is what BENCHMARKS.md's figures ran with (the same model for both layouts).
    cfg_kw = dict(dtype="float32", max_len=max(3 * args.seq_len, 256))
    mesh, rules = make_mesh(1, 1), sharding.DEFAULT_RULES
    (comp_train, comp_eval), vocab = comparisons_set(args.seq_len)
    sets = {
        "comparisons": (comp_train, comp_eval, vocab),
        "long_tail": (
            *long_tail_comparisons(args.seq_len, args.rows, args.tail_mean, 512, args.seed),
            512,
        ),
    }
    result = {"bench": "dpo_packing", "size": args.size, "seq_len": args.seq_len}
    for name, (ex, eval_ex, v) in sets.items():
        cfg = model_config.preset(args.size, vocab_size=v, **cfg_kw)
        evals = iterators.eval_batches(
            dpo_data._pad_rows(eval_ex, args.batch), batch_size=args.batch
        )
        real = int(ex["mask"].sum())
        packed_ex, _ = packing.pack_comparisons(ex, seed=args.seed)
        # Packed steps take as many comparisons as padded ones on average (module docstring).
        same = max(1, round(args.batch * len(packed_ex["tokens"]) / len(ex["tokens"])))
        for layout in ("padded", "packed"):
            config = dpo_experiment.get_config()
            config.data.packing = layout == "packed"
            data = packed_ex if config.data.packing else ex
            rows_per_step = same if config.data.packing else args.batch
            r = _train_dpo(cfg, mesh, rules, config, data, evals, rows_per_step, args)
            step_s, frac = r.pop("_step_s"), r.pop("_epoch_rows") / len(data["tokens"])
            r["pad_fraction"] = round(
                packing.pad_fraction(data["segments"])
                if config.data.packing
                else packing.comparison_pad_fraction(data),
                4,
            )
            r["real_tokens_per_s"] = round(real * frac / (r["steps_per_epoch"] * step_s))
            result[f"{name}/{layout}"] = r
    return _finish(result, list(sets), environment)
