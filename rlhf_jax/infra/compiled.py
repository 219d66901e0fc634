"""One jitted step per (step function, static arguments, shardings, donation) in a process.

A stage builds its jitted steps each time it runs: `jax.jit(functools.partial(train_step,
graphdef=..., tx=...))`. jax caches traces by the function object, so every run of a stage in one
process traced, lowered and compiled its steps again, even where nothing had changed: the
pipeline's round-2 stages (the same PPO-ptx and DPO programs as round 1), rsft's per-round SFT,
an evaluation's models, a test's uninterrupted, killed and resumed runs. `jit` hands back the same
jitted function for equal arguments, so those runs reuse the first one's traces and executables
(on a 2-core CPU, tracing and lowering a tiny PPO update takes seconds; executing it, less).

Keys are made hashable here: pytrees (dicts of graphdefs, sharding trees) by their structure and
leaves, ConfigDicts as FrozenConfigDicts (the step sees the same values, read-only). Leaves must
be hashable and compare by value where a new run builds new ones: graphdefs, meshes, shardings,
rule tuples, frozen dataclasses; an optimizer is equal across runs when `state.make_optimizer`
returns its memoised one. A key that cannot be hashed is jitted without memoisation, as before.
"""

from __future__ import annotations

import collections
import functools

import jax
import ml_collections

_CACHE: collections.OrderedDict = collections.OrderedDict()
_MAX = 64  # jitted steps kept (with their executables); the least recently used go first


def jit(fn, *, in_shardings=None, out_shardings=None, donate_argnums=(), **static):
    """`jax.jit(functools.partial(fn, **static), in_shardings=..., out_shardings=...,
    donate_argnums=...)`, the same object for equal arguments (module docstring). Shardings of
    None are left to jax (inputs keep theirs), as in jax.jit."""
    static = {k: _frozen(v) for k, v in static.items()}
    jit_kw = {"donate_argnums": donate_argnums}
    if in_shardings is not None:
        jit_kw["in_shardings"] = in_shardings
    if out_shardings is not None:
        jit_kw["out_shardings"] = out_shardings
    key = (fn, _key(static), _key(in_shardings), _key(out_shardings), _key(donate_argnums))
    try:
        hash(key)
    except TypeError:  # an unhashable static argument: a fresh jit, no memo
        return jax.jit(functools.partial(fn, **static), **jit_kw)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    out = _CACHE[key] = jax.jit(functools.partial(fn, **static), **jit_kw)
    while len(_CACHE) > _MAX:
        _CACHE.popitem(last=False)
    return out


def _frozen(value):
    return (
        ml_collections.FrozenConfigDict(value)
        if isinstance(value, ml_collections.ConfigDict)
        else value
    )


def _key(tree):
    """A hashable stand-in for a pytree: its structure and its leaves (None stays None)."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: x is None)
    return treedef, tuple(leaves)
