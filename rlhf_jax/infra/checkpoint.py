"""Checkpoints: training state, data-iterator state and run metadata, through orbax.

This is the only module that imports orbax, so it stays one piece (a little over 400 lines):
saving, restoring, reading the meta and the compatibility checks all speak orbax's layout. A
checkpoint is one step directory under
`<workdir>/checkpoints/` holding one orbax item per named pytree of the training state (so a
later stage can restore `params` alone), plus two JSON items: `data` (the data-iterator state)
and `meta` (experiment config, model config, seeds, KL-controller value...).

Layout on disk (orbax 0.12, default step naming)::

    checkpoints/
      100/                      one committed step
        params/ opt_state/ ...  one orbax PyTree item per entry of `state`
        data/ meta/             JSON items (absent when not given)
        commit_success.txt      written last, before the atomic rename
      200.orbax-checkpoint-tmp-<t>/   an unfinished save: never listed, never loaded

Saves are asynchronous (the call returns once device arrays are copied to host, so the caller
may donate them right away) and atomic (orbax writes a tmp dir and renames it, or on object
stores writes a commit file). Restores take an abstract state whose leaves carry shardings over
the *current* mesh, so a checkpoint written on one mesh restores onto any other.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.metadata import array_metadata_store

from rlhf_jax.infra import paths

PyTree = Any

_JSON_ITEMS = ("data", "meta")
_CHECKPOINTS_SUBDIR = "checkpoints"
_COMMIT_FILE = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_absl(active: bool):
    logger = logging.getLogger("absl")
    old = logger.level
    if active:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


# orbax writes a replicated array "replica-parallel": each replica saves a slice, cut by one small
# compiled program per array shape and device. For slices under 1 MiB that costs more than it
# saves (about 70 ms of compile per shape and device on CPU, 64 programs for a tiny model on 8
# devices, paid again by every process that saves); larger arrays keep the parallel write.
_MIN_REPLICA_SLICE_BYTES = 1 << 20
with _quiet_absl(True):  # orbax warns that a handler overrides its default, on every start
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES,
            array_metadata_store=array_metadata_store.Store(),  # as orbax's default handler
        ),
        override=True,
    )


class Checkpointer:
    """Saves and restores a dict of named pytrees plus JSON data/meta items.

    Usable as a context manager; leaving the block waits for pending saves.

    Example:
        with Checkpointer(f"{workdir}/checkpoints") as ckpt:
            if ckpt.latest_step() is not None:
                state, data, meta = ckpt.restore(None, abstract_state)
            ...
            ckpt.save(step, {"params": params, "opt_state": opt_state}, data=it_state, meta=m)
    """

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        """Opens (and unless read-only, creates) a checkpoint directory.

        Args:
            directory: the checkpoints directory, normally `<workdir>/checkpoints`; local or any
                path orbax understands (gs://...).
            max_to_keep: how many most recent checkpoints survive a save.
            async_save: write in a background thread after the host copy; False blocks
                until the checkpoint is committed.
            read_only: never create, save or delete anything (for reading another stage's
                checkpoints).
        """
        # orbax refuses relative paths; library callers (tests, notebooks) may pass them.
        self.directory = epath.Path(paths.absolute(str(directory)))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            create=not read_only,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,  # orbax warns unless read-only says 0
            enable_async_checkpointing=async_save,
            # A tmp dir left by a killed save is garbage; orbax never loads it either way.
            cleanup_tmp_directories=not read_only,
        )
        with _quiet_absl(read_only):  # orbax warns "directory is read only" on every open
            self._mgr = ocp.CheckpointManager(self.directory, options=options)
        self._read_only = read_only
        self._closed = False

    def all_steps(self) -> list[int]:
        """Returns the committed checkpoint steps, ascending (a save in flight is not one)."""
        return [s for s in sorted(self._mgr.all_steps()) if self._is_committed(s)]

    def latest_step(self) -> int | None:
        """Returns the highest committed step, or None when there is no checkpoint."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step_dir(self, step: int) -> epath.Path:
        # Default orbax step naming: no prefix, no zero padding.
        return self.directory / str(step)

    def _is_committed(self, step: int) -> bool:
        # On a local disk orbax trusts the atomic rename alone and would list a step directory
        # that lacks its commit file (e.g. one half-copied by rsync). orbax writes the file into
        # every save before the rename, so requiring it is strictly safer.
        return (self._step_dir(step) / _COMMIT_FILE).exists()

    def save(
        self,
        step: int,
        state: Mapping[str, PyTree],
        *,
        data: dict | None = None,
        meta: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` (and `data`, `meta`) as checkpoint `step`, asynchronously by default.

        The save policy (every N steps) is the caller's: this always saves the given step.
        Once it returns, the arrays are on host and the caller may donate or overwrite them.

        Args:
            step: the training step the state belongs to.
            state: named pytrees of jax.Arrays, e.g. {"params": ..., "opt_state": ...}; each
                becomes its own orbax item.
            data: JSON-serializable data-iterator state; must survive a JSON round trip
                unchanged (no int dict keys, no tuples) so a resume sees the same position.
            meta: JSON-serializable run metadata (configs, seeds, controller values).
            force: replace an existing committed checkpoint of the same step. Without it such
                a step is left alone and False is returned (a resumed run re-saving the step it
                resumed from).

        Returns:
            True if a save was started, False if the step already existed and was kept.

        Raises:
            ValueError: a state name is reserved or not a plain string.
            TypeError: `data` or `meta` is not JSON-serializable (or `data` does not round-trip).
            FileExistsError: an uncommitted directory already holds this step.
        """
        self._check_writable()
        for name in state:
            if not isinstance(name, str) or not name or "/" in name or name in _JSON_ITEMS:
                raise ValueError(
                    f"state item name {name!r} is invalid: use a plain string other than "
                    f"{' and '.join(map(repr, _JSON_ITEMS))}"
                )
        _check_json("data", data, round_trip=True)
        _check_json("meta", meta, round_trip=False)

        if step in self._mgr.all_steps():
            if not self._is_committed(step):
                raise FileExistsError(
                    f"checkpoint directory {self._step_dir(step)} exists but was never "
                    "committed; delete it to save this step again"
                )
            if not force:
                log.info("checkpoint step %d already exists in %s; kept", step, self.directory)
                return False
            self._mgr.wait_until_finished()
            self._mgr.delete(step)

        args = {name: ocp.args.StandardSave(tree) for name, tree in state.items()}
        if data is not None:
            args["data"] = ocp.args.JsonSave(data)
        if meta is not None:
            args["meta"] = ocp.args.JsonSave(meta)
        # force: orbax's own save-interval policy must not veto a save the caller asked for.
        return bool(self._mgr.save(step, args=ocp.args.Composite(**args), force=True))

    def _check_writable(self):
        if self._closed or self._read_only:
            state = "closed" if self._closed else "read-only"
            raise RuntimeError(f"checkpointer for {self.directory} is {state}")

    def restore(
        self, step: int | None, abstract_state: Mapping[str, PyTree]
    ) -> tuple[dict[str, PyTree], dict | None, dict | None]:
        """Restores the named pytrees of `abstract_state` (plus data and meta) from a checkpoint.

        Stored structure, shapes and dtypes are checked against `abstract_state` first, so an
        incompatible checkpoint fails with one sentence naming the first offending key path.

        Args:
            step: the step to restore; None means the latest committed step.
            abstract_state: name -> pytree of `jax.ShapeDtypeStruct` (or jax.Array) whose
                `.sharding` is a sharding over the current mesh; the restored arrays get
                exactly these shardings. Only the named items are read.

        Returns:
            (state, data, meta): state has the same names and tree structures as
            `abstract_state`; data and meta are the saved JSON dicts, or None if not saved.

        Raises:
            FileNotFoundError: no checkpoint, or no such step.
            ValueError: the checkpoint does not match `abstract_state`.
        """
        self._mgr.wait_until_finished()  # a save still in flight would not be listed yet
        step = self._resolve_step(step)
        step_dir = self._step_dir(step)
        where = f"checkpoint {self.directory} step {step}"

        held = sorted(p.name for p in step_dir.iterdir() if p.is_dir())
        abstract_state = {name: _as_abstract(where, name, t) for name, t in abstract_state.items()}
        for name, tree in abstract_state.items():
            if name not in held:
                stored = [h for h in held if h not in _JSON_ITEMS]
                raise ValueError(
                    f"{where} has no item {name!r}; it holds {', '.join(map(repr, stored))}"
                )
            _check_compatible(where, name, self._item_metadata(step_dir / name), tree)

        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_state.items()}
        for name in _JSON_ITEMS:
            if name in held:
                args[name] = ocp.args.JsonRestore()
        if not args:
            return {}, None, None
        restored = self._mgr.restore(step, args=ocp.args.Composite(**args))

        state = {name: _rebuild_like(tree, restored[name]) for name, tree in abstract_state.items()}
        data = restored["data"] if "data" in held else None
        meta = restored["meta"] if "meta" in held else None
        return state, data, meta

    def read_meta(self, step: int | None = None) -> dict | None:
        """Returns the `meta` dict of a checkpoint (None if it was saved without one).

        Args:
            step: the step; None means the latest committed step.
        """
        step = self._resolve_step(step)
        if not (self._step_dir(step) / "meta").exists():
            return None
        return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint found in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"checkpoint {self.directory} has no committed step {step}; it holds steps {steps}"
            )
        return step

    @staticmethod
    def _item_metadata(item_dir: epath.Path) -> PyTree:
        # Read through a bare handler: the manager only knows handlers for items it has already
        # saved or restored in this process.
        handler = ocp.StandardCheckpointHandler()
        try:
            return handler.metadata(item_dir).tree
        finally:
            handler.close()

    def wait(self):
        """Blocks until every pending asynchronous save is committed."""
        self._mgr.wait_until_finished()

    def close(self):
        """Waits for pending saves and releases orbax's threads. Idempotent."""
        if not self._closed:
            self._mgr.close()
            self._closed = True

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc):
        self.close()


def _resolve_dir(workdir_or_dir: str) -> str:
    """Returns `<workdir>/checkpoints` when present, else the path itself if it is a directory."""
    path = epath.Path(workdir_or_dir)
    if (path / _CHECKPOINTS_SUBDIR).is_dir():
        return str(path / _CHECKPOINTS_SUBDIR)
    if path.is_dir():
        return str(path)
    raise FileNotFoundError(f"no checkpoint found: {workdir_or_dir} does not exist")


def restore_params(
    workdir_or_dir: str,
    abstract_params: PyTree,
    *,
    item: str = "params",
    step: int | None = None,
) -> PyTree:
    """Restores one named pytree (normally the params) of another run: the stage hand-off.

    Args:
        workdir_or_dir: the previous stage's workdir, or its checkpoints directory.
        abstract_params: pytree of `jax.ShapeDtypeStruct` with shardings over the current mesh.
        item: which saved item to read ("params"; PPO may read others).
        step: which step; None means the latest.

    Returns:
        The restored pytree, structured like `abstract_params` and sharded as it asks.

    Raises:
        FileNotFoundError: no checkpoint at that path (the message names the path).
        ValueError: the stored item does not match `abstract_params`.
    """
    with Checkpointer(_resolve_dir(workdir_or_dir), read_only=True) as ckpt:
        state, _, _ = ckpt.restore(step, {item: abstract_params})
    return state[item]


def read_meta(workdir_or_dir: str, step: int | None = None) -> dict | None:
    """Returns the `meta` dict saved with a checkpoint of another run.

    The hand-off caller uses it to check that the stored model config matches its own.

    Args:
        workdir_or_dir: a stage workdir or its checkpoints directory.
        step: which step; None means the latest.

    Returns:
        The meta dict, or None if that checkpoint has none.

    Raises:
        FileNotFoundError: no checkpoint at that path.
    """
    # A plain file read, not a CheckpointManager: opening a manager is a collective on several
    # processes, and hand-off checks run where processes may take different paths (a stage
    # asking whether another's checkpoint exists yet). orbax's JsonSave writes `meta/metadata`.
    directory = epath.Path(_resolve_dir(workdir_or_dir))
    steps = committed_steps(workdir_or_dir)
    if step is None:
        if not steps:
            raise FileNotFoundError(f"no checkpoint found in {directory}")
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(
            f"checkpoint {directory} has no committed step {step}; it holds steps {steps}"
        )
    meta_dir = directory / str(step) / "meta"
    if not meta_dir.exists():
        return None
    if (meta_dir / "metadata").exists():
        return json.loads((meta_dir / "metadata").read_text())
    with Checkpointer(str(directory), read_only=True) as ckpt:  # another orbax file layout
        return ckpt.read_meta(step)


def committed_steps(workdir_or_dir: str) -> list[int]:
    """The committed checkpoint steps of a stage workdir (or its checkpoints directory), sorted:
    a file listing, no CheckpointManager (no collective), as `read_meta`."""
    directory = epath.Path(_resolve_dir(workdir_or_dir))
    return sorted(
        int(p.name) for p in directory.iterdir() if p.name.isdigit() and (p / _COMMIT_FILE).exists()
    )


def _key_str(key) -> str:
    # Normalises key kinds so an int dict key on the model side matches the string orbax
    # stores, and a namedtuple field / tuple index matches the dict / list orbax stores.
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _flat(tree: PyTree) -> dict[str, Any]:
    """Maps 'a/b/0/c' key paths to leaves."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_str(k) for k in path): leaf for path, leaf in leaves}


def _as_abstract(where: str, name: str, tree: PyTree) -> PyTree:
    """Turns concrete arrays into ShapeDtypeStructs and insists on a sharding per leaf."""

    def convert(path, leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            key = "/".join([name] + [_key_str(k) for k in path])
            raise ValueError(
                f"{where}: abstract leaf {key!r} has no sharding; give every leaf a sharding "
                "over the current mesh"
            )
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(convert, tree)


def _check_compatible(where: str, name: str, stored: PyTree, abstract: PyTree):
    """Raises one ValueError sentence for the first structural, shape or dtype mismatch."""
    have, want = _flat(stored), _flat(abstract)
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    if missing or extra:
        parts = []
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            parts.append(f"lacks '{name}/{missing[0]}'{more} that the model expects")
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            parts.append(f"holds '{name}/{extra[0]}'{more} that the model does not expect")
        raise ValueError(f"{where} {' and '.join(parts)}")
    for key, spec in want.items():
        meta = have[key]
        shape = tuple(getattr(meta, "shape", ()) or ())
        if shape != tuple(spec.shape):
            raise ValueError(
                f"{where}: '{name}/{key}' has shape {shape} but the model expects "
                f"{tuple(spec.shape)}"
            )
        dtype = getattr(meta, "dtype", None)
        if dtype is not None and np.dtype(dtype) != np.dtype(spec.dtype):
            raise ValueError(
                f"{where}: '{name}/{key}' has dtype {np.dtype(dtype)} but the model expects "
                f"{np.dtype(spec.dtype)}"
            )


def _rebuild_like(abstract: PyTree, restored: PyTree) -> PyTree:
    """Returns `restored`'s leaves in `abstract`'s exact tree structure.

    orbax 0.12 already rebuilds the target structure; matching by key path keeps the int-key
    and namedtuple promise even if a version hands back string keys or lists.
    """
    treedef = jax.tree.structure(abstract)
    if jax.tree.structure(restored) == treedef:
        return restored
    by_path = _flat(restored)
    return jax.tree.unflatten(treedef, [by_path[k] for k in _flat(abstract)])


def _check_json(name: str, value: Any, *, round_trip: bool):
    # Checked here, synchronously: in an async save a bad value would only fail later, in
    # orbax's background thread.
    if value is None:
        return
    try:
        text = json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint {name} is not JSON-serializable: {e}") from None
    if round_trip and json.loads(text) != value:
        raise TypeError(
            f"checkpoint {name} changes in a JSON round trip (int dict keys or tuples?); "
            "store strings and lists so a resume sees the same value"
        )
