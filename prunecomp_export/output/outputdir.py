"""The output directory: checked before anything is computed, locked against a second run, written
in a staging sibling and swapped in atomically, so a failed, killed or interrupted run never leaves a
half-written or missing output.

Use, in this order::

    check_output_dir(out, overwrite=..., protected=[model_source])  # --dry-run too
    with OutputLock(out), staged_output(out, overwrite=...) as stage:
        ...  # write everything under stage

Names next to ``<parent>/<name>``: ``.<name>.lock`` (the lock, holding the pid of its run) and
``.<name>.tmp-<pid>-<hex>`` (a staging directory, or the replaced output while it is deleted).
This module imports nothing heavy: a process that only holds a lock starts fast.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from prunecomp_export.errors import RecipeError

if TYPE_CHECKING:
    from prunecomp_export.recipe import Recipe

MANIFEST = "prunecomp_manifest.json"
#: OSErrors that mean "the output cannot be written": reported in one line, not a traceback
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES})
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _refuse(message: str) -> NoReturn:
    raise RecipeError(message, key="output.dir")


def check_output_dir(out: Path, *, overwrite: bool, protected: Sequence[Path] = ()) -> None:
    """Raise ``RecipeError(key="output.dir")`` unless ``out`` can be (re)placed safely: it must not be
    or contain the working directory or a ``protected`` path (the model source), nor lie inside one;
    it must not be a file; an existing ``out`` needs ``overwrite`` and must be empty or an earlier
    output of this tool (holds ``prunecomp_manifest.json``); its nearest existing ancestor must be a
    writable directory. Writes nothing."""
    final = Path(out).resolve()
    cwd = Path.cwd().resolve()
    if final == cwd or final in cwd.parents:
        _refuse(f"{final} is or contains the current directory")
    for item in protected:
        source = Path(item).resolve()
        if final == source or final in source.parents:
            _refuse(f"{final} is or contains the model source {source}")
        if source in final.parents:
            _refuse(f"{final} is inside the model source {source}")
    if os.path.lexists(final):
        if not final.is_dir():
            _refuse(f"{final} exists and is not a directory")
        try:
            empty = next(final.iterdir(), None) is None
        except OSError as exc:
            _refuse(f"cannot read {final}: {exc.strerror}")
        if not empty and not (final / MANIFEST).is_file():
            _refuse(
                f"{final} is not empty and holds no {MANIFEST} (not an output of prunecomp-export): not replacing it"
            )
        if not overwrite:
            _refuse(f"{final} exists (set output.overwrite: true to replace it)")
    ancestor = final.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        _refuse(f"cannot create {final}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        _refuse(f"cannot create {final}: {ancestor} is not writable")


def recipe_output(recipe: Recipe, *, require_weights: bool = True) -> Path:
    """The output directory a recipe asks for, checked by ``check_output_dir`` against the working
    directory and the model source (located without reading it): the cheap checks a run makes before
    it takes the output's lock, so that a refused ``output.dir`` never gets a lock file, and again
    under the lock. ``require_weights=False``: the source may be a config.json alone (a dry run that
    plans for another machine)."""
    from prunecomp_export.source.loading import resolve_source

    source = resolve_source(recipe.model, require_weights=require_weights)
    protected = [Path(source.location), *source.files] if source.local else []
    output = Path(recipe.output.dir)
    check_output_dir(output, overwrite=recipe.output.overwrite, protected=protected)
    return output


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``<parent>/.<name>.lock``: a second run on the same
    output fails at once, naming the first run's pid. The kernel drops the lock when its process
    dies, so a killed run leaves at most a stale file that the next run reuses. Released (and the
    file removed) on exit, with the parent directories it had to create when they are still empty.
    The lock path is never followed when it is a symbolic link (a planted link, dangling or not,
    would make the tool create or truncate a file outside the output): that is refused. The object that
    holds the lock may enter it again (the CLI takes it before handing it to ``pipeline.run``); any
    other ``OutputLock``, in this process or another, is refused."""

    def __init__(self, out: Path):
        self.out = Path(out).resolve()
        self.path = self.out.parent / f".{self.out.name}.lock"
        self._fd: int | None = None
        self._created: list[Path] = []
        self._entered = 0

    def __enter__(self) -> OutputLock:
        if self._fd is not None:
            self._entered += 1
            return self
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not os.path.lexists(p)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first
        try:
            self._take()
        except BaseException:
            self._remove_created()
            raise
        return self

    def _take(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    _refuse(f"{self.path} is a symbolic link: not following it (remove it if no run uses {self.out})")
                if exc.errno == errno.EISDIR:
                    _refuse(f"{self.path} is a directory, not a lock file: remove it")
                raise
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    _refuse(f"{self.path} is not a regular file, not a lock file: remove it")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # the previous holder may have removed the file between our open and flock: then we
                # hold a lock on a file nobody else sees, so take the new file's instead
                current = os.lstat(self.path)
                if (current.st_dev, current.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                    break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                pid = f" (pid {holder})" if holder.isdigit() else ""
                _refuse(f"{self.out} is being written by another run{pid}: wait for it, or choose another output.dir")
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # before unlocking: a waiter that opened this file retries on the new one
        os.close(self._fd)
        self._fd = None

    def _remove_created(self) -> None:
        for directory in self._created:  # deepest first; one that holds something stays
            with contextlib.suppress(OSError):
                directory.rmdir()
        self._created = []

    def __exit__(self, *exc_info: object) -> None:
        if self._entered:
            self._entered -= 1
            return
        self._release()
        self._remove_created()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not one of ours: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(final: Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-*`` siblings of ``final`` whose process is gone (a killed run's
    staging, or an output it was deleting after the swap). Meant to run under ``OutputLock``: then
    no live run can own one; the pid check guards against runs that took no lock."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.tmp-(\d+)-[0-9a-f]+")
    removed = []
    for sibling in final.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and not _alive(int(match[1])):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not glibc/musl on Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``). False, with nothing
    changed, where libc, the kernel or the file system cannot; other failures raise ``OSError``."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _install(staging: Path, final: Path, *, overwrite: bool) -> None:
    """Put ``staging`` at ``final``. An existing ``final`` is exchanged with ``staging`` in one step, so
    something complete is at ``final`` at every moment, then deleted from the staging path."""
    if not os.path.lexists(final) or not overwrite:
        os.rename(staging, final)  # fails if a non-empty final appeared meanwhile: never replaced unasked
        return
    if exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # the old output; a killed run leaves it stale
        return
    # No renameat2 (not Linux, old kernel, a file system without RENAME_EXCHANGE): move the old output
    # aside, then the new one in. Between these two renames nothing is at `final`; a run killed there
    # leaves the old output at `.<name>.old-<pid>-<hex>` (not removed automatically).
    aside = final.parent / f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(final, aside)
    try:
        os.rename(staging, final)
    except BaseException:
        os.rename(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_output(final: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh staging directory next to ``final`` (``.<name>.tmp-<pid>-<hex>``), after removing
    dead runs' stale ones. If the block raises anything (Ctrl-C and, under ``child.interrupting_signals``, SIGTERM
    included) the staging directory is removed and ``final`` is untouched; if it succeeds, the staging
    directory becomes ``final`` atomically (see ``_install``)."""
    final = Path(final).resolve()
    if os.path.lexists(final) and not overwrite:
        _refuse(f"{final} exists (set output.overwrite: true to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    staging = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        _install(staging, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _link_or_copy(source: str, target: str) -> None:
    """A hard link (no copy of a multi-GB shard), or a copy where the file system has none."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@contextlib.contextmanager
def staged_update(final: Path, *, linked: Sequence[str] = ("checkpoint", "targets")) -> Iterator[Path]:
    """Change an existing output as atomically as a run writes one: yield a staging copy of it,
    swapped in (``staged_output``) when the block succeeds, removed when it fails. The ``linked``
    directories (the checkpoint and the targets: GBs that a change reads, or replaces whole, never
    rewrites in place) are hard-linked where the file system allows; the rest is copied, so a file
    rewritten in the staging copy never changes the output in place. Hold ``OutputLock(final)``
    around it."""
    final = Path(final).resolve()
    with staged_output(final, overwrite=True) as stage:
        for item in final.iterdir():
            if item.is_dir() and not item.is_symlink():
                copy = _link_or_copy if item.name in linked else shutil.copy2
                shutil.copytree(item, stage / item.name, symlinks=True, copy_function=copy)
            else:
                shutil.copy2(item, stage / item.name, follow_symlinks=False)
        yield stage


def is_output_path(path: str | os.PathLike[str], out: Path) -> bool:
    """Whether ``path`` is ``out``, inside it, or one of its siblings of this module (staging, lock)."""
    final, path = Path(out).resolve(), Path(path).resolve()
    for part in (path, *path.parents):
        if part == final or (part.parent == final.parent and part.name.startswith(f".{final.name}.")):
            return True
    return False


_SAFETENSORS_OS_ERROR = re.compile(r'(?P<reason>[^:]+) \(os error (?P<code>\d+)\)(?: at path "(?P<path>[^"]*)")?')


def os_error_of_safetensors(exc: Exception, path: Path) -> OSError | None:
    """The OSError inside a safetensors ``SafetensorError`` (its Rust writer reports a full disk as
    text: ``Error while serializing: I/O error: No space left on device (os error 28) at path ...``),
    or None when it reports no OS error. A full disk names no file, like Python's own writes (the
    file is a temporary one; the output is what cannot be written); other errors name the file the
    text names, else ``path``."""
    match = _SAFETENSORS_OS_ERROR.search(str(exc))
    if match is None:
        return None
    code = int(match["code"])
    if code in DISK_FULL_ERRNOS:
        return OSError(code, os.strerror(code))
    return OSError(code, os.strerror(code), match["path"] or str(path))


@contextlib.contextmanager
def safetensors_write_errors(path: Path) -> Iterator[None]:
    """Writes by safetensors inside the block fail as the ``OSError`` they are, so a full disk ends as
    the same one line (``write_error_message``) as any other write to the output, not a traceback."""
    try:
        yield
    except Exception as exc:
        from safetensors import SafetensorError

        if not isinstance(exc, SafetensorError) or (error := os_error_of_safetensors(exc, path)) is None:
            raise
        raise error from exc


def write_error_message(exc: OSError, out: Path | None) -> str:
    """One line for an OSError in ``WRITE_ERRNOS``: ``cannot write <path>: <strerror>`` when it
    concerns the output (or names no file: a full disk while writing), else ``<path>: <strerror>``."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return f"cannot write {out if out is not None else 'the output'}: {reason}"
    if out is None or is_output_path(exc.filename, out):
        return f"cannot write {exc.filename}: {reason}"
    return f"{exc.filename}: {reason}"
