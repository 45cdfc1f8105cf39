"""Exceptions that the CLI turns into one-line messages and exit codes.

Library code raises these; only the CLI decides how they look and which exit code they get.
"""

from __future__ import annotations


def shown(text: object) -> str:
    """``text`` safe to print inside one line: control characters (a newline, an escape sequence in a
    file name) are written as Python escapes, never sent to the terminal raw."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))


class PrunecompError(Exception):
    """Base class: a problem the user can act on, reported as one line."""

    exit_code = 2


class KeyedError(PrunecompError):
    """A problem in a file of keys (a recipe, a manifest): names the file and the key path.

    ``file`` is where the value came from: the recipe file, a ``--set`` option, the manifest."""

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None):
        self.message = message
        self.key = key
        self.file = file
        # what came from the input (a file name, a YAML key) may hold control characters: escaped
        where = ", ".join(shown(part) for part in (file, key) if part)
        super().__init__(f"{where}: {shown(message)}" if where else shown(message))

    def located(self, file: str, key: str | None = None) -> KeyedError:
        """The same problem, naming ``file`` (and ``key``, when the key path is another there)."""
        return type(self)(self.message, key=key if key is not None else self.key, file=file)


class RecipeError(KeyedError):
    """The recipe (or a flag that overrides it) is invalid. Names the key path and the file."""


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


class OutputFileError(KeyedError, NotAnOutput):
    """A file of an existing output (its ``prunecomp_manifest.json``, ``results.json``) cannot be read as
    what this tool writes there: names the file and the key path."""
