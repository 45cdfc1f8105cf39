"""Every stage command (verify, export, serve, bench) on a damaged, hostile or truncated output: the
exact exit code (2 bad input, 1 a verification failure), one line per problem naming the file and
the key, nothing written, no staging or lock file left, no process left running, no traceback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import textwrap
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from prunecomp_export.cli import main
from prunecomp_export.output.manifest import read_manifest, write_manifest
from tests.conftest import TINY_BENCH, TINY_RECIPE

RECIPE = TINY_RECIPE + "evaluation:\n  perplexity: {{corpora: [{text}], seq_len: 16, max_windows: 2}}\n" + TINY_BENCH

MANIFEST = "prunecomp_manifest.json"
WEIGHTS = "checkpoint/model.safetensors"
CONFIG = "checkpoint/config.json"
SAMPLE = "verification.safetensors"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """One run on a tiny random Llama (6 layers, 2 removed): base/out; the model is base/tiny."""
    from tests.conftest import make_model
    from tests.test_checkpoint import tiny_tokenizer

    base = tmp_path_factory.mktemp("hostile")
    make_model("llama").save_pretrained(base / "tiny")
    tiny_tokenizer().save_pretrained(base / "tiny")
    (base / "corpus.txt").write_text(" ".join(f"t{i % 100 + 3}" for i in range(400)))
    recipe = textwrap.dedent(RECIPE).format(model=base / "tiny", text=base / "corpus.txt", out=base / "out")
    (base / "recipe.yaml").write_text(recipe)
    result = CliRunner().invoke(main, [str(base / "recipe.yaml")])
    assert result.exit_code == 0, result.output
    return base / "out"


# --- damage -------------------------------------------------------------------------------------


def edit_manifest(change: Callable[[dict], object]) -> Callable[[Path], None]:
    """The manifest's JSON changed by ``change`` and written back as it is (not re-hashed)."""

    def damage(out: Path) -> None:
        manifest = json.loads((out / MANIFEST).read_text())
        change(manifest)
        (out / MANIFEST).write_text(json.dumps(manifest))

    return damage


def manifest_text(text: Callable[[str], str | bytes]) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        new = text((out / MANIFEST).read_text())
        (out / MANIFEST).write_bytes(new if isinstance(new, bytes) else new.encode())

    return damage


def rehashed(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """``damage``, then the manifest's hashes taken again: the manifest vouches for the damaged files."""

    def both(out: Path) -> None:
        damage(out)
        write_manifest(out, read_manifest(out))

    return both


def remove(name: str) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

    return damage


def as_directory(name: str) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        remove(name)(out)
        (out / name).mkdir()
        (out / name / "x").write_text("x")

    return damage


def as_file(name: str) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        remove(name)(out)
        (out / name).write_text("not a directory\n")

    return damage


def as_symlink(name: str, *, dangling: bool = False) -> Callable[[Path], None]:
    """``name`` moved out of the output and a symbolic link left in its place."""

    def damage(out: Path) -> None:
        elsewhere = out.parent / f"elsewhere-{Path(name).name}"
        os.rename(out / name, elsewhere)
        if dangling:
            remove(elsewhere.name)(out.parent)
        (out / name).symlink_to(elsewhere)

    return damage


def as_fifo(name: str) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        if os.path.lexists(out / name):
            remove(name)(out)
        os.mkfifo(out / name)

    return damage


def write_bytes(name: str, data: bytes | Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        path = out / name
        path.write_bytes(data(path.read_bytes()) if callable(data) else data)

    return damage


def edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        value = json.loads((out / name).read_text())
        change(value)
        (out / name).write_text(json.dumps(value))

    return damage


def sample(**tensors) -> Callable[[Path], None]:
    """The verification sample replaced by ``tensors`` (name -> function of the recorded ones)."""

    def damage(out: Path) -> None:
        from safetensors.torch import load_file, save_file

        recorded = load_file(out / SAMPLE)
        save_file({name: make(recorded) for name, make in tensors.items()}, out / SAMPLE)

    return damage


def set_path(path: str, value: object) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return change


def delete(path: str) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        del node[last]

    return change


def deep(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels):
        value = {"a": value}
    return value


# --- the table ----------------------------------------------------------------------------------

# (damage, expected fragment of the error line; {out}: the output's path) for every stage command: exit 2
MANIFEST_CASES = [
    pytest.param(remove(MANIFEST), "{out}: not an output of prunecomp-export (no prunecomp_manifest.json)", id="gone"),
    pytest.param(manifest_text(lambda t: t[: len(t) // 2]), "{out}/prunecomp_manifest.json: not valid JSON", id="cut"),
    pytest.param(manifest_text(lambda t: ""), "prunecomp_manifest.json: not valid JSON", id="empty"),
    pytest.param(manifest_text(lambda t: b"\xff{}"), "prunecomp_manifest.json: not a manifest: not UTF-8", id="bin"),
    pytest.param(as_directory(MANIFEST), "prunecomp_manifest.json: a directory, not a file", id="directory"),
    pytest.param(as_symlink(MANIFEST), "prunecomp_manifest.json: a symbolic link: not followed", id="symlink"),
    pytest.param(as_symlink(MANIFEST, dangling=True), "prunecomp_manifest.json: a symbolic link", id="dangling"),
    pytest.param(as_fifo(MANIFEST), "prunecomp_manifest.json: not a regular file", id="fifo"),
    pytest.param(manifest_text(lambda t: "[" * 100_000 + "]" * 100_000), "nested deeper than 64", id="deep-100000"),
    pytest.param(
        edit_manifest(set_path("machine", deep(70))),
        "prunecomp_manifest.json, machine.a.a.a",
        id="deep-70",
    ),
    pytest.param(
        manifest_text(lambda t: t + " " * (17 << 20)), "prunecomp_manifest.json: larger than 16 MiB", id="huge"
    ),
    pytest.param(manifest_text(lambda t: "[]"), "not a manifest: a JSON object is expected", id="list"),
    pytest.param(
        manifest_text(lambda t: t.replace("{", '{"schema": "x", ', 1)),
        "prunecomp_manifest.json: not valid JSON: the key 'schema' is given twice in one object",
        id="key-twice",
    ),
    pytest.param(
        edit_manifest(set_path("schema", "prunecomp-manifest/99")),
        "prunecomp_manifest.json, schema: not a prunecomp-manifest/2 manifest (schema 'prunecomp-manifest/99')",
        id="schema",
    ),
    pytest.param(
        edit_manifest(set_path("verification.check.extra", 1)),
        "prunecomp_manifest.json, verification.check.extra: unknown key (allowed: dtype, attn_implementation,",
        id="unknown-key",
    ),
    pytest.param(
        edit_manifest(set_path("source_model", "tiny")),
        "prunecomp_manifest.json, source_model: expected a section (a mapping of keys to values), not the text 'tiny'",
        id="section-a-string",
    ),
    pytest.param(
        edit_manifest(delete("layers_after")),
        "prunecomp_manifest.json, layers_after: required key is missing",
        id="missing-field",
    ),
    pytest.param(
        edit_manifest(set_path("removed.0.alpha", "1.5")),
        "prunecomp_manifest.json, removed.0.alpha: expected a number, not the text '1.5'",
        id="string-for-number",
    ),
    pytest.param(
        edit_manifest(set_path("removed.0.alpha", float("nan"))),
        "prunecomp_manifest.json, removed.0.alpha: expected a finite number, not nan",
        id="nan",
    ),
    pytest.param(
        edit_manifest(set_path("layers_after", 6)),
        "layers_before (6), layers_after (6) and the 2 removed layers do not add up",
        id="layers-do-not-add-up",
    ),
    pytest.param(
        edit_manifest(set_path("files", {"../../etc/passwd": "0" * 64})),
        "prunecomp_manifest.json, files: '../../etc/passwd' is not a path inside the output",
        id="file-outside",
    ),
    pytest.param(
        edit_manifest(set_path("files", {SAMPLE: "abc"})),
        "prunecomp_manifest.json, files.verification.safetensors: 'abc' is not a sha256",
        id="bad-sha256",
    ),
    pytest.param(
        edit_manifest(set_path("verification.check.sample_file", "/etc/passwd")),
        "verification.check.sample_file: '/etc/passwd' is not a path inside the output",
        id="sample-outside",
    ),
    pytest.param(
        edit_manifest(set_path("verification.check.dtype", "__class__")),
        "verification.check.dtype: expected 'float32', 'bfloat16' or 'float16', not the text '__class__'",
        id="dtype-attribute",
    ),
    pytest.param(
        edit_manifest(set_path("verification.check.device", "tpu")),
        "verification.check.device: 'tpu' is not a device",
        id="device",
    ),
    pytest.param(
        edit_manifest(set_path("targets", {"vllm": {"prompts": 3}})),
        "prunecomp_manifest.json, targets.vllm: not a build record of the vllm target",
        id="target-record",
    ),
    pytest.param(
        edit_manifest(set_path("targets", {"onnxx": {}})),
        "prunecomp_manifest.json, targets.onnxx: unknown target 'onnxx' (did you mean 'onnx'?)",
        id="target-name",
    ),
    pytest.param(
        edit_manifest(set_path("recipe.prune.num_drop", "two")),
        "prunecomp_manifest.json, recipe.prune.num_drop: expected a whole number, not the text 'two'",
        id="recorded-recipe",
    ),
    pytest.param(
        edit_manifest(set_path("recipe.targets", {"vllm": {"port": 1e400}})),
        "prunecomp_manifest.json, recipe.targets.vllm.port: expected a finite number, not inf",
        id="recorded-target-option",
    ),
]

# what export, serve and bench need, damaged: exit 2 before any work (verify: see VERIFY_CASES)
NEEDED_CASES = [
    pytest.param(remove("checkpoint"), "{out}/checkpoint: missing or not a directory", id="checkpoint-gone"),
    pytest.param(as_file("checkpoint"), "{out}/checkpoint: missing or not a directory", id="checkpoint-a-file"),
    pytest.param(as_symlink("checkpoint"), "{out}/checkpoint: a symbolic link (not followed)", id="checkpoint-symlink"),
    pytest.param(
        remove(WEIGHTS), "{out}/checkpoint/model.safetensors: missing: the checkpoint is incomplete", id="weights-gone"
    ),
    pytest.param(
        as_symlink(WEIGHTS), "{out}/checkpoint/model.safetensors: a symbolic link (not followed)", id="weights-symlink"
    ),
    pytest.param(as_fifo(WEIGHTS), "{out}/checkpoint/model.safetensors: not a regular file", id="weights-fifo"),
    pytest.param(
        write_bytes(CONFIG, b"{garbage"),
        "{out}/checkpoint/config.json: not a model config (not JSON)",
        id="config-garbage",
    ),
    pytest.param(
        edit_json(CONFIG, set_path("num_hidden_layers", 6)),
        "{out}/checkpoint/config.json: num_hidden_layers is 6, the manifest records 4",
        id="config-layers",
    ),
    pytest.param(as_fifo("notes.fifo"), "{out}/notes.fifo: not a regular file", id="fifo-in-output"),
    pytest.param(as_symlink("report.md"), "{out}/report.md: a symbolic link (not followed)", id="symlink-in-output"),
]

# results.json, which export and bench rewrite: exit 2 before any work
RESULTS_CASES = [
    pytest.param(remove("results.json"), "{out}/results.json: missing", id="results-gone"),
    pytest.param(write_bytes("results.json", b'{"schema": '), "{out}/results.json: not valid JSON", id="results-cut"),
    pytest.param(
        edit_json("results.json", set_path("model", "x")),
        "{out}/results.json, model: expected",
        id="results-model-a-string",
    ),
    pytest.param(as_directory("results.json"), "{out}/results.json: a directory, not a file", id="results-a-dir"),
]

# verify: exit 1, a line per problem, and no reload of what cannot be reloaded
NOT_RUN = "reload check: not run (the checkpoint or its sample does not match the manifest)"
UNREADABLE = "reload check: not run (the checkpoint or its sample cannot be read)"
VERIFY_CASES = [
    pytest.param(remove(WEIGHTS), [f"{WEIGHTS}: missing", NOT_RUN], id="weights-gone"),
    pytest.param(as_symlink(WEIGHTS), [f"{WEIGHTS}: a symbolic link (not followed)", NOT_RUN], id="weights-symlink"),
    pytest.param(as_fifo(WEIGHTS), [f"{WEIGHTS}: not a regular file", NOT_RUN], id="weights-fifo"),
    pytest.param(
        write_bytes(WEIGHTS, lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:]),
        [f"{WEIGHTS}: changed (its sha256 differs from the manifest's)", NOT_RUN],
        id="weights-tampered",
    ),
    pytest.param(
        rehashed(write_bytes(WEIGHTS, lambda data: data[: len(data) // 2])),
        [f"{{out}}/{WEIGHTS}: tensor", UNREADABLE],
        id="weights-cut-rehashed",
    ),
    pytest.param(
        as_file("checkpoint"),
        ["checkpoint: not listed in the manifest", f"{CONFIG}: missing", NOT_RUN],
        id="checkpoint-a-file",
    ),
    pytest.param(
        as_symlink("checkpoint"),
        ["checkpoint: a symbolic link (not followed)", f"{CONFIG}: missing", NOT_RUN],
        id="checkpoint-symlink",
    ),
    pytest.param(write_bytes(CONFIG, b"{garbage"), [f"{CONFIG}: changed", NOT_RUN], id="config-garbage"),
    pytest.param(
        rehashed(write_bytes(CONFIG, b"{garbage")),
        [f"{CONFIG}: not a model config (not JSON)", UNREADABLE],
        id="config-garbage-rehashed",
    ),
    pytest.param(remove(SAMPLE), [f"{SAMPLE}: missing", NOT_RUN], id="sample-gone"),
    pytest.param(
        rehashed(write_bytes(SAMPLE, b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")),
        [f"{SAMPLE}: not a safetensors file (its header is not JSON)", UNREADABLE],
        id="sample-garbage-rehashed",
    ),
    pytest.param(
        rehashed(sample(sample=lambda t: t["sample"], expected=lambda t: t["expected"][:, :-1].contiguous())),
        [f"{SAMPLE}: 'expected' is F32 [2, 15, 128], not F32 [2, 16, 128]", UNREADABLE],
        id="sample-shape-rehashed",
    ),
    pytest.param(
        rehashed(sample(sample=lambda t: t["sample"] + 1000, expected=lambda t: t["expected"])),
        [f"{SAMPLE}: 'sample' holds token ids outside the vocabulary (0..127)", UNREADABLE],
        id="sample-ids-rehashed",
    ),
    pytest.param(
        rehashed(sample(sample=lambda t: t["sample"].float(), expected=lambda t: t["expected"])),
        [f"{SAMPLE}: 'sample' is not a batch of token ids (F32 [2, 16])", UNREADABLE],
        id="sample-dtype-rehashed",
    ),
    pytest.param(as_fifo("notes.fifo"), ["notes.fifo: not a regular file"], id="fifo-in-output"),
    pytest.param(remove("results.json"), ["results.json: missing"], id="results-gone"),
]


# --- running a command on a damaged copy ----------------------------------------------------------


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry below ``directory``, never followed: its kind, and its bytes' digest for a file."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            path = Path(root) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                found[str(path.relative_to(directory))] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            elif stat.S_ISLNK(mode):
                found[str(path.relative_to(directory))] = ("link", os.readlink(path))
            else:
                found[str(path.relative_to(directory))] = (stat.S_IFMT(mode),)
    return found


ARGS = {"verify": [], "export": ["--target", "vllm"], "serve": [], "bench": []}


@pytest.fixture
def damaged(made, tmp_path, monkeypatch):
    """Run one command on a damaged copy of the output; check what every case must hold."""
    from prunecomp_export.targets import vllm

    monkeypatch.setattr(vllm, "preflight", lambda options: None)
    monkeypatch.setattr(vllm, "serve", lambda *args: pytest.fail("serve started on a damaged output"))

    def run(command: str, damage: Callable[[Path], None], *args: str) -> tuple[int, list[str], Path]:
        out = tmp_path / "work" / "out"
        shutil.copytree(made, out, symlinks=True)
        damage(out)
        before = snapshot(tmp_path)
        processes = psutil.Process().children(recursive=True)
        result = CliRunner().invoke(main, [command, str(out), *ARGS[command], *args])
        assert isinstance(result.exception, SystemExit | None), result.exc_info  # nothing escaped
        assert "Traceback" not in result.output
        assert snapshot(tmp_path) == before  # nothing written, no staging or lock left
        assert psutil.Process().children(recursive=True) == processes  # no process left running
        return result.exit_code, result.stderr.splitlines(), out

    return run


@pytest.mark.parametrize("command", ["verify", "export", "serve", "bench"])
@pytest.mark.parametrize(("damage", "expected"), MANIFEST_CASES)
def test_a_damaged_manifest_is_one_line_and_exit_2(damaged, command, damage, expected):
    code, lines, out = damaged(command, damage)
    assert code == 2, lines
    (line,) = lines
    assert line.startswith("prunecomp-export: error: ")
    assert expected.format(out=out) in line, line


@pytest.mark.parametrize("command", ["export", "serve", "bench"])
@pytest.mark.parametrize(("damage", "expected"), NEEDED_CASES)
def test_what_a_command_needs_is_checked_before_it_works(damaged, command, damage, expected):
    code, lines, out = damaged(command, damage)
    assert code == 2, lines
    (line,) = lines
    assert expected.format(out=out) in line, line
    assert line.endswith("(prunecomp-export verify names every problem)")


@pytest.mark.parametrize("command", ["export", "bench"])
@pytest.mark.parametrize(("damage", "expected"), RESULTS_CASES)
def test_a_damaged_results_file_is_refused_before_any_work(damaged, command, damage, expected):
    code, lines, out = damaged(command, damage)
    assert code == 2, lines
    (line,) = lines
    assert expected.format(out=out) in line, line


@pytest.mark.parametrize(("damage", "expected"), VERIFY_CASES)
def test_verify_reports_each_problem_and_reloads_only_what_can_be_reloaded(damaged, monkeypatch, damage, expected):
    from prunecomp_export.output.manifest import ReloadCheck

    reloads = []
    monkeypatch.setattr(ReloadCheck, "run", lambda *args, **kw: reloads.append(args) or {"max_abs_logit_diff": 0.0})
    code, lines, out = damaged("verify", damage)
    assert code == 1, lines
    prefix = f"prunecomp-export: verify: {out}: "
    assert all(line.startswith(prefix) for line in lines), lines
    problems = [line.removeprefix(prefix) for line in lines]
    for wanted in expected:
        assert any(problem.startswith(wanted.format(out=out)) for problem in problems), (wanted, problems)
    if expected[-1] in (NOT_RUN, UNREADABLE):
        assert problems[-1] == expected[-1] and not reloads  # the reload could only crash: not started
    else:
        assert len(problems) == len(expected) and len(reloads) == 1


def test_a_reload_that_fails_for_real_is_one_line_and_no_traceback(made, tmp_path):
    """Weights changed behind the manifest's back (headers sound, hashes taken again): the reload runs,
    its logits differ, and the child's failure reaches the user as one line: nothing of the child's
    traceback on the terminal, whatever the child printed on its way."""
    import subprocess
    import sys

    out = tmp_path / "out"
    shutil.copytree(made, out, symlinks=True)

    def tamper(out: Path) -> None:
        weights = out / "checkpoint" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-4096:] = bytes(range(256)) * 16  # the last tensor's values, not its header
        weights.write_bytes(bytes(data))

    rehashed(tamper)(out)
    done = subprocess.run(
        [sys.executable, "-m", "prunecomp_export", "verify", str(out)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "PRUNECOMP_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"prunecomp-export: verify: {out}: reload check: "), last


def test_verify_passes_on_the_intact_copy(damaged):
    code, lines, _out = damaged("verify", lambda out: None)
    assert (code, lines) == (0, [])


# --- bench: the source model ----------------------------------------------------------------------


def recorded_source(value: str) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        manifest = read_manifest(out)
        model = manifest.recipe.model.model_copy(update={"source": value})
        write_manifest(out, manifest.model_copy(update={"recipe": manifest.recipe.model_copy(update={"model": model})}))

    return damage


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "/nonexistent/tiny",
            "{out}/prunecomp_manifest.json, recipe.model.source: the source model is missing: file not found",
        ),
        # one slash and absent: would be read as a hub id, and then "differ"; it is missing
        ("models/tiny", "recipe.model.source: the source model 'models/tiny' is missing (the run read dir:"),
    ],
)
def test_bench_without_its_source_model_says_it_is_missing(damaged, source, expected):
    code, lines, out = damaged("bench", recorded_source(source))
    assert code == 2
    (line,) = lines
    assert expected.format(out=out) in line, line


def test_bench_refuses_a_source_that_changed(damaged, made, tmp_path):
    changed = tmp_path / "work" / "tiny"

    def damage(out: Path) -> None:
        shutil.copytree(made.parent / "tiny", changed)
        edit_json("config.json", set_path("rms_norm_eps", 1e-5))(changed)
        (changed / "model.safetensors").write_bytes((changed / "model.safetensors").read_bytes() + b" ")
        recorded_source(str(changed))(out)

    code, lines, _out = damaged("bench", damage)
    assert code == 2
    (line,) = lines
    assert f"dir:{changed}: not the model this output was pruned from (its sha256 differs)" in line


# --- locks and options --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["export", "bench"])
def test_a_locked_output_fails_at_once(damaged, command, tmp_path):
    from prunecomp_export.output.outputdir import OutputLock

    out = tmp_path / "work" / "out"
    with OutputLock(out):
        code, lines, _out = damaged(command, lambda out: None)
    assert code == 2
    (line,) = lines
    assert f"{out} is being written by another run (pid {os.getpid()})" in line


HEAVY_IMPORTS = """
import sys
from prunecomp_export.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    print(exc.code, sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""


@pytest.mark.parametrize("command", ["export", "bench"])
def test_a_locked_output_is_refused_before_torch_is_imported(made, command, tmp_path):
    """What makes a stage command on a locked output fail in well under a second: the lock comes
    before the heavy imports. Timing itself is never asserted."""
    import subprocess
    import sys

    from prunecomp_export.output.outputdir import OutputLock

    out = shutil.copytree(made, tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with OutputLock(out):
        args = [sys.executable, "-c", HEAVY_IMPORTS, command, str(out), *ARGS[command]]
        done = subprocess.run(args, capture_output=True, text=True, env=env)
    assert "is being written by another run" in done.stderr, done.stderr
    assert done.stdout.splitlines() == ["2 []"], done.stdout


@pytest.mark.parametrize("command", ["export", "bench"])
@pytest.mark.parametrize("dangling", [True, False])
def test_a_lock_path_that_is_a_symlink_is_never_followed(damaged, command, tmp_path, dangling):
    target = tmp_path / "victim"
    if not dangling:
        target.write_text("precious\n")

    def damage(out: Path) -> None:
        (out.parent / ".out.lock").symlink_to(target)

    code, lines, out = damaged(command, damage)
    assert code == 2
    (line,) = lines
    assert f"{out.parent}/.out.lock is a symbolic link: not following it" in line
    assert os.path.lexists(target) is not dangling  # neither created nor truncated (snapshot: unchanged)


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        ("verify", ["--device", "cuda:9"], "Invalid value for '--device': "),
        ("verify", ["--device", "banana"], "Invalid value for '--device': 'banana' is not a device"),
        ("verify", ["--device", ""], "Invalid value for '--device': '' is not a device"),
        ("serve", ["--host", "bad host"], "Invalid value for '--host': 'bad host' is not an IP address or a host name"),
        ("serve", ["--host", "a\nb"], "Invalid value for '--host': 'a\\nb' is not an IP address"),
        ("serve", ["--port", "-1"], "Invalid value for '--port'"),
        ("export", ["--target", "onnxx"], "--target: unknown target 'onnxx' (did you mean 'onnx'?)"),
    ],
)
def test_a_bad_option_is_a_usage_error_in_one_line(damaged, command, args, expected):
    code, lines, _out = damaged(command, lambda out: None, *args)
    assert code == 2
    (line,) = lines
    assert line.startswith("prunecomp-export: error: ") and expected in line, line


def test_an_output_path_with_control_characters_is_escaped(made, tmp_path):
    odd = tmp_path / "o\nut\x1b[2J"
    shutil.copytree(made, odd)
    (odd / MANIFEST).write_text("{")
    result = CliRunner().invoke(main, ["verify", str(odd)])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert "\x1b" not in line and f"{tmp_path}/o\\nut\\x1b[2J/prunecomp_manifest.json: not valid JSON" in line
