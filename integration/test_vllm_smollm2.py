"""vLLM on the pruned SmolLM2: the vllm target's parity check passes in bf16 and stays exact in fp32;
a runtime given a wrong model (the compensation left out, two layers swapped) fails in every dtype;
the OpenAI server's answers equal transformers' greedy tokens.

Skipped (with the reason) only when the interpreter chosen for vLLM ($PRUNECOMP_VLLM_PYTHON, else
this one) has no vllm, and never in CI ($PRUNECOMP_REQUIRE_VLLM=1 turns that into an error).
The server binds 127.0.0.1 and the tests talk to it only there.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import vllm_version
from prunecomp_export.targets import TargetContext, parity
from prunecomp_export.targets import vllm as vllm_target
from prunecomp_export.targets.runtimes import vllm as target

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        vllm_version() is None,
        reason=f"vllm is not installed for {target.resolve_python()} ({target.PYTHON_ENV}): {target.INSTALL_HINT}",
    ),
]

MAX_NEW_TOKENS = 12
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
# Small context and KV cache: start-up and memory stay small on a 2-core CPU machine.
SETTINGS = dict(max_model_len=1024, kv_cache_gib=1)


def _post(url: str, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        assert reply.status == 200
        return json.loads(reply.read())


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    return next((ids[: i + 1] for i, token in enumerate(ids) if token in stops), ids)


def _hf_greedy_ids(checkpoint: Path, ids: list[int]) -> list[int]:
    """transformers' greedy new tokens after ``ids`` (up to and including a stop token), float32 like the server."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    stops = parity.stop_token_ids(checkpoint, tokenizer)
    inputs = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
        )
    return _until_stop(out[0, len(ids) :].tolist(), stops)


def _build(checkpoint: Path, out: Path, dtype: str):
    out.mkdir(parents=True)
    options = vllm_target.Options(dtype=dtype, **SETTINGS)
    return vllm_target.TARGET.build(checkpoint, out, options, TargetContext(architecture="LlamaForCausalLM"))


def test_bf16_passes_the_parity_check(smollm2_pruned_dir: Path, tmp_path: Path):
    """What used to fail by design (greedy-token equality in bf16): judged by log-probabilities and
    vLLM's own closeness rule, a correct bf16 deployment passes."""
    out = tmp_path / "targets" / "vllm"
    record = _build(smollm2_pruned_dir, out, "bfloat16")
    report = record.parity
    assert record.passed, report.summary()
    assert report.dtype == "bfloat16" and report.tokens_compared > 100
    assert 0 < report.max_abs_diff <= report.tolerance.max_abs
    assert all(p.tokenizer_match for p in report.prompts)
    for divergence in report.divergences:
        assert divergence.close
    assert json.loads((out / vllm_target.CHECK_FILE).read_text())["passed"] is True
    script = (out / vllm_target.SERVE_SCRIPT).read_text()
    relative = os.path.relpath(smollm2_pruned_dir.resolve(), out.resolve())
    assert "--dtype bfloat16" in script and f"/{relative} && pwd" in script


def test_fp32_stays_exact(smollm2_pruned_dir: Path, tmp_path: Path):
    record = _build(smollm2_pruned_dir, tmp_path / "targets" / "vllm", "float32")
    report = record.parity
    assert record.passed and report.divergences == [], report.summary()
    assert report.max_abs_diff < 1e-3 and report.tolerance.max_abs <= 0.005


def test_vllm_given_the_model_without_compensation_fails(smollm2_pruned_dir: Path, smollm2_wrong_models, tmp_path):
    """vLLM in bf16 serving the same layers removed without the compensation, judged against the
    reference of the checkpoint that should have been deployed."""
    from transformers import AutoTokenizer

    wrong = smollm2_wrong_models["no compensation"]
    options = vllm_target.Options(dtype="bfloat16", **SETTINGS)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_pruned_dir)
    prompt_ids = [list(tokenizer(p)["input_ids"]) for p in options.prompts]
    stops = parity.stop_token_ids(smollm2_pruned_dir, tokenizer)
    value = _vllm_generate(wrong, options, prompt_ids, stops)
    run = parity.RuntimeRun.model_validate({k: value[k] for k in parity.RuntimeRun.model_fields})
    report = parity.check(smollm2_pruned_dir, options.prompts, run, options, stops)
    assert not report.logprobs_passed, report.summary()
    assert report.mean_abs_diff > 2 * report.tolerance.mean_abs


def _vllm_generate(checkpoint: Path, options, prompt_ids, stops) -> dict:
    from prunecomp_export.child import ChildRequest, run_child

    request = ChildRequest(
        name="vLLM on a wrong model", target="prunecomp_export.targets.runtimes.vllm:generate",
        kwargs={"checkpoint": str(checkpoint), "prompts": options.prompts, "prompt_ids": prompt_ids,
                "max_new_tokens": options.max_new_tokens, "stop_ids": stops, "top_k": options.top_k,
                "engine": options.engine()},
        python=target.resolve_python(options), env=target.vllm_env(options),
    )  # fmt: skip
    return run_child(request).value


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("wrong", ["no compensation", "layers 3 and 4 swapped"])
def test_a_runtime_given_a_wrong_model_fails_in_every_dtype(smollm2_pruned_dir, smollm2_wrong_models, dtype, wrong):
    """transformers as the runtime (greedy, in ``dtype``) on each wrong model: the check fails it."""
    from tests.tiny_checkpoint import transformers_run

    options = parity.ParityOptions()
    stops = parity.stop_token_ids(smollm2_pruned_dir)
    run = transformers_run(smollm2_wrong_models[wrong], options.prompts, dtype=dtype, max_new_tokens=16,
                           stop_ids=stops)  # fmt: skip
    report = parity.check(smollm2_pruned_dir, options.prompts, run, options, stops)
    assert not report.passed and not report.logprobs_passed, report.summary()


@pytest.fixture(scope="module")
def server(smollm2_pruned_dir: Path) -> Iterator[str]:
    options = target.Settings(**SETTINGS, served_model_name="smollm2-pruned")
    with target.running_server(smollm2_pruned_dir, options) as url:
        assert url.startswith("http://127.0.0.1:")
        yield url


def test_server_completion_equals_transformers_greedy(server: str, smollm2_pruned_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_pruned_dir)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected = _hf_greedy_ids(smollm2_pruned_dir, prompt_ids)
    reply = _post(
        f"{server}/v1/completions",
        {
            "model": "smollm2-pruned",
            "prompt": PROMPT,
            "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0,
            "return_token_ids": True,
        },
    )
    choice = reply["choices"][0]
    assert choice["prompt_token_ids"] == prompt_ids
    stops = parity.stop_token_ids(smollm2_pruned_dir, tokenizer)
    assert _until_stop(choice["token_ids"], stops) == expected
    assert choice["text"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_server_chat_completion_applies_the_chat_template(server: str, smollm2_pruned_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_pruned_dir)
    assert tokenizer.chat_template, "the saved tokenizer lost its chat template"
    # What vLLM does: render the template to text, then tokenize without adding special tokens.
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    expected = _hf_greedy_ids(smollm2_pruned_dir, prompt_ids)
    reply = _post(
        f"{server}/v1/chat/completions",
        {"model": "smollm2-pruned", "messages": CHAT, "max_tokens": MAX_NEW_TOKENS, "temperature": 0},
    )
    assert reply["usage"]["prompt_tokens"] == len(prompt_ids)
    message = reply["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
    assert message["content"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_server_lists_the_served_model(server: str):
    with urllib.request.urlopen(f"{server}/v1/models", timeout=30) as reply:
        models = json.loads(reply.read())
    assert [m["id"] for m in models["data"]] == ["smollm2-pruned"]
