"""Logical-to-mesh sharding: the only place where logical axis names meet mesh axes.

Model code names dimensions logically (`embed`, `mlp`, `act_batch`, ...). A list of rules
(`config.sharding.rules`, default `DEFAULT_RULES`) maps each logical name to a mesh axis, a tuple
of mesh axes, or None (replicated). This module turns logical names into `PartitionSpec`s and
`NamedSharding`s, constrains activations inside jitted code, and assembles global batches from
per-process host data.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with sharded params and optimizer
state), `tensor` (Megatron-style tensor parallel over heads / mlp / vocab).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Params: vocab/heads/mlp over `tensor`, the model dimension over `fsdp` (ZeRO-3-like).
# Activations: batch over (data, fsdp); heads / mlp / vocab over `tensor`.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("pos", None),
    ("lora_rank", None),  # LoRA adapters' rank axis: small, replicated (models/lora.py)
)

_log = logging.getLogger(__name__)
_ctx = threading.local()


def normalize_rules(rules) -> tuple[tuple[str, object], ...]:
    """Validates rules given as pairs `(logical, mesh_axis | (mesh_axes...) | None)`."""
    out = []
    for i, rule in enumerate(rules):
        if len(rule) != 2:
            raise ValueError(f"sharding.rules[{i}] = {rule!r} is not a (logical, mesh) pair")
        name, target = rule
        targets = () if target is None else (target,) if isinstance(target, str) else target
        for t in targets:
            if t not in MESH_AXES:
                raise ValueError(
                    f"sharding.rules[{i}]: unknown mesh axis {t!r}; expected one of {MESH_AXES}"
                )
        out.append((str(name), tuple(targets)))
    return tuple(out)


def logical_to_spec(names, rules, mesh: Mesh, shape=None) -> PartitionSpec:
    """PartitionSpec for a tuple of logical names.

    Mesh axes of size 1 are dropped, a mesh axis is used at most once per array, and a dimension
    that the mesh axes do not divide is replicated (logged once) rather than padded.
    """
    table = dict(normalize_rules(rules))
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        targets = table.get(name, ()) if name is not None else ()
        targets = tuple(t for t in targets if mesh.shape.get(t, 1) > 1 and t not in used)
        if shape is not None and targets:
            size = math.prod(mesh.shape[t] for t in targets)
            if shape[i] % size:
                _warn_once(
                    f"dim {i} ({name}) of shape {tuple(shape)} is not divisible by mesh "
                    f"axes {targets} (size {size}); replicating it"
                )
                targets = ()
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def _warn_once(msg: str):
    seen = getattr(_ctx, "warned", None)
    if seen is None:
        seen = _ctx.warned = set()
    if msg not in seen:
        seen.add(msg)
        _log.warning(msg)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree, abstract_tree, mesh: Mesh, rules):
    """NamedShardings for a pytree, given its logical-axes pytree (tuples as leaves)."""
    return jax.tree.map(
        lambda axes, a: NamedSharding(mesh, logical_to_spec(axes, rules, mesh, a.shape)),
        axes_tree,
        abstract_tree,
        is_leaf=_is_axes,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a host batch: leading dim over the `act_batch` mesh axes, rest replicated."""
    names = ("act_batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh))


def data_parallel_size(mesh: Mesh, rules) -> int:
    """How many ways the batch is split (the product of the `act_batch` mesh axes)."""
    spec = logical_to_spec(("act_batch",), rules, mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)


def put_batch(local: dict, mesh: Mesh, rules) -> dict:
    """Per-process numpy batch -> global jax.Arrays sharded along the batch axis.

    Each process passes its own slice ([global_batch / process_count, ...]); the result is one
    global array per key. This is the single entry point of host data into the device.
    """
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        sh = batch_sharding(mesh, rules, value.ndim)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sh, value, global_shape)
    return out


def put_global(host: dict, mesh: Mesh, rules) -> dict:
    """Whole-batch numpy arrays, the same on every process -> global arrays sharded by batch.

    For data every process holds in full (a decoded rollout's scores, a tool's prompt batch);
    each process places only the rows its devices own. Typed PRNG key arrays keep their type.
    """
    out = {}
    for key, value in host.items():
        is_key = isinstance(value, jax.Array) and jax.dtypes.issubdtype(
            value.dtype, jax.dtypes.prng_key
        )
        arr = np.asarray(jax.random.key_data(value) if is_key else value)
        sh = batch_sharding(mesh, rules, arr.ndim)
        glob = jax.make_array_from_callback(arr.shape, sh, lambda idx, a=arr: a[idx])
        out[key] = jax.random.wrap_key_data(glob) if is_key else glob
    return out


def to_host(tree):
    """numpy copies of (global) arrays, gathered across processes on purpose.

    `jax.device_get` of an array that spans processes fails; a batch-sharded one is gathered
    with `process_allgather` (a collective: every process must call this at the same point),
    a replicated one (scalar metrics) is read from a local copy.
    """

    def get(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(get, tree)


def check_batch(size: int, key: str, mesh: Mesh, rules) -> None:
    """Refuses a batch that the data-parallel devices (and processes) do not divide.

    Such a batch would be replicated (every device computing all of it), never an error.
    """
    dp = data_parallel_size(mesh, rules)
    n = math.lcm(dp, jax.process_count())
    if size % n:
        raise ValueError(
            f"{key}={size} does not divide over the {dp} data-parallel devices"
            f" of {jax.process_count()} process(es); use a multiple of {n}"
        )


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules):
    """Activates (mesh, rules) for `constrain` while tracing jitted model code."""
    prev = getattr(_ctx, "active", None)
    _ctx.active = (mesh, normalize_rules(rules))
    try:
        yield
    finally:
        _ctx.active = prev


def active():
    """The (mesh, rules) that `use_rules` activated, or None outside it (attention reads the
    mesh to pick its kernel and to run a per-shard kernel under `shard_map`)."""
    return getattr(_ctx, "active", None)


def constrain(x, names):
    """`with_sharding_constraint` by logical names; a no-op outside `use_rules`."""
    active = getattr(_ctx, "active", None)
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
