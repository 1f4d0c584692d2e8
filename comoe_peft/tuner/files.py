"""Atomic file writes with ordinary permissions: what a user saved is never half-written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_permissions(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file made by `tempfile` (0600) or a folder made by `mkdtemp` (0700) the usual umask permissions."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as handle:
        handle.write(text)
        temporary = handle.name
    default_permissions(temporary)
    os.replace(temporary, path)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically (see `write_text_atomic`)."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))
