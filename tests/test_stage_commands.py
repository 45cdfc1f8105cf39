"""An output outlives its run: every path in it is relative to it (it is staged, renamed, and may be
moved to another machine), and the stage commands (verify, export, serve, bench) act on it later."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from prunecomp_export.cli import main
from tests.conftest import TINY_BENCH, TINY_RECIPE
from tests.fake_vllm import fake_vllm_python

RECIPE = TINY_RECIPE + 'targets:\n  vllm: {{prompts: ["t5 t6 t7"], max_new_tokens: 4}}\n' + TINY_BENCH


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (6 layers), a corpus and a recipe, in one directory."""
    from tests.conftest import make_model
    from tests.test_checkpoint import tiny_tokenizer

    base = tmp_path_factory.mktemp("stage")
    model = base / "tiny"
    make_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    corpus = base / "corpus.txt"
    corpus.write_text(" ".join(f"t{i % 100 + 3}" for i in range(400)))
    recipe = textwrap.dedent(RECIPE).format(model=model, text=corpus, out=base / "out")
    (base / "recipe.yaml").write_text(recipe)
    return base


@pytest.fixture(scope="module")
def vllm_python(run_dir: Path) -> Path:
    return fake_vllm_python(run_dir)


@pytest.fixture(scope="module")
def output(run_dir: Path, vllm_python: Path) -> Path:
    """One pipeline run with the vllm target (on the stand-in vllm); tests that change an output
    change a copy (``copy_of``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PRUNECOMP_VLLM_PYTHON", str(vllm_python))
        result = CliRunner().invoke(main, [str(run_dir / "recipe.yaml"), "--target", "vllm"])
    assert result.exit_code == 0, result.output
    return run_dir / "out"


def copy_of(output: Path, where: Path) -> Path:
    where.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(output, where, symlinks=True)
    return where


def text_files(directory: Path) -> dict[Path, str]:
    """Every file below ``directory`` that reads as text."""
    found = {}
    for path in directory.rglob("*"):
        if path.is_file():
            try:
                found[path] = path.read_text()
            except UnicodeDecodeError:
                continue
    return found


# --- relative paths ------------------------------------------------------------------------------


def test_a_moved_output_mentions_neither_its_staging_nor_its_old_path(output, tmp_path):
    moved = copy_of(output, tmp_path / "elsewhere" / "moved")
    texts = text_files(moved)
    assert moved / "prunecomp_manifest.json" in texts and moved / "targets" / "vllm" / "serve.sh" in texts
    for path, text in texts.items():
        assert str(output) not in text, path  # the original output path (staging is its sibling)
        assert f".{output.name}.tmp-" not in text, path


def test_serve_script_of_a_moved_output_serves_the_moved_checkpoint(output, tmp_path):
    moved = copy_of(output, tmp_path / "elsewhere" / "moved")
    echo = tmp_path / "echo-python"
    echo.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    echo.chmod(0o755)
    env = {"PATH": os.environ["PATH"], "PRUNECOMP_VLLM_PYTHON": str(echo)}
    for how in (["sh", str(moved / "targets/vllm/serve.sh")], ["./serve.sh"]):
        done = subprocess.run(
            how, env=env, capture_output=True, text=True, timeout=30, cwd=moved / "targets" / "vllm", check=False
        )
        assert done.returncode == 0, done.stderr
        args = done.stdout.splitlines()
        assert args[args.index("--model") + 1] == str((moved / "checkpoint").resolve())


def test_serve_script_fails_when_the_checkpoint_is_gone(output, tmp_path):
    moved = copy_of(output, tmp_path / "moved")
    shutil.rmtree(moved / "checkpoint")
    env = {"PATH": os.environ["PATH"], "PRUNECOMP_VLLM_PYTHON": "true"}
    done = subprocess.run([str(moved / "targets/vllm/serve.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "checkpoint" in done.stderr


def test_records_give_paths_relative_to_the_output(output):
    manifest = json.loads((output / "prunecomp_manifest.json").read_text())
    record = manifest["targets"]["vllm"]
    assert record["checkpoint"] == "checkpoint"
    assert record["serve_command"][record["serve_command"].index("--model") + 1] == "checkpoint"
    assert manifest["recipe"]["output"]["dir"] == "."
    assert json.loads((output / "results.json").read_text())["recipe"]["output"]["dir"] == "."


def test_results_and_reports_show_the_targets_parity(output):
    results = json.loads((output / "results.json").read_text())
    (vllm,) = results["targets"]
    assert (vllm["target"], vllm["passed"]) == ("vllm", True)
    (check,) = vllm["checks"]
    # one prompt ("t5 t6 t7"), greedy-equal on the stand-in vLLM
    assert (check["name"], check["measured"], check["comparison"], check["limit"]) == ("greedy_tokens", 1, ">=", 1)
    assert check["passed"] is True and check["detail"].startswith("float32, ")
    assert "(at most 4 a prompt)" in check["detail"]
    row = "| vllm | greedy_tokens | 1 | ≥ 1 | prompts greedy-equal | PASS |"
    assert row in (output / "report.md").read_text()
    assert "<td>vllm</td><td>greedy_tokens</td><td>1</td><td>≥ 1</td>" in (output / "report.html").read_text()


# --- the command line ----------------------------------------------------------------------------


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert isinstance(result.exception, SystemExit | None), result.exc_info  # nothing escaped
    assert "Traceback" not in result.output
    return result


def errors(result) -> list[str]:
    """The command's own error lines (a child's progress bars also go to stderr)."""
    return [line for line in result.stderr.splitlines() if line.startswith("prunecomp-export:")]


def test_help_lists_the_stage_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    commands = result.output.split("Commands:")[1].split()
    assert {"verify", "export", "serve", "bench", "run"} <= set(commands)


@pytest.mark.parametrize("command", ["verify", "export", "serve", "bench"])
def test_a_path_that_is_not_an_output_is_one_line_and_exit_2(tmp_path, command):
    extra = ["--target", "onnx"] if command == "export" else []
    (tmp_path / "plain").mkdir()
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "plain", tmp_path / "file", tmp_path / "missing"):
        result = invoke(command, str(path), *extra)
        assert result.exit_code == 2, result.output
        assert errors(result) == [line for line in result.stderr.splitlines()]
        assert len(errors(result)) == 1 and str(path) in errors(result)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "plain"]  # nothing written


# --- verify --------------------------------------------------------------------------------------


def test_verify_passes_on_an_untouched_moved_output(output, tmp_path):
    moved = copy_of(output, tmp_path / "moved")
    result = invoke("verify", str(moved))
    assert result.exit_code == 0, result.output
    assert "every file matches the manifest; reload check passed" in result.stdout


def test_verify_names_each_missing_changed_and_unlisted_file(output, tmp_path):
    moved = copy_of(output, tmp_path / "moved")
    (moved / "trajectory.json").unlink()
    with (moved / "report.md").open("a") as handle:
        handle.write("edited\n")
    (moved / "checkpoint" / "extra.bin").write_bytes(b"x")
    result = invoke("verify", str(moved))
    assert result.exit_code == 1
    assert errors(result) == [
        f"prunecomp-export: verify: {moved}: checkpoint/extra.bin: not listed in the manifest",
        f"prunecomp-export: verify: {moved}: report.md: changed (its sha256 differs from the manifest's)",
        f"prunecomp-export: verify: {moved}: trajectory.json: missing",
        # a file in the checkpoint the run did not write: its reload would not check what the run checked
        f"prunecomp-export: verify: {moved}: reload check: not run (the checkpoint or its sample does not match "
        "the manifest)",
    ]


def test_verify_repeats_the_reload_check(output, tmp_path):
    """Weights changed and re-hashed into the manifest: only the recorded logits can tell."""
    import torch
    from safetensors.torch import load_file, save_file

    from prunecomp_export.output.manifest import read_manifest, write_manifest

    moved = copy_of(output, tmp_path / "moved")
    weights = moved / "checkpoint" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    weights.unlink()
    save_file(tensors, weights, metadata={"format": "pt"})
    write_manifest(moved, read_manifest(moved))
    result = invoke("verify", str(moved))
    assert result.exit_code == 1
    (line,) = errors(result)
    assert line.startswith(f"prunecomp-export: verify: {moved}: reload check: the reloaded checkpoint's logits")
    assert torch.equal(load_file(moved / "verification.safetensors")["sample"], load_file(
        output / "verification.safetensors")["sample"])  # fmt: skip


def test_verify_without_a_recorded_check_says_so(output, tmp_path):
    from prunecomp_export.output.manifest import read_manifest, write_manifest

    moved = copy_of(output, tmp_path / "moved")
    write_manifest(moved, read_manifest(moved).model_copy(update={"verification": None}))
    result = invoke("verify", str(moved))
    assert result.exit_code == 0, result.output
    assert "reload check skipped: the run made no reload check (output.verify: false)" in result.stdout


# --- export --------------------------------------------------------------------------------------


def test_export_builds_a_target_into_the_output_and_records_it(output, tmp_path, vllm_python, monkeypatch):
    monkeypatch.setenv("PRUNECOMP_VLLM_PYTHON", str(vllm_python))
    moved = copy_of(output, tmp_path / "moved")
    shutil.rmtree(moved / "targets")
    from prunecomp_export.output.manifest import read_manifest, write_manifest

    manifest = read_manifest(moved)

    # an output made without targets, by a prunecomp-export whose results.json had no targets (schema 3)
    results = json.loads((moved / "results.json").read_text())
    del results["targets"]
    (moved / "results.json").write_text(json.dumps({**results, "schema": "prunecomp-results/3"}))
    write_manifest(moved, manifest.model_copy(update={"targets": {}}))
    weights = (moved / "checkpoint" / "model.safetensors").stat()
    result = invoke("export", str(moved), "--target", "vllm")
    assert result.exit_code == 0, result.output
    manifest = json.loads((moved / "prunecomp_manifest.json").read_text())
    assert manifest["targets"]["vllm"]["tokens_equal"] is True
    assert manifest["targets"]["vllm"]["checkpoint"] == "checkpoint"
    assert "targets/vllm/serve.sh" in manifest["files"]
    results = json.loads((moved / "results.json").read_text())
    assert results["schema"] == "prunecomp-results/5"
    assert [
        (t["target"], t["passed"], [(c["measured"], c["limit"]) for c in t["checks"]]) for t in results["targets"]
    ] == [("vllm", True, [(1, 1)])]
    assert "| vllm | greedy_tokens | 1 | ≥ 1 | prompts greedy-equal | PASS |" in (moved / "report.md").read_text()
    assert "vllm: greedy_tokens 1 ≥ 1 (prompts greedy-equal): PASS" in result.output
    assert (moved / "checkpoint" / "model.safetensors").stat().st_ino == weights.st_ino  # linked, not copied
    assert [p.name for p in moved.parent.iterdir()] == ["moved"]  # no staging or lock left
    assert invoke("verify", str(moved)).exit_code == 0


def test_a_failing_export_leaves_the_output_as_it_was(output, tmp_path, monkeypatch):
    without = tmp_path / "python-no-vllm"
    without.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    without.chmod(0o755)
    monkeypatch.setenv("PRUNECOMP_VLLM_PYTHON", str(without))
    moved = copy_of(output, tmp_path / "moved")
    before = {p: p.read_bytes() for p in moved.rglob("*") if p.is_file()}
    result = invoke("export", str(moved), "--target", "vllm")
    assert result.exit_code == 2
    (line,) = errors(result)
    assert "the vllm target needs vllm" in line
    assert {p: p.read_bytes() for p in moved.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved", "python-no-vllm"]  # no staging or lock left


def test_export_waits_for_no_one_while_a_run_holds_the_output(output, tmp_path):
    from prunecomp_export.output.outputdir import OutputLock

    moved = copy_of(output, tmp_path / "moved")
    with OutputLock(moved):
        result = invoke("export", str(moved), "--target", "onnx")
    assert result.exit_code == 2
    (line,) = errors(result)
    assert "is being written by another run" in line


# --- serve ---------------------------------------------------------------------------------------


def test_serve_runs_the_server_on_the_checkpoint_with_the_recorded_options(output, monkeypatch):
    from prunecomp_export.targets import vllm

    calls = []
    monkeypatch.setattr(vllm, "preflight", lambda options: None)
    monkeypatch.setattr(vllm, "serve", lambda checkpoint, options: calls.append((checkpoint, options)) or 0)
    assert invoke("serve", str(output)).exit_code == 0
    assert invoke("serve", str(output), "--host", "0.0.0.0", "--port", "8123").exit_code == 0
    (checkpoint, default), (_, chosen) = calls
    assert checkpoint == output / "checkpoint"
    assert (default.host, default.port, default.max_new_tokens) == ("127.0.0.1", 0, 4)  # the recorded recipe's
    assert (chosen.host, chosen.port) == ("0.0.0.0", 8123)
    result = invoke("serve", str(output), "--port", "70000")
    assert result.exit_code == 2 and not calls[2:]


def test_serve_without_vllm_is_one_line(output, tmp_path, monkeypatch):
    without = tmp_path / "python-no-vllm"
    without.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    without.chmod(0o755)
    monkeypatch.setenv("PRUNECOMP_VLLM_PYTHON", str(without))
    result = invoke("serve", str(output))
    assert result.exit_code == 2
    (line,) = errors(result)
    assert line.startswith("prunecomp-export: error: the vllm target needs vllm")


# --- bench ---------------------------------------------------------------------------------------


def test_bench_times_the_output_against_its_source(output, tmp_path):
    moved = copy_of(output, tmp_path / "moved")
    result = invoke("bench", str(moved))
    assert result.exit_code == 0, result.output
    bench = json.loads((moved / "bench.json").read_text())
    assert {(row["runtime"], row["layers_removed"]) for row in bench["rows"]} == {("torch", 0), ("torch", 2)}
    results = json.loads((moved / "results.json").read_text())
    assert results["bench"] == bench
    assert [t["target"] for t in results["targets"]] == ["vllm"]  # kept from the output's manifest
    assert "bench.json" in json.loads((moved / "prunecomp_manifest.json").read_text())["files"]
    assert "speedup" in result.stdout
    assert invoke("verify", str(moved)).exit_code == 0
    assert not (moved / ".scratch").exists()


def test_bench_refuses_a_source_that_is_not_the_pruned_model(output, tmp_path):
    from prunecomp_export.output.manifest import read_manifest, write_manifest

    moved = copy_of(output, tmp_path / "moved")
    manifest = read_manifest(moved)
    source = manifest.source_model.model_copy(update={"sha256": "0" * 64})
    write_manifest(moved, manifest.model_copy(update={"source_model": source}))
    result = invoke("bench", str(moved))
    assert result.exit_code == 2
    (line,) = errors(result)
    assert "not the model this output was pruned from" in line
    assert not (moved / "bench.json").exists()
