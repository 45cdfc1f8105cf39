"""An interpreter with a stand-in ``vllm`` package whose offline API (``LLM``, ``SamplingParams``)
runs greedily with transformers in fp32 and reports log-probabilities the way vLLM does
(``prompt_logprobs``: None, then one dict per prompt token; ``logprobs``: a dict per new token of
the top-k and the chosen token): the vllm target's check runs on a tiny model without starting vLLM
(minutes on CPU). ``FAKE_VLLM_SCALE`` multiplies every logit, a runtime that computes another model."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

PACKAGE = textwrap.dedent(
    """
    import os
    from types import SimpleNamespace

    __version__ = "0.0-fake"


    class Logprob:
        def __init__(self, logprob):
            self.logprob = logprob


    class SamplingParams:
        def __init__(self, temperature=0.0, max_tokens=16, logprobs=None, prompt_logprobs=None, stop_token_ids=None,
                     **kwargs):
            self.max_tokens, self.logprobs, self.stop_token_ids = max_tokens, logprobs or 1, set(stop_token_ids or [])


    class LLM:
        def __init__(self, model, dtype="float32", max_model_len=None, **kwargs):
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model)
            torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()
            config = SimpleNamespace(dtype=torch_dtype, max_model_len=max_model_len or 2048)
            self.llm_engine = SimpleNamespace(model_config=config)
            self.scale = float(os.environ.get("FAKE_VLLM_SCALE", "1"))

        def get_tokenizer(self):
            return self.tokenizer

        def _logprobs(self, ids):
            import torch

            with torch.no_grad():
                logits = self.model(torch.tensor([ids])).logits[0].float() * self.scale
            return torch.log_softmax(logits, dim=-1)

        def generate(self, prompts, params, use_tqdm=False):
            outputs = []
            for prompt in prompts:
                ids = list(prompt["prompt_token_ids"])
                first = self._logprobs(ids)
                prompt_logprobs = [None] + [{t: Logprob(float(first[j, t]))} for j, t in enumerate(ids[1:])]
                new, steps = [], []
                for _ in range(params.max_tokens):
                    last = self._logprobs(ids + new)[-1]
                    values, indices = last.topk(params.logprobs)
                    token = int(indices[0])
                    steps.append({int(i): Logprob(float(v)) for i, v in zip(indices, values)})
                    new.append(token)
                    if token in params.stop_token_ids:
                        break
                completion = SimpleNamespace(token_ids=new, logprobs=steps, text=self.tokenizer.decode(new))
                outputs.append(SimpleNamespace(outputs=[completion], prompt_logprobs=prompt_logprobs))
            return outputs
    """
)


def fake_vllm_python(directory: Path) -> Path:
    """Write the stand-in package and an interpreter script that puts it first on the path."""
    package = directory / "fake-vllm" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(PACKAGE)
    python = directory / "python-fake-vllm"
    python.write_text(
        f'#!/bin/sh\nPYTHONPATH={package.parent}${{PYTHONPATH:+:$PYTHONPATH}} exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    return python
