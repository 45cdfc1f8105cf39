"""The onnx target on the real pruned SmolLM2 checkpoint (fixture ``smollm2_pruned_dir``).

The target is built once (export, ONNX Runtime parity, onnxruntime-genai package); the tests then
check its record and recompute parity themselves with transformers' own KV cache and with unpadded
single-prompt runs, so they do not only trust the target's self-report.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torch
from transformers import AutoTokenizer

from prunecomp_export.targets import onnx as target

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Small language models are useful because they"]


@pytest.fixture(scope="module")
def built(smollm2_pruned_dir: Path, tmp_path_factory) -> tuple[Path, dict]:
    out_dir = tmp_path_factory.mktemp("smollm2-onnx")
    record = target.build(smollm2_pruned_dir, out_dir, target.Options(provider="cpu"))
    return out_dir, record


@pytest.fixture(scope="module")
def reference(smollm2_pruned_dir: Path):
    return target.load_hf_model(smollm2_pruned_dir)


@pytest.fixture(scope="module")
def decoder(built) -> target.OrtDecoder:
    return target.OrtDecoder(built[0] / target.ONNX_FILE, ["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def tokenizer(smollm2_pruned_dir: Path):
    return AutoTokenizer.from_pretrained(smollm2_pruned_dir)


def test_record_passes_every_check(built, smollm2_pruned_dir):
    out_dir, record = built
    assert record["passed"]
    assert set(record["checks"]) == {"prefill", "decode", "padded_batch"}
    for name, check in record["checks"].items():
        assert check["max_abs_diff"] <= record["tolerance"], name
    layers = json.loads((smollm2_pruned_dir / "config.json").read_text())["num_hidden_layers"]
    assert record["num_layers"] == layers
    assert (
        json.loads((out_dir / "genai" / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"]
        == layers
    )
    json.dumps(record)


def test_prefill_and_cached_decode_match_transformers_cache(decoder, reference, tokenizer):
    """Prefill, then 4 greedy decode steps, each side with its own KV cache (transformers'
    DynamicCache vs the runtime's present tensors)."""
    ids = tokenizer(PROMPTS[0], return_tensors="pt").input_ids
    length = ids.shape[1]
    with torch.no_grad():
        out = reference(input_ids=ids, use_cache=True)
    ort_logits, presents = decoder(ids.numpy(), np.ones((1, length), np.int64), np.arange(length)[None])
    np.testing.assert_allclose(ort_logits, out.logits.numpy(), atol=2e-3, rtol=0)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for step in range(4):
        total = length + step + 1
        with torch.no_grad():
            out = reference(input_ids=token, past_key_values=cache, use_cache=True)
        ort_logits, presents = decoder(token.numpy(), np.ones((1, total), np.int64), np.array([[total - 1]]), presents)
        np.testing.assert_allclose(ort_logits, out.logits.numpy(), atol=2e-3, rtol=0)
        assert presents[0].shape[2] == total
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)


def test_left_padded_batch_matches_each_prompt_alone(decoder, reference, tokenizer):
    """Padding must not leak: each row of a left-padded batch equals that prompt run alone."""
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    assert len(prompts[0]) != len(prompts[1])
    ids, mask, positions = target.left_pad(prompts, pad_id=tokenizer.pad_token_id or 0)
    batch_logits, _ = decoder(ids, mask, positions)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            alone = reference(input_ids=torch.tensor([prompt])).logits[0].numpy()
        np.testing.assert_allclose(batch_logits[row, -len(prompt) :], alone, atol=2e-3, rtol=0)


def test_genai_greedy_generation_equals_transformers(built, reference, tokenizer):
    import onnxruntime_genai as og

    out_dir, record = built
    assert record["genai"]["greedy"]["passed"]
    prompt = PROMPTS[1]  # not the prompt the target checked
    ids = tokenizer(prompt).input_ids
    model = og.Model(str(out_dir / "genai"))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 20)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    genai_tokens = [int(t) for t in generator.get_sequence(0)][len(ids) :]
    with torch.no_grad():
        hf = reference.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=20,
        )
    eos = tokenizer.eos_token_id
    assert until_eos(genai_tokens, eos) == until_eos(hf[0, len(ids) :].tolist(), eos)
    assert len(until_eos(genai_tokens, eos)) > 0


def until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens
