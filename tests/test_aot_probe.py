"""Scanned and unrolled plans of the same model agree (stages/aot_probe.py, launch/aot.py).

A scanned model's FLOPs and bytes come from unrolled 1- and 2-layer probes; an unrolled plan
takes the compiler's count of the whole program. The two must agree within 10% on bytes and on
the roofline time: the mini preset's pretrain step (4 layers, extrapolated from 1 and 2), and
PPO-ptx's score step with a tiny policy (2 layers) and a mini reward/value model (4 layers), two
layer counts probed apart. The scanned compile's own count scaled by model FLOPs (the method
before the probes) is shown off by more than 1.5x on the same step, so the comparison can fail.
"""

import pytest

pytest.importorskip("libtpu", reason="needs libtpu (pip install -e '.[tpu]') to compile for TPU")

from experiments import ppo_ptx, pretrain  # noqa: E402
from launch import aot as aot_cli  # noqa: E402

TOPOLOGY = "v5e:2x2"


def _row(config, scan: bool, fn: str, rm_size: str = "") -> dict:
    config.model.scan_layers = scan
    report = aot_cli.plan_stage(config, TOPOLOGY, 1, rm_size, only=(fn,))
    (row,) = report["functions"]
    return row


def _close(a: dict, b: dict, what: str):
    for key in ("bytes_per_chip", "roofline_s", "flops_per_chip"):
        assert b[key] == pytest.approx(a[key], rel=0.10), (what, key, a[key], b[key])


def test_scanned_pretrain_step_plans_as_the_unrolled_one():
    def config():
        c = pretrain.get_config("fsdp=4")
        c.model.size = "mini"
        c.model.attention = "xla"  # matmuls the compiler's cost analysis counts
        return c

    unrolled = _row(config(), False, "train_step")
    scanned = _row(config(), True, "train_step")
    assert "probes" not in unrolled and scanned["probes"] == 2  # 1 layer, then 2
    _close(unrolled, scanned, "pretrain train_step")
    # The scanned compile saw one of the 4 layers and the optimizer over all of them: scaled by
    # model FLOPs over what it saw, the optimizer and head were counted 4 times.
    seen = scanned["scanned_compiler_flops"]
    old = scanned["scanned_compiler_bytes"] * scanned["flops_per_chip"] / seen
    assert old > 1.5 * unrolled["bytes_per_chip"]


def test_scanned_ppo_score_with_a_deeper_reward_model_plans_as_the_unrolled_one():
    def config():
        c = ppo_ptx.get_config("fsdp=4")
        c.model.attention = "xla"
        c.ppo.update(rollout_batch=16, minibatch=8, ptx_batch=8, prompt_len=32, max_new_tokens=16)
        return c

    unrolled = _row(config(), False, "score", rm_size="mini")
    scanned = _row(config(), True, "score", rm_size="mini")
    assert scanned["probes"] == 3  # all at 1 layer; the policy's shape at 2; the reward's at 2
    _close(unrolled, scanned, "ppo score")
