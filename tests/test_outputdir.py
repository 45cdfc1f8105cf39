"""The output directory: refused when unsafe, locked against a second run, staged and swapped in
atomically; faults (exceptions, failing renames, SIGTERM, killed processes) leave the old output."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from prunecomp_export.child import interrupting_signals
from prunecomp_export.errors import RecipeError
from prunecomp_export.output import outputdir
from prunecomp_export.output.outputdir import (
    MANIFEST,
    OutputLock,
    check_output_dir,
    exchange,
    staged_output,
    write_error_message,
)

ROOT = Path(__file__).resolve().parents[1]


def previous_output(path: Path, marker: str = "old") -> Path:
    """A directory that looks like an earlier output of this tool."""
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"marker": marker}))
    (path / "marker").write_text(marker)
    return path


def leftovers(final: Path) -> list[str]:
    """Siblings of ``final`` that this module made (staging, aside, lock)."""
    return sorted(p.name for p in final.parent.iterdir() if p.name.startswith(f".{final.name}."))


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def spawn(script: str, *args: str) -> subprocess.Popen:
    """A Python child running ``script``; waits for its first line of output (its 'ready')."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    child.ready = child.stdout.readline().strip()
    assert child.ready, "the child died before it was ready"
    return child


# --- check_output_dir ----------------------------------------------------------------------------------


def _setup(kind: str, tmp: Path) -> tuple[Path, list[Path]]:
    """(out, protected) for one row; the working directory is tmp/work, the model tmp/model."""
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp / "outputs" / "run"
    if kind == "ours":
        previous_output(out)
    elif kind == "empty":
        out.mkdir(parents=True)
    elif kind == "foreign":
        out.mkdir(parents=True)
        (out / "thesis.tex").write_text("years of work")
    elif kind == "file":
        out.parent.mkdir()
        out.write_text("x")
    elif kind == "parent-file":
        (tmp / "outputs").write_text("x")
    elif kind == "cwd":
        out = tmp / "work"
    elif kind == "cwd-ancestor":
        out = tmp
    elif kind == "model":
        out = model
    elif kind == "model-ancestor":
        out = tmp
    elif kind == "in-model":
        out = model / "pruned"
    elif kind == "symlink-to-model":
        (tmp / "link").symlink_to(model)
        out = tmp / "link"
    return out, [model]


CHECKS = [
    # (row, overwrite, expected fragment of the message; None: accepted)
    ("new", False, None),
    ("ours", True, None),
    ("empty", True, None),
    ("ours", False, "exists (set output.overwrite: true to replace it)"),
    ("empty", False, "exists (set output.overwrite: true"),
    ("foreign", True, "is not empty and holds no prunecomp_manifest.json"),
    ("foreign", False, "not an output of prunecomp-export"),
    ("file", True, "exists and is not a directory"),
    ("parent-file", False, "outputs is not a directory"),
    ("cwd", True, "is or contains the current directory"),
    ("cwd-ancestor", True, "is or contains the current directory"),
    ("model", True, "is or contains the model source"),
    ("in-model", True, "is inside the model source"),
    ("symlink-to-model", True, "is or contains the model source"),
]


@pytest.mark.parametrize(("kind", "overwrite", "expected"), CHECKS)
def test_check_output_dir(tmp_path, monkeypatch, kind, overwrite, expected):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    out, protected = _setup(kind, tmp_path)
    before = sorted(tmp_path.rglob("*"))
    if expected is None:
        check_output_dir(out, overwrite=overwrite, protected=protected)
    else:
        with pytest.raises(RecipeError, match=r"^output\.dir: ") as caught:
            check_output_dir(out, overwrite=overwrite, protected=protected)
        assert caught.value.key == "output.dir" and expected in str(caught.value)
    assert sorted(tmp_path.rglob("*")) == before  # writes nothing


def test_check_output_dir_model_inside_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "outputs" / "run" / "model.gguf"
    model.parent.mkdir(parents=True)
    model.write_text("gguf")
    with pytest.raises(RecipeError, match="is or contains the model source"):
        check_output_dir(tmp_path / "outputs", overwrite=True, protected=[model])


def test_check_output_dir_parent_not_writable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(outputdir.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    with pytest.raises(RecipeError, match=f"{locked} is not writable"):
        check_output_dir(locked / "a" / "run", overwrite=False, protected=[])  # the nearest existing ancestor


# --- OutputLock ----------------------------------------------------------------------------------------


def test_lock_refuses_a_second_run_and_is_removed(tmp_path):
    out = tmp_path / "run"
    with OutputLock(out) as lock:
        assert lock.path == tmp_path / ".run.lock" and lock.path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(
            RecipeError, match=rf"output.dir: .*run is being written by another run \(pid {os.getpid()}\)"
        ):
            OutputLock(out).__enter__()
    assert not lock.path.exists()
    with OutputLock(out):  # free again
        pass
    assert leftovers(out) == []


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from prunecomp_export.output.outputdir import OutputLock
with OutputLock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_lock_held_by_another_process_then_released_when_it_is_killed(tmp_path):
    out = tmp_path / "run"
    child = spawn(LOCK_HOLDER, str(out))
    try:
        with pytest.raises(RecipeError, match=rf"another run \(pid {child.pid}\)"):
            OutputLock(out).__enter__()
    finally:
        child.kill()
        child.wait()
    assert (tmp_path / ".run.lock").exists()  # a killed run cannot clean up: its file stays, its lock does not
    with OutputLock(out) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"


def test_lock_retries_when_the_holder_removed_the_file_meanwhile(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_open = os.open
    calls = []

    def open_then_lose_it(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        calls.append(path)
        if len(calls) == 1:  # the previous holder releases (removing the file) right after our open
            os.unlink(path)
        return fd

    monkeypatch.setattr(outputdir.os, "open", open_then_lose_it)
    with OutputLock(out) as lock:
        assert len(calls) == 2
        assert os.stat(lock.path).st_ino == os.fstat(lock._fd).st_ino


@pytest.mark.parametrize("dangling", [True, False])
def test_a_lock_path_that_is_a_symlink_is_refused_and_never_followed(tmp_path, dangling):
    target = tmp_path / "elsewhere" / "victim"
    target.parent.mkdir()
    if not dangling:
        target.write_text("precious\n")
    (tmp_path / ".run.lock").symlink_to(target)
    with pytest.raises(RecipeError, match=r"\.run\.lock is a symbolic link: not following it"):
        OutputLock(tmp_path / "run").__enter__()
    assert sorted(p.name for p in target.parent.iterdir()) == ([] if dangling else ["victim"])
    assert dangling or target.read_text() == "precious\n"
    assert (tmp_path / ".run.lock").is_symlink()  # left as it was


def test_the_lock_removes_the_directories_it_created(tmp_path):
    with OutputLock(tmp_path / "a" / "b" / "run"):
        assert (tmp_path / "a" / "b" / ".run.lock").is_file()
    assert not (tmp_path / "a").exists()
    with OutputLock(tmp_path / "a" / "b" / "run"):
        (tmp_path / "a" / "kept").write_text("x")  # a directory that holds something else stays
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["kept"]


def test_a_second_run_fails_on_the_lock_before_the_slow_checks(tmp_path, tiny_dir, monkeypatch):
    from click.testing import CliRunner

    from prunecomp_export import pipeline
    from prunecomp_export.cli import main
    from tests.test_recipe_errors import GOOD, write

    def slow(*args, **kwargs):
        raise AssertionError("the model config was read before the output's lock was taken")

    monkeypatch.setattr(pipeline, "load_config", slow)
    path = write(tmp_path, GOOD, tiny_dir)
    out = (tmp_path / "out").resolve()
    with OutputLock(out):
        result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    pid = os.getpid()
    assert line == (
        f"prunecomp-export: error: {path}, output.dir: {out} is being written by another run (pid {pid}): "
        "wait for it, or choose another output.dir"
    )
    assert leftovers(out) == [] and not out.exists()


HEAVY_IMPORTS = """
import sys
from prunecomp_export.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    print(exc.code, sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""


def test_a_locked_output_is_refused_before_torch_is_imported(tmp_path, tiny_dir):
    """What makes a second run fail in well under a second: the lock is taken before the pipeline
    (torch, transformers) is imported. Timing itself is never asserted."""
    from tests.test_recipe_errors import GOOD, write

    path = write(tmp_path, GOOD, tiny_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with OutputLock(tmp_path / "out"):
        done = subprocess.run([sys.executable, "-c", HEAVY_IMPORTS, str(path)], capture_output=True, text=True, env=env)
    assert "is being written by another run" in done.stderr, done.stderr
    assert done.stdout.splitlines() == ["2 []"], done.stdout


def test_a_run_refused_after_the_lock_leaves_nothing(tmp_path, tiny_dir):
    from click.testing import CliRunner

    from prunecomp_export.cli import main
    from tests.test_recipe_errors import GOOD, write

    path = write(tmp_path, GOOD.replace("num_drop: 2", "num_drop: 9"), tiny_dir)
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(main, [str(path), "--output", str(tmp_path / "new" / "sub" / "out")])
    assert result.exit_code == 2
    assert "prune.num_drop: asks to remove 9 layers" in result.stderr
    assert sorted(tmp_path.rglob("*")) == before  # no lock, no staging, no parent directories


# --- staged_output -------------------------------------------------------------------------------------


def exchange_works(tmp_path: Path) -> bool:
    (tmp_path / "x1").mkdir()
    (tmp_path / "x2").mkdir()
    try:
        return exchange(tmp_path / "x1", tmp_path / "x2")
    finally:
        os.rmdir(tmp_path / "x1")
        os.rmdir(tmp_path / "x2")


def test_staged_output_new(tmp_path):
    final = tmp_path / "sub" / "run"
    with staged_output(final, overwrite=False) as stage:
        assert stage.parent == final.parent and stage.name.startswith(f".run.tmp-{os.getpid()}-")
        (stage / "marker").write_text("new")
        assert not final.exists()
    assert (final / "marker").read_text() == "new" and leftovers(final) == []


def test_staged_output_refuses_existing_without_overwrite(tmp_path):
    final = previous_output(tmp_path / "run")
    with pytest.raises(RecipeError, match="exists"), staged_output(final, overwrite=False):
        raise AssertionError("not reached")
    assert (final / "marker").read_text() == "old" and leftovers(final) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space")])
def test_failure_inside_the_block_leaves_the_old_output(tmp_path, error):
    final = previous_output(tmp_path / "run")
    with pytest.raises(type(error)), staged_output(final, overwrite=True) as stage:
        (stage / "marker").write_text("half")
        raise error
    assert (final / "marker").read_text() == "old" and leftovers(final) == []


def test_replacement_is_one_exchange_with_something_complete_always_at_final(tmp_path, monkeypatch):
    if not exchange_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here")
    final = previous_output(tmp_path / "run")

    def no_rename(*args):
        raise AssertionError("a plain rename would leave a moment with nothing at the output")

    seen_while_deleting = []
    real_rmtree = outputdir.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        seen_while_deleting.append(((final / "marker").read_text(), (Path(path) / "marker").read_text()))
        real_rmtree(path, *args, **kwargs)

    with staged_output(final, overwrite=True) as stage:
        (stage / "marker").write_text("new")
        monkeypatch.setattr(outputdir.os, "rename", no_rename)
        monkeypatch.setattr(outputdir.os, "replace", no_rename)
        monkeypatch.setattr(outputdir.shutil, "rmtree", rmtree)
    assert seen_while_deleting == [("new", "old")]  # the old output is deleted after the new one is in place
    assert (final / "marker").read_text() == "new" and leftovers(final) == []


def test_a_failing_exchange_leaves_the_old_output(tmp_path, monkeypatch):
    final = previous_output(tmp_path / "run")

    def fail(a, b):
        raise OSError(errno.EACCES, "Permission denied", str(b))

    monkeypatch.setattr(outputdir, "exchange", fail)
    with pytest.raises(PermissionError), staged_output(final, overwrite=True) as stage:
        (stage / "marker").write_text("new")
    assert (final / "marker").read_text() == "old" and leftovers(final) == []


def test_fallback_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setattr(outputdir, "_renameat2", lambda: None)
    final = previous_output(tmp_path / "run")
    with staged_output(final, overwrite=True) as stage:
        (stage / "marker").write_text("new")
    assert (final / "marker").read_text() == "new" and leftovers(final) == []


def test_fallback_failing_between_the_renames_puts_the_old_output_back(tmp_path, monkeypatch):
    monkeypatch.setattr(outputdir, "exchange", lambda a, b: False)
    final = previous_output(tmp_path / "run")
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the old output is aside; the new one cannot come in
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        real_rename(src, dst)

    monkeypatch.setattr(outputdir.os, "rename", rename)
    with pytest.raises(OSError, match="No space"), staged_output(final, overwrite=True) as stage:
        (stage / "marker").write_text("new")
    assert calls[0][0] == "run" and calls[0][1].startswith(".run.old-") and calls[1][1] == "run"
    assert (final / "marker").read_text() == "old" and leftovers(final) == []


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS])
def test_exchange_unsupported_by_the_file_system_falls_back(tmp_path, monkeypatch, code):
    def renameat2(*args):
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(outputdir, "_renameat2", lambda: renameat2)
    assert exchange(tmp_path / "a", tmp_path / "b") is False
    final = previous_output(tmp_path / "run")
    with staged_output(final, overwrite=True) as stage:
        (stage / "marker").write_text("new")
    assert (final / "marker").read_text() == "new" and leftovers(final) == []


def test_stale_staging_of_dead_runs_is_removed(tmp_path):
    final = tmp_path / "run"
    dead, alive = dead_pid(), os.getpid()
    stale = [tmp_path / f".run.tmp-{dead}-0a1b2c3d", tmp_path / f".run.tmp-{dead}-ff"]
    kept = [tmp_path / f".run.tmp-{alive}-0a1b2c3d", tmp_path / f".other.tmp-{dead}-0a1b2c3d", tmp_path / ".run.tmp-x"]
    for path in stale + kept:
        path.mkdir()
        (path / "junk").write_text("x")
    with staged_output(final, overwrite=False) as stage:
        assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
        (stage / "marker").write_text("new")
    assert (final / "marker").read_text() == "new"


STAGER = """
import sys, time
from pathlib import Path
from prunecomp_export.child import interrupting_signals
from prunecomp_export.output.outputdir import staged_output
try:
    with interrupting_signals(), staged_output(Path(sys.argv[1]), overwrite=True) as stage:
        (stage / "marker").write_text("half")
        print(stage, flush=True)
        for _ in range(1200):  # short sleeps: a signal handled between print and one long sleep's start
            time.sleep(0.1)    # would wait for the whole sleep (CPython checks its handlers between calls)
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_sigterm_removes_the_staging_and_keeps_the_old_output(tmp_path):
    final = previous_output(tmp_path / "run")
    child = spawn(STAGER, str(final))
    assert Path(child.ready).is_dir()
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 130
    assert not Path(child.ready).exists() and leftovers(final) == []
    assert (final / "marker").read_text() == "old"


def test_a_killed_run_leaves_stale_staging_that_the_next_run_removes(tmp_path):
    final = previous_output(tmp_path / "run")
    child = spawn(STAGER, str(final))
    child.kill()
    child.wait()
    staging = Path(child.ready)
    assert staging.is_dir() and (final / "marker").read_text() == "old"
    with staged_output(final, overwrite=True) as stage:
        assert not staging.exists()
        (stage / "marker").write_text("new")
    assert (final / "marker").read_text() == "new" and leftovers(final) == []


# --- interrupting_signals, write errors ----------------------------------------------------------------------


@pytest.fixture
def sigterm_guard():
    """A SIGTERM handler that only records, so a missing interrupting_signals fails the test, not pytest."""
    received = []

    def guard(signum, frame):
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, guard)
    yield guard
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_raises_keyboard_interrupt_and_the_handler_is_restored(sigterm_guard):
    with pytest.raises(KeyboardInterrupt), interrupting_signals():
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
        raise AssertionError("SIGTERM did not interrupt")
    assert signal.getsignal(signal.SIGTERM) is sigterm_guard


def test_write_error_message(tmp_path):
    out = tmp_path / "run"
    full = OSError(errno.ENOSPC, "No space left on device")
    assert write_error_message(full, out) == f"cannot write {out}: No space left on device"
    staged = OSError(errno.EACCES, "Permission denied", str(tmp_path / ".run.tmp-1-ab" / "x"))
    assert write_error_message(staged, out) == f"cannot write {staged.filename}: Permission denied"
    elsewhere = OSError(errno.EACCES, "Permission denied", "/model/config.json")
    assert write_error_message(elsewhere, out) == "/model/config.json: Permission denied"


# --- a full disk while the checkpoint is written -----------------------------------------------------


def _safetensors_full(path: Path) -> Exception:
    from safetensors import SafetensorError

    return SafetensorError(
        f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"'
    )


@pytest.mark.parametrize("error", ["safetensors", "oserror"])
def test_a_full_disk_while_writing_the_checkpoint_is_one_line_and_leaves_nothing(
    tmp_path, tiny_dir, monkeypatch, error
):
    from click.testing import CliRunner

    from prunecomp_export.cli import main
    from prunecomp_export.output.safetensors_stream import SafetensorsWriter
    from tests.test_recipe_errors import GOOD, write

    def full(self, name, chunks):
        raise (
            _safetensors_full(self.path) if error == "safetensors" else OSError(errno.ENOSPC, "No space left on device")
        )

    monkeypatch.setattr(SafetensorsWriter, "write_chunks", full)
    result = CliRunner().invoke(main, [str(write(tmp_path, GOOD, tiny_dir))])
    assert isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code == 2
    out = (tmp_path / "out").resolve()
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]  # not the progress log
    assert errors == [f"prunecomp-export: error: cannot write {out}: No space left on device"], result.stderr
    assert not out.exists() and leftovers(out) == []


def test_safetensors_os_errors_become_os_errors(tmp_path):
    from safetensors import SafetensorError

    from prunecomp_export.output.outputdir import safetensors_write_errors

    with pytest.raises(OSError) as full, safetensors_write_errors(tmp_path / "a"):
        raise _safetensors_full(tmp_path / "tmp")
    assert full.value.errno == errno.ENOSPC and full.value.filename is None  # the disk is full, not a file
    denied = 'Error while serializing: I/O error: Permission denied (os error 13) at path "/x/.tmpA"'
    with pytest.raises(OSError) as info, safetensors_write_errors(tmp_path / "a"):
        raise SafetensorError(denied)
    assert info.value.errno == errno.EACCES and info.value.filename == "/x/.tmpA"
    with pytest.raises(SafetensorError), safetensors_write_errors(tmp_path / "a"):
        raise SafetensorError("Error while deserializing header: HeaderTooLarge")  # no OS error: kept
