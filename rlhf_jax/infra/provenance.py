"""What a run was made from: the code version and a hash of its resolved config.

Every run stores both in `WORKDIR/config.json` (written by `launch.run`), and a multi-process run
checks at start-up that every process agrees on them, so two workers started from different
checkouts or with different overrides fail at once instead of training inconsistent replicas.

The code version is the git commit (with `-dirty` when tracked files differ) when the package
sits in a git checkout, plus a hash of the package's own source files, which identifies the code
even in an installed copy or a checkout copied to a TPU VM without its `.git`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

# The checkout root: this file is rlhf_jax/infra/provenance.py, so three levels up. (Two levels,
# as before the move to infra/, walked rlhf_jax/rlhf_jax and hashed nothing.)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SOURCE_DIRS = ("rlhf_jax", "launch", "experiments")


def source_hash(root: str = _ROOT) -> str:
    """sha256 (first 16 hex digits) over the .py files of the package, launch/ and experiments/.

    Args:
      root: the directory holding `rlhf_jax/` (and `launch/`, `experiments/` in a checkout; an
        installed package has neither, and they are skipped).

    Returns:
      The hex digest prefix. Files are visited in sorted order and their paths relative to `root`
      are hashed with their bytes, so a renamed or moved file changes the hash too.

    Raises:
      FileNotFoundError: when `root` holds no `rlhf_jax/` package: an empty walk would hash to the
        same constant for every checkout, which is what this hash exists to prevent.
    """
    package = os.path.join(root, "rlhf_jax", "__init__.py")
    if not os.path.isfile(package):
        raise FileNotFoundError(f"source_hash: {root!r} holds no rlhf_jax/__init__.py")
    h = hashlib.sha256()
    for sub in _SOURCE_DIRS:
        base = os.path.join(root, sub)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, root).encode() + b"\0")
                    with open(path, "rb") as f:
                        h.update(f.read() + b"\0")
    return h.hexdigest()[:16]


def git_commit() -> str | None:
    """The checkout's commit, `<sha>-dirty` if tracked files changed; None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def code_version() -> dict:
    """{"git": commit or None, "source_hash": hash of the sources}."""
    return {"git": git_commit(), "source_hash": source_hash()}


def config_hash(config_dict: dict) -> str:
    """sha256 (first 16 hex digits) of the resolved config as canonical JSON."""
    text = json.dumps(config_dict, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
