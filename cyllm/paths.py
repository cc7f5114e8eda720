"""Ids that become paths, and paths that must stay under a root.

Every id a caller can choose (a job id, a file id) may end up as a path component, and
a checkpoint to resume from is a path; ``checked_id`` admits only a plain name (no separator, no leading
dot), and ``inside`` resolves a path (symlinks included) and refuses it unless it is
under its root.  Both raise ``InvalidRequest`` naming the field, never the path.
"""

from __future__ import annotations

import re
from pathlib import Path

from cyllm import errors

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A tenant's name for a model (``support-bot``): an id, shorter.
ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ALIAS_RULE = "an alias is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_id(value: str) -> bool:
    return bool(_ID.fullmatch(value or ""))


def checked_id(value: str, what: str, param: str | None = None) -> str:
    if not is_id(value):
        raise errors.InvalidRequest(
            f"{what} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            param=param,
        )
    return value


def inside(root: Path, path: str | Path, what: str, param: str | None = None) -> Path:
    """``path`` resolved, if it lies under ``root`` (also resolved)."""
    base = Path(root).resolve()
    resolved = (base / path).resolve()
    if resolved != base and base not in resolved.parents:
        raise errors.InvalidRequest(f"{what} is outside the folder it must be in", param=param)
    return resolved
