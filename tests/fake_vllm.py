"""An interpreter with a stand-in ``vllm`` package whose offline API (``LLM``, ``SamplingParams``)
generates greedily with transformers: the vllm target's parity check passes on a tiny model without
starting vLLM (minutes on CPU). For tests that need the target's files (serve.sh), not vLLM itself."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

PACKAGE = textwrap.dedent(
    """
    from types import SimpleNamespace

    __version__ = "0.0-fake"


    class SamplingParams:
        def __init__(self, temperature=0.0, max_tokens=16):
            self.max_tokens = max_tokens


    class LLM:
        def __init__(self, model, dtype="float32", **kwargs):
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()

        def get_tokenizer(self):
            return self.tokenizer

        def generate(self, prompts, params, use_tqdm=False):
            import torch

            outputs = []
            for prompt in prompts:
                ids = torch.tensor([prompt["prompt_token_ids"]])
                out = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=params.max_tokens,
                    pad_token_id=0,
                )
                new = out[0, ids.shape[1]:].tolist()
                text = self.tokenizer.decode(new)
                outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=new, text=text)]))
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
