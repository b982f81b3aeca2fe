"""Errors a user can fix. The ``lightning`` command prints their message as one
paragraph (what was expected, how to fix it) and exits with status 2, no traceback;
set ``MSFLOWS_TRACEBACK=1`` to see where they were raised."""
from __future__ import annotations


class UsageError(Exception):
    """Base of the errors the CLI reports without a traceback."""


class ConfigurationError(UsageError, ValueError):
    """A configuration value that cannot work (caught before the first step)."""


class CheckpointError(UsageError, ValueError):
    """A checkpoint that cannot be read, or belongs to another model."""


class RunLockedError(UsageError, RuntimeError):
    """Another live run owns the folder."""


class TrainingDivergedError(UsageError, RuntimeError):
    """Too many consecutive optimizer steps were skipped for non-finite values."""


class StorageError(UsageError, OSError):
    """A folder the run cannot write to: read-only, full, or not permitted. An OSError
    too, so code that handles disk faults (``errno``) still sees one."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_  # OSError(message) alone would leave errno None
