"""Paths as users type them: every path a config names is made absolute once, at the entry.

Users write `--workdir runs/pipeline --config.init_from=runs/sft_tiny`; orbax refuses relative
paths and stages hand paths to one another (and to subprocesses), so `launch.run` resolves every
path-valued key against the current directory before anything reads it. Which keys hold paths is
listed here, in one place. A value may be comma-separated (data files and globs), carry the
`hf:` prefix (a Hugging Face directory) or name a remote store (`gs://...`), which stays as is.
"""

from __future__ import annotations

import os

# Config keys (at any depth) whose string values are paths, or comma-separated lists of them.
PATH_KEYS = frozenset(
    {"init_from", "reward_from", "reference_from", "reuse", "train", "eval", "ptx", "norm_data"}
)
# Keys that are paths only under the named parent (`tokenizer.path`).
PARENT_PATH_KEYS = frozenset({("tokenizer", "path")})
HF_PREFIX = "hf:"


def absolute(path: str) -> str:
    """One path (or glob) made absolute; "", remote URLs and `hf:` prefixes are kept."""
    path = path.strip()
    if not path or "://" in path:
        return path
    if path.startswith(HF_PREFIX):
        return HF_PREFIX + absolute(path[len(HF_PREFIX) :])
    return os.path.abspath(os.path.expanduser(path))


def absolute_list(value: str) -> str:
    """A comma-separated list of paths, each made absolute."""
    if not value.strip():
        return value
    return ",".join(absolute(p) for p in value.split(","))


def resolve_config(config, parent: str = "") -> None:
    """Rewrites, in place, every path-valued string in a ConfigDict tree to an absolute path."""
    for key in list(config.keys()):
        value = config[key]
        if hasattr(value, "keys"):  # a nested ConfigDict (or dict)
            resolve_config(value, key)
        elif isinstance(value, str) and (key in PATH_KEYS or (parent, key) in PARENT_PATH_KEYS):
            config[key] = absolute_list(value)


# Keys naming another run's workdir (or `hf:DIR`): checked to exist before anything starts.
SOURCE_KEYS = frozenset({"init_from", "reward_from", "reference_from", "reuse"})


def check_sources(config, prefix: str = "config.") -> None:
    """Fails with one line naming the key when a source workdir does not exist."""
    for key in list(config.keys()):
        value = config[key]
        if hasattr(value, "keys"):
            check_sources(value, f"{prefix}{key}.")
        elif key in SOURCE_KEYS and isinstance(value, str) and value and "://" not in value:
            path = value[len(HF_PREFIX) :] if value.startswith(HF_PREFIX) else value
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{prefix}{key}={value!r} does not exist")
