"""Atomic file writes: readers see the old file or the new one, never a part.

Used by run directories, the feature cache, pair exports and reports alike, so it lives below all of them.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import WriteError

__all__ = ["atomic_write_bytes", "atomic_write_json"]


def _write_error(message: str, cause: OSError) -> WriteError:
    e = WriteError(message)
    e.errno = cause.errno  # keep what callers that handle OSError test for (e.g. ENOSPC)
    return e


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename: readers see the old or the new file, never a part.

    Raises:
        WriteError: (an ``OSError`` too) the directory or file cannot be written, e.g. the disk is full;
            the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _write_error(f"{path}: cannot write ({err.strerror or err})", err) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a run directory should be readable like any file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            # one line for the CLI, naming the file the user cares about rather than the temporary one
            raise _write_error(
                f"{path}: cannot write ({err.strerror or err}); its previous version, if any, is unchanged", err
            ) from None
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
