"""A stand-in ``tensorrt_llm`` package (``LLM``, ``SamplingParams``, ``llmapi.KvCacheConfig``) that
runs greedily with transformers in fp32 on the CPU and returns the context and generation logits as
TensorRT-LLM's ``LLM.generate`` does: the tensorrt target's TensorRT-LLM orchestration runs without
GPUs. The arguments ``LLM`` was given are written to ``$FAKE_TRTLLM_RECORD``."""

from __future__ import annotations

import textwrap
from pathlib import Path

PACKAGE = textwrap.dedent(
    """
    import json, os
    from types import SimpleNamespace

    __version__ = "0.0-fake"


    class SamplingParams:
        def __init__(self, max_tokens=32, temperature=None, stop_token_ids=None, **kwargs):
            self.max_tokens, self.stop_token_ids = max_tokens, set(stop_token_ids or [])


    class LLM:
        def __init__(self, model, tensor_parallel_size=1, dtype="auto", kv_cache_config=None, **kwargs):
            import torch
            from transformers import AutoModelForCausalLM

            with open(os.environ["FAKE_TRTLLM_RECORD"], "w") as record:
                json.dump({"model": model, "tensor_parallel_size": tensor_parallel_size, "dtype": dtype,
                           "free_gpu_memory_fraction": kv_cache_config.free_gpu_memory_fraction}, record)
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

        def generate(self, prompts, params):
            import torch

            outputs = []
            for ids in prompts:
                with torch.no_grad():
                    context = self.model(torch.tensor([ids])).logits[0]
                    new, logits = [], []
                    for _ in range(params.max_tokens):
                        last = self.model(torch.tensor([list(ids) + new])).logits[0, -1]
                        logits.append(last)
                        new.append(int(last.argmax()))
                        if new[-1] in params.stop_token_ids:
                            break
                completion = SimpleNamespace(token_ids=new, generation_logits=torch.stack(logits))
                outputs.append(SimpleNamespace(outputs=[completion], context_logits=context))
            return outputs

        def shutdown(self):
            pass
    """
)
LLMAPI = textwrap.dedent(
    """
    class KvCacheConfig:
        def __init__(self, free_gpu_memory_fraction=0.9, **kwargs):
            self.free_gpu_memory_fraction = free_gpu_memory_fraction
    """
)


def fake_tensorrt_llm(directory: Path) -> Path:
    """Write the stand-in package under ``directory``; returns the directory to put on PYTHONPATH."""
    package = directory / "fake-trtllm" / "tensorrt_llm"
    (package / "llmapi").mkdir(parents=True)
    (package / "__init__.py").write_text(PACKAGE)
    (package / "llmapi" / "__init__.py").write_text(LLMAPI)
    return package.parent
