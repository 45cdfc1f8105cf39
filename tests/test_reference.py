"""The reference cannot drift: README.md's tables of recipe keys, target options, exit codes and
environment variables are what the models and the CLI generate; every key is documented; every
environment variable the code reads is listed; no file cites a document the repository lacks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from click.testing import CliRunner
from pydantic import BaseModel

from prunecomp_export import reference
from prunecomp_export.cli import ENVIRONMENT, EXIT_CODES, main

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_reference_is_what_the_models_generate():
    assert reference.main(["--check"]) == 0, "run: python -m prunecomp_export.reference"


def test_the_check_fails_on_a_stale_readme(tmp_path, monkeypatch):
    stale = tmp_path / "README.md"
    stale.write_text(
        reference.README.read_text().replace("| `prune.num_drop` | `null` |", "| `prune.num_drop` | `3` |")
    )
    monkeypatch.setattr(reference, "README", stale)
    assert reference.main(["--check"]) == 1
    assert reference.main([]) == 0 and reference.main(["--check"]) == 0  # regenerated


def _models() -> list[type[BaseModel]]:
    from prunecomp_export.recipe import Recipe
    from prunecomp_export.targets import TARGETS, load_target

    pending = [Recipe, *(load_target(name).Options for name in TARGETS.names())]
    seen: list[type[BaseModel]] = []
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.append(model)
        for info in model.model_fields.values():
            nested = reference._nested(info.annotation)
            if nested is not None:
                pending.append(nested)
    return seen


def test_every_key_is_documented_with_its_default():
    undocumented = [
        f"{model.__name__}.{name}"
        for model in _models()
        for name, info in model.model_fields.items()
        if not (info.description or "").strip()
    ]
    assert undocumented == []
    text = reference.README.read_text()
    assert "| `bench.busy_load_per_core` | `0.25` |" in text
    assert "| `targets.vllm.startup_timeout_s` | `900.0` |" in text
    assert "| `targets.tensorrt.past.min` | required |" in text


def test_help_lists_the_exit_codes_and_the_environment():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for code in EXIT_CODES:
        assert re.search(rf"^\s+{code}\s+\S", result.output, re.MULTILINE), code
    for name in ENVIRONMENT:
        assert name in result.output
    assert set(EXIT_CODES) == {0, 1, 2, 3, 130}


def _tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / name for name in listed.splitlines() if (ROOT / name).is_file()]


def test_every_environment_variable_the_code_reads_is_listed():
    pattern = re.compile(r"""environ(?:\.get)?[\[(]\s*["']([A-Z_]+)["']|(?:ENV|REQUIRE_VLLM)\s*=\s*["']([A-Z_]+)["']""")
    read = set()
    for path in _tracked_files():
        if path.suffix == ".py" and path.parts[len(ROOT.parts)] in ("prunecomp_export", "integration"):
            read |= {a or b for a, b in pattern.findall(path.read_text())}
    assert {"PRUNECOMP_CACHE", "PRUNECOMP_VLLM_PYTHON", "PRUNECOMP_REQUIRE_VLLM"} <= read  # the scan finds them
    set_for_children = {"VLLM_ALLOW_INSECURE_SERIALIZATION", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}
    assert read - set_for_children - set(ENVIRONMENT) == set()


#: documents an output holds, written by the tool (not files of this repository)
WRITTEN = {"report.md"}


def test_no_file_cites_a_document_the_repository_lacks():
    files = _tracked_files()
    names = {path.name for path in files}
    cited = {}
    for path in files:
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for name in re.findall(r"[\w./-]+\.md\b", text):
            cited.setdefault(Path(name).name, path.relative_to(ROOT).as_posix())
    missing = {name: where for name, where in cited.items() if name not in names and name not in WRITTEN}
    assert missing == {}
