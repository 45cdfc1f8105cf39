"""Exceptions that the CLI turns into one-line messages and exit codes.

Library code raises these; only the CLI decides how they look and which exit code they get.
"""

from __future__ import annotations


class PrunecompError(Exception):
    """Base class: a problem the user can act on, reported as one line."""

    exit_code = 2


class RecipeError(PrunecompError):
    """The recipe (or a flag that overrides it) is invalid. Names the key path and the file."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None):
        self.key = key
        self.file = file
        where = ", ".join(part for part in (f"{file}" if file else "", f"{key}" if key else "") if part)
        super().__init__(f"{where}: {message}" if where else message)


class ModelError(PrunecompError):
    """The model cannot be loaded or is not supported (architecture, layer count, files)."""


class TargetUnavailable(PrunecompError):
    """A deployment target's runtime or hardware is missing on this machine."""


class ValidationFailed(PrunecompError):
    """A produced artifact does not compute what the pruned model computes (parity check failed)."""

    exit_code = 1


class StageFailed(PrunecompError):
    """A stage could not finish for a reason that is not the input: a crash, a timeout, a signal in a
    child process. The message names the log that holds the details."""

    exit_code = 3


class NotAnOutput(PrunecompError):
    """A path given to a stage command (verify, export, serve, bench) is not an output of this tool."""
