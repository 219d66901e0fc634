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

`--xla_llvm_disable_expensive_passes=true` skips the LLVM passes XLA marks expensive: the tiny
pipeline run (1 process, no compilation cache) compiled in 39.0 and 32.8 s against 42.3 and 36.0 s
without it, measured alternately (AMD EPYC with AVX-512); 5-8% of every test's compile time.
`--xla_cpu_parallel_codegen_split_count=1` (one LLVM module instead of several compiled on
threads) was slower (46.9 s), and copy insertion without region analysis within noise (40.7 s).
"""

import os

TEST_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    " --xla_llvm_disable_expensive_passes=true"
)


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices (None: the platform's one)."""
    fake = f"--xla_force_host_platform_device_count={devices} " if devices else ""
    return fake + TEST_XLA_FLAGS


def cpu_env(devices: int | None = None, **extra) -> dict:
    """os.environ for a subprocess on `devices` fake CPU devices, without the traceback switch."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices), **extra)
    env.pop("RLHF_JAX_TRACEBACK", None)
    return env
