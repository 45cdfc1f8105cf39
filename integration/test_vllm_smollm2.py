"""vLLM on the pruned SmolLM2: offline greedy tokens and the OpenAI server's answers equal transformers'.

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
from prunecomp_export.targets import vllm as target

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
OPTIONS = dict(max_new_tokens=MAX_NEW_TOKENS, max_model_len=1024, kv_cache_gib=1)


def _post(url: str, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        assert reply.status == 200
        return json.loads(reply.read())


def _hf_greedy_ids(checkpoint: Path, ids: list[int]) -> list[int]:
    """transformers' greedy new tokens after ``ids`` (stopping at EOS), float32 like the server."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    stops = target.stop_token_ids(checkpoint, tokenizer)
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
    return target.truncate_at_stop(out[0, len(ids) :].tolist(), stops)


def test_offline_greedy_tokens_equal_transformers(smollm2_pruned_dir: Path, tmp_path: Path):
    out = tmp_path / "vllm"
    record = target.build(smollm2_pruned_dir, out, target.Options(**OPTIONS))
    assert record["tokens_equal"] is True
    assert [row["prompt"] for row in record["prompts"]] == target.Options().prompts
    for row in record["prompts"]:
        assert row["tokens_equal"] and row["prompt_ids_equal"], row
        assert row["hf_tokens"] >= 1
    assert json.loads((out / target.CHECK_FILE).read_text())["tokens_equal"] is True
    script = (out / target.SERVE_SCRIPT).read_text()
    # the checkpoint is named relative to the script's own directory (an output can be moved)
    relative = os.path.relpath(smollm2_pruned_dir.resolve(), out.resolve())
    assert "--host" in script and "127.0.0.1" in script and f"/{relative} && pwd" in script
    assert (out / target.SERVE_SCRIPT).stat().st_mode & 0o111


@pytest.fixture(scope="module")
def server(smollm2_pruned_dir: Path) -> Iterator[str]:
    options = target.Options(**OPTIONS, served_model_name="smollm2-pruned")
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
    stops = target.stop_token_ids(smollm2_pruned_dir, tokenizer)
    assert target.truncate_at_stop(choice["token_ids"], stops) == expected
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
