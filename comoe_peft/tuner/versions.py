"""The oldest versions this package is tested with, and the one-line error for an older one.

Tested ranges (pyproject.toml, docs/installation.md "Supported versions"): peft 0.18.1 to 0.21.x with the transformers they allow
from 5.6; trl 1.9 to 1.16.x for `CoMoESFTTrainer`. The plain `transformers.Trainer` path needs no trl.
"""

from __future__ import annotations

from importlib import metadata

from packaging.version import Version

MIN_PEFT = "0.18.1"
MIN_TRL = "1.9"


class TooOldError(ImportError):
    """A dependency is missing or older than this package's tested minimum; the message is one line saying which."""


def installed_version(package: str) -> str | None:
    """The installed distribution's version, or None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def require(package: str, minimum: str, needed_by: str, installed: str | None, alternative: str = "") -> None:
    """Raise `TooOldError` (an `ImportError`), one line saying what `needed_by` needs, when `installed` (None: not
    installed) is below `minimum`.

    Pre-releases of the minimum count as the minimum (1.9.0.dev0 passes for 1.9).
    """
    if installed is not None and Version(installed).release >= Version(minimum).release:
        return
    found = "it is not installed" if installed is None else f"found {package} {installed}"
    hint = f" ({alternative})" if alternative else ""
    raise TooOldError(f"{needed_by} needs {package}>={minimum}, {found}: pip install '{package}>={minimum}'{hint}.")
