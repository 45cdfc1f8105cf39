"""Every bad recipe ends with one line naming the file and key path, exit code 2, nothing written."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from prunecomp_export.cli import main

GOOD = """
model:
  source: {model}
calibration:
  source: text
  files: [{text}]
  num_samples: 2
  seq_len: 16
prune:
  num_drop: 2
output:
  dir: {out}
"""


@pytest.fixture
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint on disk (config + safetensors + tokenizer)."""
    from tests.conftest import make_model
    from tests.test_checkpoint import tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny")
    make_model("llama").save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def write(tmp_path: Path, text: str, tiny_dir: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"t{i % 100 + 3}" for i in range(400)))
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text).format(model=tiny_dir, text=corpus, out=tmp_path / "out"))
    return path


CASES = [
    # (change to the good recipe, expected fragment of the one-line message)
    (
        ("prune:\n  num_drop: 2", "prune:\n  num_drop: 2\n  metirc: ppl"),
        "prune.metirc: unknown key (did you mean 'metric'?)",
    ),
    (("prune:\n  num_drop: 2", "prune:\n  num_drop: two"), "prune.num_drop: Input should be a valid integer"),
    (("prune:\n  num_drop: 2", "prune:\n  num_drop: -1"), "prune.num_drop: Input should be greater than 0"),
    (("prune:\n  num_drop: 2", "prune:\n  num_drop: 9"), "prune.num_drop: asks to remove 9 layers but the model has 6"),
    (("prune:\n  num_drop: 2", "prune:\n  num_drop: 2\n  ratio: 0.5"), "give exactly one of prune.num_drop"),
    (("prune:\n  num_drop: 2", "prune:\n  ratio: 1.5"), "prune.ratio: Input should be less than 1"),
    (("prune:\n  num_drop: 2", "prune:\n  num_drop: 2\n  metric: blockinfluence"), "did you mean 'block_influence'"),
    (("prune:\n  num_drop: 2", "prune:\n  drop_layers: [1, 7]"), "prune.drop_layers: layer 7 does not exist"),
    (("prune:\n  num_drop: 2", "prune:\n  num_drop: 2\n  schedule: sometimes"), "prune.schedule: Input should be"),
    (("files: [{text}]", "files: [/nonexistent/corpus.txt]"), "calibration.files.0: file not found"),
    (("calibration:\n  source: text", "calibration:\n  source: builtin\n  corpus: wikk"), "calibration.corpus"),
    (("source: {model}", "source: /nonexistent/model.gguf"), "model.source: file not found"),
    (("source: {model}", "source: {model}\n  dtype: float8"), "model.dtype: Input should be"),
    (("model:\n  source: {model}\n", ""), "model: required key is missing"),
    (("output:", "targets:\n  onnxx: {{}}\noutput:"), "targets: Value error, unknown target 'onnxx'"),
]


@pytest.mark.parametrize(("change", "expected"), CASES, ids=[c[1][:40] for c in CASES])
def test_bad_recipe_gives_one_line_and_exit_2(tmp_path, tiny_dir, change, expected):
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1), tiny_dir)
    result = CliRunner().invoke(main, [str(path), "--dry-run"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("prunecomp-export: error: ")
    assert expected.replace("Value error, ", "") in lines[0], lines[0]
    if "calibration" not in expected and "targets" not in expected:
        assert str(path) in lines[0] or "model.source" in lines[0] or "prune." in lines[0]
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_supported_ones(tmp_path, tiny_dir):
    import json

    config = json.loads((tiny_dir / "config.json").read_text())
    other = tmp_path / "gpt2ish"
    other.mkdir()
    for item in tiny_dir.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (other / "config.json").write_text(json.dumps(config))
    path = write(tmp_path, GOOD, other)
    result = CliRunner().invoke(main, [str(path), "--dry-run"])
    assert result.exit_code == 2
    assert "unsupported architecture 'gpt2'" in result.output
    assert "gemma2, gemma3_text, llama, mistral, mixtral, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe" in result.output


def test_unknown_target_and_missing_file(tmp_path, tiny_dir):
    path = write(tmp_path, GOOD, tiny_dir)
    result = CliRunner().invoke(main, [str(path), "--target", "vllmm", "--dry-run"])
    assert result.exit_code == 2 and "did you mean 'vllm'" in result.output
    result = CliRunner().invoke(main, [str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml: recipe file not found" in result.output


def test_set_override_is_validated_like_the_file(tmp_path, tiny_dir):
    path = write(tmp_path, GOOD, tiny_dir)
    result = CliRunner().invoke(main, [str(path), "--dry-run", "--set", "prune.num_drop=0"])
    assert result.exit_code == 2 and "prune.num_drop: Input should be greater than 0" in result.output
    result = CliRunner().invoke(main, [str(path), "--dry-run", "--set", "prune.num_drop=3"])
    assert result.exit_code == 0, result.output
    assert "6 -> 3" in result.output


def test_full_run_on_a_tiny_model_writes_a_complete_output(tmp_path, tiny_dir):
    import json

    path = write(tmp_path, GOOD + "evaluation:\n  perplexity:\n    corpora: [{text}]\n    seq_len: 16\n", tiny_dir)
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint",
        "prunecomp_manifest.json",
        "recipe.resolved.yaml",
        "report.html",
        "report.md",
        "results.json",
        "trajectory.json",
    ]
    manifest = json.loads((out / "prunecomp_manifest.json").read_text())
    assert manifest["layers_after"] == 4
    assert len(manifest["removed"]) == 2 and all("alpha" in r for r in manifest["removed"])
    assert "checkpoint/model.safetensors" in manifest["files"]
    assert manifest["source_model"]["sha256"]
    results = json.loads((out / "results.json").read_text())
    corpus = str(tmp_path / "corpus.txt")
    variants = {m["variant"] for m in results["measurements"] if m["dataset"] == corpus}
    assert variants == {"dense", "baseline", "prunecomp"}
    # a second run refuses to overwrite, and leaves the first output as it was
    again = CliRunner().invoke(main, [str(path)])
    assert again.exit_code == 2 and "output.dir" in again.output
    assert (out / "checkpoint" / "model.safetensors").is_file()
