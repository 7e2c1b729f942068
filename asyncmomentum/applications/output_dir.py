"""Output folders: created and checked before any work, with a message that says what is wrong."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

__all__ = ["check_writable_dir", "why_unwritable"]


def why_unwritable(path: Path, error: OSError) -> str:
    """What keeps ``path`` from being a folder this process can write in, in plain words.

    Args:
        path: the folder asked for.
        error: what creating it, or a file in it, raised.
    """
    if path.exists() and not path.is_dir():
        return f"{str(path)!r} exists and is not a folder"
    base = path
    while not base.exists() and base != base.parent:
        base = base.parent
    reason = error.strerror or str(error)
    if not base.is_dir():
        return f"{str(base)!r} is a file, so no folder can be created under it"
    if base != path:  # the folder (or one above it) could not be created in base
        if error.errno == errno.EACCES:
            return f"no permission to create a folder in {str(base)!r}"
        if error.errno == errno.EROFS:
            return f"{str(base)!r} is on a read-only file system"
        return (
            f"a folder cannot be created in {str(base)!r} ({reason}: it is not an ordinary, "
            "writable folder, e.g. /proc or /sys)"
        )
    if error.errno == errno.EACCES or not os.access(path, os.W_OK):
        return f"no permission to write in {str(path)!r}"
    if error.errno == errno.EROFS:
        return f"{str(path)!r} is on a read-only file system"
    return f"cannot write in {str(path)!r} ({reason})"


def check_writable_dir(out: str | os.PathLike[str]) -> Path:
    """Create ``out`` if needed and check that a file can be created in it.

    Args:
        out: the folder.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        OSError: with :func:`why_unwritable`'s explanation as its message.
    """
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise OSError(error.errno, why_unwritable(path, error)) from error
    return path
