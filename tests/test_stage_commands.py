"""An output outlives its run: every path in it is relative to it (it is staged, renamed, and may be
moved to another machine), and the stage commands (verify, export, serve, bench) act on it later."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from prunecomp_export.cli import main
from tests.fake_vllm import fake_vllm_python

RECIPE = """
model:
  source: {model}
calibration:
  source: text
  files: [{text}]
  num_samples: 2
  seq_len: 16
prune:
  num_drop: 2
targets:
  vllm: {{prompts: ["t5 t6 t7"], max_new_tokens: 4}}
output:
  dir: {out}
"""


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
    import json

    manifest = json.loads((output / "prunecomp_manifest.json").read_text())
    record = manifest["targets"]["vllm"]
    assert record["checkpoint"] == "checkpoint"
    assert record["serve_command"][record["serve_command"].index("--model") + 1] == "checkpoint"
    assert manifest["recipe"]["output"]["dir"] == "."
    assert json.loads((output / "results.json").read_text())["recipe"]["output"]["dir"] == "."
