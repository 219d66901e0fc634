"""Test setup: 8 fake CPU devices so every sharding path runs on a real multi-device mesh.

The flag must be set before jax is imported anywhere, hence at the top of conftest.
"""

import os

from cpu_env import xla_flags  # noqa: E402  (tests/ is on sys.path: no __init__.py)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests compile the same tiny programs (a resumed run recompiles what the killed one did);
# a per-session persistent compilation cache lets them reuse the executables.
# Subprocess tests (the real entry point, several processes, sweeps, the pipeline) inherit the
# cache through the environment, so a rerun or a second process of the same program reuses it.
# xdist workers inherit the controller's directory, so every worker and subprocess shares one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rlhf-jax-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# The files that take longest, longest first. Under `--dist loadfile` (pyproject.toml) workers take
# files in collection order, so starting these first and filling in with the many short files
# keeps one long file from running alone at the end (longest-processing-time-first scheduling).
LONGEST_FIRST = (
    "test_pipeline.py",
    "test_readme.py",
    "test_multiprocess_stages.py",
    "test_ppo.py",
    "test_hf_families.py",
    "test_aot.py",
    "test_aot_cost.py",
    "test_sweep.py",
    "test_lora_stages.py",
    "test_hf_end_to_end.py",
    "test_grpo_stage.py",
    "test_best_of_k.py",
    "test_dpo_stage.py",
    "test_multiprocess.py",
    "test_numeric_fixes.py",
    "test_rm_fixes.py",
    "test_engine.py",
)


def pytest_collection_finish(session):
    """The entry points' garbage-collector settings (cli.quiet_gc) for in-process tests too, once
    every test module is imported."""
    from rlhf_jax.infra import cli

    cli.quiet_gc()


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
