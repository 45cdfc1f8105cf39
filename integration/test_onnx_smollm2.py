"""The onnx target on the real pruned SmolLM2 checkpoint (fixture ``smollm2_pruned_dir``):
onnxruntime-genai's build in fp32 (exact) and int8 (within its measured tolerance) passes the parity
check; the torch.onnx path (families the builder does not cover) passes it too; a wrong model's
genai build fails it. The genai package's greedy tokens are recomputed here with transformers, so the
tests do not only trust the target's self-report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_genai")

import torch
from transformers import AutoTokenizer

from prunecomp_export.targets import TargetContext, parity
from prunecomp_export.targets import onnx as target

pytestmark = pytest.mark.slow

LLAMA = TargetContext(architecture="LlamaForCausalLM")


def build(checkpoint: Path, out: Path, **options):
    out.mkdir(parents=True)
    return target.TARGET.build(checkpoint, out, target.Options(provider="cpu", **options), LLAMA)


@pytest.fixture(scope="module")
def genai_fp32(smollm2_pruned_dir: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-onnx") / "onnx"
    return out, build(smollm2_pruned_dir, out)


def test_genai_fp32_build_is_exact(genai_fp32, smollm2_pruned_dir):
    out, record = genai_fp32
    assert record.passed, record.parity.summary()
    assert record.artifact["exporter"] == "genai" and record.parity.dtype == "float32"
    assert record.parity.max_abs_diff < 1e-3 and record.parity.divergences == []
    layers = json.loads((smollm2_pruned_dir / "config.json").read_text())["num_hidden_layers"]
    config = json.loads((out / "genai" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == layers


def test_genai_greedy_generation_equals_transformers(genai_fp32, smollm2_pruned_dir):
    import onnxruntime_genai as og
    from transformers import AutoModelForCausalLM

    out, _ = genai_fp32
    tokenizer = AutoTokenizer.from_pretrained(smollm2_pruned_dir)
    ids = tokenizer("Small language models are useful because they").input_ids  # not one of the checked prompts
    model = og.Model(str(out / "genai"))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 20)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    genai_tokens = [int(t) for t in generator.get_sequence(0)][len(ids) :]
    reference = AutoModelForCausalLM.from_pretrained(smollm2_pruned_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=20)  # fmt: skip
    eos = tokenizer.eos_token_id
    until = lambda tokens: tokens[: tokens.index(eos)] if eos in tokens else tokens  # noqa: E731
    assert until(genai_tokens) == until(hf[0, len(ids) :].tolist()) and len(until(genai_tokens)) > 0


def test_genai_int8_build_passes_within_its_tolerance(smollm2_pruned_dir, tmp_path):
    record = build(smollm2_pruned_dir, tmp_path / "onnx", dtype="int8")
    assert record.passed, record.parity.summary()
    assert record.parity.dtype == "int8" and record.parity.max_abs_diff > 1e-3  # quantised: not exact


def test_torch_onnx_export_passes(smollm2_pruned_dir, tmp_path):
    """The path for families onnxruntime-genai does not build: a KV-cache decoder in ONNX Runtime,
    the prompts as one left-padded batch, then cached steps."""
    record = build(smollm2_pruned_dir, tmp_path / "onnx", exporter="torch")
    assert record.passed, record.parity.summary()
    assert record.artifact["exporter"] == "torch" and record.parity.max_abs_diff < 1e-3
    assert record.parity.runtime.startswith("ONNX Runtime")


def test_a_genai_build_of_a_wrong_model_fails(smollm2_pruned_dir, smollm2_wrong_models, tmp_path):
    from prunecomp_export.child import ChildRequest, run_child

    wrong = smollm2_wrong_models["no compensation"]
    package = tmp_path / "genai"
    run_child(ChildRequest(name="genai build", target="prunecomp_export.targets.export.genai:build",
                           kwargs={"checkpoint": str(wrong), "out_dir": str(package), "precision": "fp32",
                                   "execution_provider": "cpu"}))  # fmt: skip
    options = parity.ParityOptions()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_pruned_dir)
    ids = [list(tokenizer(p)["input_ids"]) for p in options.prompts]
    stops = parity.stop_token_ids(smollm2_pruned_dir, tokenizer)
    from prunecomp_export.targets.runtimes.genai import generate

    run = parity.RuntimeRun.model_validate(generate(str(package), options.prompts, ids, 16, stops, 5, "float32"))
    report = parity.check(smollm2_pruned_dir, options.prompts, run, options, stops)
    assert not report.passed and report.mean_abs_diff > 10 * report.tolerance.mean_abs
