"""The smallest whole pipeline, as the pipeline and multi-process tests launch it.

One 1-process 8-device run is made per test session (conftest's `pipeline_run`); the pipeline
test checks it end to end and the multi-process test compares a 2 x 4 run with it, and reuses its
SFT and reward models as inputs of the PPO and tool runs.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = [
    "--config.world.sizes.pretrain=600",
    "--config.world.sizes.heldout=40",
    "--config.world.sizes.demos=200",
    "--config.world.sizes.rm_prompts=48",
    "--config.world.sizes.ppo_prompts=64",
    "--config.world.sizes.eval_prompts=16",
    "--config.stages.pretrain.train.steps=10",
    "--config.stages.pretrain.train.batch_size=8",
    "--config.stages.pretrain.train.eval_every=10",
    "--config.stages.sft.train.epochs=0.0",
    "--config.stages.sft.train.steps=6",
    "--config.stages.sft.train.batch_size=8",
    "--config.stages.sft.sft.eval_samples=2",
    "--config.stages.rm.train.steps=4",
    "--config.stages.rm.train.batch_size=8",
    "--config.stages.ppo.train.steps=2",
    "--config.stages.ppo.ppo.rollout_batch=16",
    "--config.stages.ppo.ppo.minibatch=8",
    "--config.stages.ppo.ppo.epochs=1",
    "--config.stages.ppo.ppo.eval_every=2",
    "--config.stages.ppo.ppo.eval_prompts=16",
    "--config.stages.ppo.ppo.ptx_batch=8",
    "--config.stages.rsft.rsft.rounds=1",
    "--config.stages.rsft.rsft.prompts_per_round=8",
    "--config.stages.rsft.train.batch_size=8",
    "--config.stages.rsft.rsft.finished_only=False",  # tiny models rarely finish
    "--config.evaluate.best_of_k=2",
    "--config.rounds=2",
    "--config.collect.k=3",
    "--config.collect.max_new_tokens=12",
    "--config.evaluate.max_new_tokens=12",
]


def launch(workdir, *extra, processes=1):
    """The pipeline on 8 CPU devices: one process, or `processes` through launch.local."""
    devices = 8 // processes
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    entry = ["-m", "launch.run"]
    if processes > 1:
        entry = ["-m", "launch.local", "--processes", str(processes)]
        entry += ["--devices_per_process", str(devices), "--"]
    cmd = [
        sys.executable,
        *entry,
        "--config",
        "experiments/pipeline.py:size=tiny",
        "--workdir",
        os.path.relpath(workdir, ROOT),  # relative, as users type it (resolved at the entry)
        *SMALL,
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
