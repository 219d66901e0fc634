"""Best-of-K sampling, teacher-forced response log-likelihoods / KL, and rejection-sampling
fine-tuning (stages/rsft.py) on tiny models trained by the real stages."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common, pretrain, rm, rsft, sft
from rlhf_jax.data import lm_data, sft_data
from rlhf_jax.data import tokenizer as tok_lib
from rlhf_jax.infra import checkpoint, metrics, sharding
from rlhf_jax.infra import mesh as mesh_lib
from rlhf_jax.infra import state as state_lib
from rlhf_jax.sampling import best_of_k, likelihood, load, reward
from rlhf_jax.stages import lm
from rlhf_jax.stages import rm as rm_stage
from rlhf_jax.stages import rsft as rsft_stage
from rlhf_jax.tools import best_of_k as best_of_k_tool
from rlhf_jax.tools import generate

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPTS = os.path.join(HERE, "..", "experiments", "data", "tiny_prompts.jsonl")
K, T, SEED = 4, 12, 3

# Every test here trains or samples a real stage in-process (tens of seconds).
pytestmark = pytest.mark.slow


def local_mesh():
    """The mesh the commands build (every local device), so their compiled functions are reused."""
    return mesh_lib.build_mesh(common.mesh_config(), jax.local_devices())


def two_device_mesh():
    # Two devices: the sharded path still runs, at a fraction of 8 fake devices' overhead.
    return mesh_lib.build_mesh(sft.get_config().mesh, jax.devices()[:2])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny SFT policy (trained from scratch on the demos) and an RM started from it."""
    root = tmp_path_factory.mktemp("bok")
    docs = lm_data.read_documents(pretrain.get_config().data.train)
    tok = tok_lib.train_tokenizer(docs, str(root / "tok.model"), 512)
    mesh = two_device_mesh()
    s = sft.get_config()
    s.tokenizer.path = tok
    s.sft.eval_samples = 0
    s.train.update(
        epochs=0.0, steps=40, lr=3e-3, warmup_steps=5, eval_every=0, ckpt_every=40, log_every=20
    )
    lm.run(s, mesh, str(root / "sft"))
    r = rm.get_config()
    r.init_from = str(root / "sft")
    r.rm.norm_data = s.data.train
    r.rm.norm_max = 32
    r.train.update(steps=4, batch_size=8, lr=3e-3, eval_every=0, ckpt_every=4, log_every=2)
    rm_stage.run(r, mesh, str(root / "rm"))
    return {"root": root, "sft": str(root / "sft"), "rm": str(root / "rm")}


@pytest.fixture(scope="module")
def prompts_file(dirs):
    path = dirs["root"] / "prompts.jsonl"
    rows = lm_data.read_jsonl(PROMPTS, {"prompt": str})[:3]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_best_of_k_picks_the_rm_argmax_of_plain_samples(dirs, prompts_file, tmp_path):
    out = tmp_path / "best.jsonl"
    argv = ["--policy", dirs["sft"], "--reward", dirs["rm"], "--prompts", prompts_file]
    argv += ["--out", str(out), "--k", str(K), "--max-new-tokens", str(T), "--seed", str(SEED)]
    best_of_k_tool.main(argv)
    recs = read(out)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]

    # The candidates are exactly what plain sampling (generate, K samples, same seed) writes.
    plain = tmp_path / "plain.jsonl"
    args = generate.parse_args(
        ["--checkpoint", dirs["sft"], "--prompts", prompts_file, "--out", str(plain)]
        + ["--num-samples", str(K), "--max-new-tokens", str(T), "--seed", str(SEED)]
    )
    generate.run(args)
    samples = read(plain)
    assert len(recs) == 3 and len(samples) == 3 * K
    cands = [c for r in recs for c in r["candidates"]]
    for c, s in zip(cands, samples, strict=True):
        assert (c["response"], c["tokens"], c["finished"]) == (
            s["response"],
            s["tokens"],
            s["finished"],
        )
        assert abs(c["logprob"] - s["logprob"]) < 1e-3
    assert len({c["response"] for c in cands}) > 1

    # Scores recomputed independently with the RM (and its bias), read as PPO reads its
    # rollouts: at the EOS of a finished response, at the last token of an unfinished one
    # (no EOS appended to it); the chosen one is the argmax.
    mesh = local_mesh()
    graphdef, params, _, tok, meta = load.load_model(dirs["rm"], mesh)
    template = meta["config"]["data"]["prompt_template"]
    seq_len = meta["config"]["train"]["seq_len"]
    bias = rm_stage.load_bias(dirs["rm"])
    forward = jax.jit(lambda p, x: state_lib.merge(graphdef, p)(x)[0])
    scores = []
    for s in samples:  # one unpadded row at a time, read at its last token
        ids = sft_data.prompt_ids(tok, template, s["prompt"]) + tok.encode(s["response"])
        ids = (ids + ([tok.eos_id] if s["finished"] else []))[:seq_len]
        scores.append(float(forward(params, jnp.asarray([ids], jnp.int32))[0, -1]) + bias)
    scores = np.asarray(scores).reshape(3, K)
    assert bias != 0.0
    # Some candidates were cut at the length limit, and for them appending an EOS (the
    # all-finished scoring of reward.score_texts) would give another score.
    unfinished = [i for i, s in enumerate(samples) if not s["finished"]]
    assert unfinished
    with_eos = reward.score_texts(
        graphdef,
        params,
        tok,
        [(samples[i]["prompt"], samples[i]["response"]) for i in unfinished],
        template=template,
        seq_len=seq_len,
        mesh=mesh,
        rules=sharding.DEFAULT_RULES,
        bias=bias,
    )
    assert np.abs(with_eos - scores.reshape(-1)[unfinished]).max() > 1e-3
    for rec, row in zip(recs, scores, strict=True):
        np.testing.assert_allclose([c["score"] for c in rec["candidates"]], row, atol=1e-4)
        best = int(np.argmax(row))
        assert rec["score"] == max(c["score"] for c in rec["candidates"])
        assert rec["response"] == rec["candidates"][best]["response"]
        assert set(rec) == {
            "prompt",
            "response",
            "score",
            "tokens",
            "finished",
            "best",
            "candidates",
        }


def test_select_breaks_ties_to_the_lowest_index():
    group = [
        {"prompt": "p", "response": str(i), "tokens": 1, "finished": True, "logprob": 0.0}
        for i in range(4)
    ]
    (rec,) = best_of_k.select([group], [[0.5, 2.0, 2.0, -1.0]])
    assert rec["best"] == 1 and rec["response"] == "1" and rec["score"] == 2.0


def test_bad_cli_input_is_one_line_error(dirs, prompts_file, tmp_path, capsys):
    missing = tmp_path / "nope"
    argv = ["--policy", dirs["sft"], "--reward", str(missing), "--prompts", prompts_file]
    with pytest.raises(SystemExit) as e:
        best_of_k_tool.main(argv + ["--out", str(tmp_path / "o.jsonl")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: --reward {missing} does not exist"
    with pytest.raises(SystemExit):  # an LM where the RM belongs
        best_of_k_tool.main(
            [
                "--policy",
                dirs["sft"],
                "--reward",
                dirs["sft"],
                "--prompts",
                prompts_file,
                "--out",
                str(tmp_path / "o.jsonl"),
                "--max-new-tokens",
                "4",
            ]
        )
    assert "expected a scalar head" in capsys.readouterr().err


def naive_logprob(forward, params, prompt_ids, response_ids):
    """Sum over the response of log softmax, from one unpadded, uncached forward of the row."""
    ids = prompt_ids + response_ids
    logits = np.asarray(forward(params, jnp.asarray([ids], jnp.int32))[0], np.float64)  # [L, V]
    total = 0.0
    for t in range(len(prompt_ids), len(ids)):  # token t is predicted at position t - 1
        z = logits[t - 1]
        total += z[ids[t]] - (z.max() + np.log(np.exp(z - z.max()).sum()))
    return total


def test_response_logprobs_match_a_naive_loop_and_self_kl_is_zero(dirs, prompts_file, tmp_path):
    mesh = local_mesh()
    prompts, _ = load.read_prompts(prompts_file)
    groups = best_of_k.sample_candidates(
        dirs["sft"], prompts, K, max_new_tokens=T, seed=SEED, mesh=mesh
    )
    recs = [c for g in groups for c in g]
    # An unfinished copy of a finished record scores its text without the EOS.
    recs.append({**recs[0], "finished": not recs[0]["finished"]})
    got = likelihood.response_logprobs(dirs["sft"], recs, mesh=mesh, batch_size=4)

    graphdef, params, _, tok, meta = load.load_model(dirs["sft"], mesh)
    forward = jax.jit(lambda p, x: state_lib.merge(graphdef, p)(x)[0])
    template = meta["config"]["data"]["prompt_template"]
    p_ids, r_ids = likelihood.encode_responses(tok, recs, template)
    for i in (0, 1, len(recs) - 1):
        ref = naive_logprob(forward, params, p_ids[i], r_ids[i])
        assert abs(got[i] - ref) < 1e-4, (i, got[i], ref)
    assert abs(got[-1] - got[0]) > 1e-3  # the EOS term counts exactly when finished
    # Where the re-encoded text is the sampled token sequence, the sampler's own (cached decode)
    # logprob agrees with the teacher-forced one.
    for i, r in enumerate(recs[:-1]):
        if r_ids[i] == r["ids"]:
            assert abs(got[i] - r["logprob"]) < 1e-3
    assert sum(r_ids[i] == r["ids"] for i, r in enumerate(recs[:-1])) >= len(recs) // 2

    kl = likelihood.kl_to_reference(recs, dirs["sft"], dirs["sft"], mesh=mesh)
    assert kl["kl"] == 0.0 and kl["n"] == len(recs)
    assert abs(kl["policy_logprob"] - got.mean()) < 1e-4  # another batch size here


def rsft_config(dirs, **kw):
    c = rsft.get_config()
    c.init_from = dirs["sft"]
    c.rsft.reward_from = dirs["rm"]
    c.rsft.update(k=3, rounds=2, prompts_per_round=12, max_new_tokens=10, finished_only=False)
    c.rsft.update(kw)
    c.train.update(epochs=1.0, batch_size=4, log_every=2, ckpt_every=100)
    return c


def test_rsft_two_rounds_train_only_on_the_selection_and_resume(dirs, tmp_path, monkeypatch):
    wd = tmp_path / "rsft"
    config = rsft_config(dirs)
    mesh = two_device_mesh()
    final = rsft_stage.run(config, mesh, str(wd))
    assert final == rsft_stage.final_policy(str(wd)) == str(wd / "round_2" / "policy")

    rounds = json.loads((wd / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    seen = []
    for r in (1, 2):
        rdir = wd / f"round_{r}"
        cands, sel = read(rdir / "candidates.jsonl"), read(rdir / "selected.jsonl")
        assert len(cands) == 12 and all(len(c["candidates"]) == 3 for c in cands)
        # Every prompt keeps exactly its argmax candidate (no threshold, unfinished allowed).
        assert len(sel) == 12
        for c, s in zip(cands, sel, strict=True):
            scores = [x["score"] for x in c["candidates"]]
            assert s["sample"] == int(np.argmax(scores)) and s["k"] == 3
            assert (s["prompt"], s["response"]) == (c["prompt"], c["response"])
            assert s["score"] == max(scores)
        seen += [c["prompt"] for c in cands]
        st = rounds[r - 1]
        assert st["kept"] == 12 and st["selected_score"] >= st["candidate_score"]
        assert st["policy"] == f"round_{r}/policy"

        # The round's SFT stage trained on exactly selected.jsonl, from the previous policy.
        meta = checkpoint.read_meta(str(rdir / "policy"))
        child = meta["config"]
        assert child["stage"] == "sft" and child["data"]["train"] == str(rdir / "selected.jsonl")
        prev = dirs["sft"] if r == 1 else str(wd / "round_1" / "policy")
        assert child["init_from"] == prev and child["data"]["eval_fraction"] == 0.0
        child_cfg = rsft_stage.sft_config(config, str(rdir / "selected.jsonl"), prev)
        tok = tok_lib.Tokenizer.load(str(rdir / "policy" / "tokenizer.model"))
        _, _, _, info = lm.build_data(child_cfg, tok, str(rdir / "policy"))
        assert info["train_demos"] == 12 and info["eval_demos"] == 0
        ex, _ = sft_data.encode_demos(sel, tok, child_cfg.data.prompt_template, 64)
        assert info["response_tokens"] == int(ex["mask"].sum())
    # New prompts each round (12 + 12 of 1000 distinct tiny prompts, no wrap-around).
    assert len(set(seen)) == len(seen)

    rows = metrics.read_metrics(str(wd / "metrics.jsonl"))
    assert [r["step"] for r in rows if "rsft/selected_score" in r] == [1, 2]
    assert all("rsft/kept_fraction" in r and "rsft/candidate_score" in r for r in rows)

    # Rerun: finished rounds are skipped (nothing sampled, nothing trained).
    def boom(*a, **k):
        raise AssertionError("a finished round ran again")

    monkeypatch.setattr(best_of_k, "best_of_k", boom)
    monkeypatch.setattr(lm, "run", boom)
    assert rsft_stage.run(config, mesh, str(wd)) == final

    # Killed after round 2's SFT finished but before rounds.json: the stored candidates are
    # reused (no sampling) and the finished SFT stage resumes at its last step.
    (wd / "rounds.json").write_text(json.dumps(rounds[:1]))
    monkeypatch.undo()
    monkeypatch.setattr(best_of_k, "best_of_k", boom)
    assert rsft_stage.run(config, mesh, str(wd)) == final
    again = json.loads((wd / "rounds.json").read_text())
    assert again == rounds

    # The fine-tuned policy moved away from where it started; KL to itself is 0.
    recs = [
        {"prompt": c["prompt"], **x}
        for c in read(wd / "round_2" / "candidates.jsonl")[:4]
        for x in c["candidates"]
    ]
    kl = likelihood.kl_to_reference(
        recs, str(wd / "round_1" / "policy"), dirs["sft"], mesh=local_mesh()
    )
    assert abs(kl["kl"]) > 1e-3


def test_rsft_threshold_and_finished_only_drop_candidates(dirs, tmp_path):
    recs = [
        {
            "prompt": "a",
            "score": 2.0,
            "candidates": [
                {"response": "x", "score": 2.0, "finished": False, "tokens": 3},
                {"response": "y", "score": 1.0, "finished": True, "tokens": 2},
            ],
        },
        {
            "prompt": "b",
            "score": -1.0,
            "candidates": [
                {"response": "z", "score": -1.0, "finished": True, "tokens": 2},
                {"response": "w", "score": -1.0, "finished": True, "tokens": 4},
            ],
        },
        {
            "prompt": "c",
            "score": 0.5,
            "candidates": [
                {"response": "v", "score": 0.5, "finished": False, "tokens": 9},
            ],
        },
    ]
    pick = lambda cfg, d: [
        (r["prompt"], r["response"]) for r in rsft_stage.select_round(cfg, str(d), recs)
    ]
    c = rsft_config(dirs, finished_only=True, use_threshold=True, threshold=0.0)
    (tmp_path / "1").mkdir()
    # "a": the unfinished top candidate is not eligible; "b": below the threshold; "c": none.
    assert pick(c, tmp_path / "1") == [("a", "y")]
    assert read(tmp_path / "1" / "selected.jsonl")[0]["score"] == 1.0
    c = rsft_config(dirs, finished_only=True, use_threshold=False)
    (tmp_path / "2").mkdir()
    assert pick(c, tmp_path / "2") == [("a", "y"), ("b", "z")]  # tie: the lowest index
    c = rsft_config(dirs, finished_only=False, use_threshold=True, threshold=0.5)
    (tmp_path / "3").mkdir()
    assert pick(c, tmp_path / "3") == [("a", "x"), ("c", "v")]  # 0.5 >= 0.5 is kept


def test_rsft_round_keeping_too_little_stops_and_a_lower_threshold_resumes(dirs, tmp_path):
    wd = tmp_path / "rsft"
    mesh = two_device_mesh()
    strict = rsft_config(dirs, rounds=1, use_threshold=True, threshold=1e9)
    with pytest.raises(ValueError, match="round 1 kept 0 of 12 prompts"):
        rsft_stage.run(strict, mesh, str(wd))
    assert read(wd / "round_1" / "selected.jsonl") == []
    # The stored candidates are reused and the selection is redone under the new config.
    rsft_stage.run(rsft_config(dirs, rounds=1), mesh, str(wd))
    assert len(read(wd / "round_1" / "selected.jsonl")) == 12
