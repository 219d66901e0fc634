"""The planner's search (launch/aot_search.py, rlhf_jax/infra/plan_search.py): the candidate grid
against hand enumeration, the ranking figures against a hand count on a v5e:2x2's abstract
functions (nothing compiled), and the command: a tiny pretrain search compiling one candidate, and
a 6B model on one chip dropped on its arguments alone (exit code 2, nothing compiled).
Skipped where libtpu is missing."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="needs libtpu (pip install -e '.[tpu]') to compile for TPU")

from experiments import ppo_ptx, pretrain  # noqa: E402
from rlhf_jax.infra import mesh as mesh_lib  # noqa: E402
from rlhf_jax.infra import plan, plan_search  # noqa: E402
from rlhf_jax.stages import aot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_meshes_and_candidates_are_the_hand_enumerated_grid():
    # 4 chips, 2 kv heads: tensor 1 or 2 (4 does not divide the heads), data fills the rest.
    assert sorted(plan_search.meshes(4, 2)) == sorted(
        [(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2)]
    )
    # 16 chips, 12 heads: tensor 1, 2, 4 (8 and 16 do not divide 12; 3, 6, 12 do not divide 16).
    assert {t for _, _, t in plan_search.meshes(16, 12)} == {1, 2, 4}
    assert all(d * f * t == 16 for d, f, t in plan_search.meshes(16, 12))

    c = pretrain.get_config()  # tiny: 16 rows per step, 4 heads
    cands = plan_search.candidates(c, "v5e:2x2")
    # Rows must split over data x fsdp x accum: 16 / (4 shards) leaves accum 1, 2, 4 (not 8, 16,
    # 32); every mesh has 4 shards of rows... except tensor splits, which leave 2 or 1 shards.
    want = 0
    for d, f, _ in plan_search.meshes(4, 4):
        want += 3 * sum(16 % (d * f * a) == 0 for a in (1, 2, 4, 8, 16, 32))
    assert len(cands) == want
    assert {k for cand in cands for k in cand.overrides} == {
        "mesh.ici.data", "mesh.ici.fsdp", "mesh.ici.tensor", "model.remat", "train.grad_accum"
    }  # fmt: skip
    ppo = plan_search.candidates(ppo_ptx.get_config(), "v5e:2x2", lora_rank=8)
    keys = {k for cand in ppo for k in cand.overrides}
    assert "ppo.frozen_dtype" in keys and "lora.rank" in keys and "train.grad_accum" not in keys
    assert {cand.overrides.get("lora.base_dtype") for cand in ppo} == {None, "bfloat16"}
    lora = [cand for cand in ppo if cand.overrides.get("lora.rank")]
    assert lora and not any("ppo.frozen_dtype" in cand.overrides for cand in lora)
    assert 3 * len(lora) == len(ppo)  # full: 2 frozen dtypes; LoRA: its bf16 base only
    only_mesh = plan_search.candidates(c, "v5e:2x2", axes=("mesh",))
    assert len(only_mesh) == len(plan_search.meshes(4, 4))


def test_families_are_ladders_searched_fastest_then_roomiest_first():
    def item(mesh, remat, est_s, arg_bytes, accum=1):
        o = {"mesh.ici.data": mesh[0], "mesh.ici.fsdp": mesh[1], "mesh.ici.tensor": mesh[2],
             "model.remat": remat, "train.grad_accum": accum}  # fmt: skip
        return ({"est_s": est_s, "arg_bytes": arg_bytes}, plan_search.Candidate("v5e:2x2", o))

    a, b, c = (4, 1, 1), (1, 4, 1), (2, 2, 1)
    ranked = [
        item(a, "full", 1.33, 10), item(a, "none", 1.0, 10), item(a, "dots", 1.0, 10),
        item(a, "none", 1.0, 10, accum=2),
        item(b, "none", 1.0, 5), item(b, "full", 1.33, 5),
        item(c, "full", 0.7, 20), item(c, "none", 0.5, 20),
    ]  # fmt: skip
    fams = plan_search.families(ranked)
    meshes = [tuple(f[0][1].overrides[f"mesh.ici.{k}"] for k in ("data", "fsdp", "tensor"))
              for f in fams]  # fmt: skip
    assert meshes == [c, b, a]  # fastest; then, at equal estimates, the fewest argument bytes
    rungs = [(x[1].overrides["model.remat"], x[1].overrides["train.grad_accum"]) for x in fams[2]]
    assert rungs == [("none", 1), ("none", 2), ("dots", 1), ("full", 1)]


def test_estimate_counts_arguments_compute_and_data_parallel_gradients_by_hand():
    devices = plan.topology_devices("v5e:2x2")
    chip = plan.chip_of(devices)
    c = plan_search.apply(
        pretrain.get_config(), {"mesh.ici.data": 4, "mesh.ici.fsdp": 1, "mesh.ici.tensor": 1}
    )
    mesh = mesh_lib.build_mesh(c.mesh, devices)
    fns = aot.functions(c, mesh)
    est = plan_search.estimate(c, fns, mesh, chip)
    step = next(f for f in fns if f.name == "train_step")
    row = next(r for r in est["functions"] if r["function"] == "train_step")
    args = plan.chip_bytes(step.args) + plan.chip_bytes(step.resident)
    assert row["arg_bytes"] == args and est["arg_bytes"] >= args
    assert row["compute_s"] == pytest.approx(step.flops / (4 * chip.peak_flops))
    # Data parallel, float32 params replicated: one all-reduce of the gradients, 2 (d-1)/d of
    # them, over the 4 chips' 2 torus dimensions; no FSDP gathers, no tensor collectives.
    grads = plan.chip_bytes(step.parts["params"])
    assert row["comm_s"] == pytest.approx(2 * grads * 3 / 4 / (2 * chip.ici_link_bw))
    assert est["est_s"] == pytest.approx(max(row["compute_s"], row["comm_s"]))  # the step only
    # FSDP over the 4 chips: the weights gathered twice per microbatch (3 times under remat),
    # the gradients reduce-scattered once per microbatch.
    for remat, passes in (("none", 2), ("full", 3)):
        f4 = plan_search.apply(c, {"mesh.ici.data": 1, "mesh.ici.fsdp": 4, "model.remat": remat,
                                   "train.grad_accum": 2})  # fmt: skip
        m4 = mesh_lib.build_mesh(f4.mesh, devices)
        fns4 = aot.functions(f4, m4)
        s4 = next(f for f in fns4 if f.name == "train_step")
        r4 = next(r for r in plan_search.estimate(f4, fns4, m4, chip)["functions"]
                  if r["function"] == "train_step")  # fmt: skip
        p4 = plan.chip_bytes(s4.parts["params"])
        want = (p4 * 3 * 2 * passes + p4 * 3 * 2) / (2 * chip.ici_link_bw)
        assert r4["comm_s"] == pytest.approx(want)


def _search(*args):
    return subprocess.run(
        [sys.executable, "-m", "launch.aot_search", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_search_compiles_the_best_ranked_and_names_the_smallest_slice(tmp_path):
    out = tmp_path / "search.json"
    # 12 rows per step: they split over the v5e:2x2's 4 data shards, not over the v5e:2x4's 8.
    proc = _search("--config", "experiments/pretrain.py", "--topology", "v5e:2x4,v5e:2x2",
                   "--axes", "remat", "--top", "1", "--out", str(out),
                   "--config.train.batch_size=12")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [t["topology"] for t in report["topologies"]] == ["v5e:2x2", "v5e:2x4"]  # smallest 1st
    small = report["topologies"][0]
    assert small["candidates"] == 3 and len(small["compiled"]) == 1  # one fits: --top 1
    assert small["compiled"][0]["overrides"]["mesh.ici.data"] == 4
    best = small["compiled"][0]
    assert best["fits"] and best["overrides"]["model.remat"] == "none"  # no recompute: fastest
    assert 0 < best["arg_bytes"] <= best["total_bytes"] < small["hbm_bytes"]
    # The compiled bound (the planner's roofline of the train step) is no faster than FLOPs at
    # peak, the estimate's compute (at this size the estimate is compute: no collectives).
    assert best["bound_s"] >= best["est_s"] > 0
    assert report["smallest"]["topology"] == "v5e:2x2"
    assert report["plan_command"].startswith(
        "python -m launch.aot --config experiments/pretrain.py --topology v5e:2x2"
    )
    assert "--config.train.batch_size=12" in report["plan_command"]
    assert "smallest slice that fits: v5e:2x2" in proc.stdout
    big = report["topologies"][1]  # no candidate: the rows do not split, nothing compiled
    assert (big["topology"], big["candidates"], big["compiled"]) == ("v5e:2x4", 0, [])


def test_search_refuses_an_unknown_axis_in_one_line():
    proc = _search("--config", "experiments/pretrain.py", "--topology", "v5e:2x2",
                   "--axes", "mesh,tp")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --axes ['tp']: expected some of "
        "['mesh', 'remat', 'grad_accum', 'frozen_dtype', 'lora']"
    ]


def test_search_drops_candidates_whose_arguments_exceed_hbm_without_compiling():
    proc = _search("--config", "experiments/pretrain.py:size=6b", "--topology", "v5e:1x1",
                   "--axes", "remat")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "3 candidates, 3 over HBM on their arguments alone" in proc.stdout
    assert "0 compiled" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: no candidate fits any of the topologies searched"
    )
