"""How every command-line entry reports bad input: one `error: ...` line and exit code 2.

Bad input (a missing file, a malformed line, an unknown key, a non-finite loss) is the user's to
fix, so a traceback from deep inside jit would only hide the one sentence that matters. Set
RLHF_JAX_TRACEBACK=1 to get the traceback instead.
"""

from __future__ import annotations

import os
import sys

USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def run_or_exit(fn, *args, **kwargs):
    """Returns `fn(*args, **kwargs)`; a user error ends the process with one line, exit 2."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        if os.environ.get("RLHF_JAX_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
