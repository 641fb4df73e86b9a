"""One exception family for everything a user can cause.

The CLI prints ``str(err)`` as a single line on stderr and exits non-zero
without a traceback; ``--debug`` re-raises instead.
"""

from __future__ import annotations


class IterWeGOError(Exception):
    """Base class: a problem with the user's input, files or environment."""


class DataError(IterWeGOError):
    """A data file (JSON, JSONL, TSV, image) is missing, malformed or inconsistent.

    The message always names the file and, where one applies, the story or line.
    """

    def __init__(self, message: str, *, path: str | None = None, story: str | None = None, line: int | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if story is not None:
            where.append(f"story {story}")
        prefix = ": ".join([", ".join(where)]) + ": " if where else ""
        super().__init__(prefix + message)
        self.path, self.story, self.line = path, story, line


class ImageError(DataError):
    """An image that cannot be found, read or decoded."""


class ModelLoadError(IterWeGOError):
    """Weights, configs or run directories that are missing, corrupt or incompatible."""


class DecodeError(IterWeGOError):
    """A decoder asked to do something it does not support (e.g. n above its limit)."""


class WriteError(IterWeGOError, OSError):
    """A file could not be written (disk full, permission denied, read-only file system).

    Also an ``OSError`` (``errno`` is kept), so callers that handle I/O errors still catch it;
    the file's previous version, if any, is left as it was.
    """


class ConfigError(IterWeGOError, ValueError):
    """A config override (``--set section.key=value``) names no field or gives a value of the wrong type."""


class HubError(IterWeGOError):
    """The Hugging Face Hub refused or could not take a request (no login, no permission, offline)."""
