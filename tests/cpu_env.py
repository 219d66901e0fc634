"""The environment of every test process: fake CPU devices and the tests' XLA flags.

`--xla_backend_optimization_level=0` skips LLVM's optimisation of the generated CPU code. The suite
compiles hundreds of programs for models of a few thousand parameters, where that optimisation
costs far more than it saves: it cut the suite's CPU time by about a third (a tiny model's random
init compiled in 1.2 s instead of 5.5 s). The HLO passes (fusion, SPMD partitioning, layout)
still run, so sharding and numerics are those of a normal build; users never run with it.

`--xla_cpu_use_fusion_emitters=false` emits fused loops with XLA's older elemental emitter instead
of the MLIR fusion emitters, which take about twice as long to compile a tiny model's step
(a tiny model's train step on 8 devices: 5.2 s instead of 9.8 s of compile CPU time, AMD EPYC
with AVX2). Same fusion decisions, same arithmetic; only how the loops are generated differs.
"""

import os

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices (None: the platform's one)."""
    fake = f"--xla_force_host_platform_device_count={devices} " if devices else ""
    return fake + TEST_XLA_FLAGS


def cpu_env(devices: int | None = None, **extra) -> dict:
    """os.environ for a subprocess on `devices` fake CPU devices, without the traceback switch."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **extra)
    env.pop("RLHF_JAX_TRACEBACK", None)
    return env
