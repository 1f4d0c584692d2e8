"""Where comoe_peft keeps what it fetches or converts at run time (model checkpoints, task files)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "COMOE_PEFT_CACHE"


def default_cache_dir() -> Path:
    """Return the cache folder: ``$COMOE_PEFT_CACHE``, else ``$XDG_CACHE_HOME/comoe_peft``, else ``~/.cache/comoe_peft``.

    The folder is not created here; callers create the sub-folder they write to.
    """
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comoe_peft"
