"""onnxruntime-genai's generator on a package built by its model builder (``export/genai.py``):
``generate`` runs each prompt through ``og.Generator`` (the prefill's logits give the prompt's
log-probabilities, then one ``generate_next_token`` per new token, greedy) in a child process."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path
from typing import Any

from prunecomp_export.errors import TargetUnavailable

INSTALL_HINT = "pip install 'onnxruntime-genai>=0.18' (onnxruntime-genai-cuda on a CUDA machine)"


def require_genai() -> Any:
    """Import onnxruntime_genai, or say how to install it."""
    try:
        return importlib.import_module("onnxruntime_genai")
    except ImportError as exc:
        raise TargetUnavailable(
            f"the onnx target's genai build needs onnxruntime-genai ({exc}): {INSTALL_HINT}"
        ) from exc


def genai_version() -> str:
    for name in ("onnxruntime-genai", "onnxruntime-genai-cuda"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def generate(
    package: str,
    prompts: list[str],
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    top_k: int,
    dtype: str,
) -> dict[str, Any]:
    """In a child process: each prompt's log-probabilities and greedy continuation in genai, and how
    genai's own tokenizer encodes the prompt; a ``parity.RuntimeRun`` as JSON."""
    import numpy as np

    from prunecomp_export.targets.parity import Continuation, RuntimeRun
    from prunecomp_export.targets.runtimes.decoder import log_softmax, top_logprobs

    og = require_genai()
    model = og.Model(str(Path(package)))
    tokenizer = og.Tokenizer(model)
    stops = set(stop_ids)
    continuations = []
    for text, ids in zip(prompts, prompt_ids, strict=True):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, num_beams=1, max_length=len(ids) + max_new_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        prefill = log_softmax(generator.get_output("logits")[0])
        new_ids: list[int] = []
        new_logprobs: list[float] = []
        new_top: list[dict[int, float]] = []
        while len(new_ids) < max_new_tokens and not generator.is_done():
            logprobs = log_softmax(generator.get_logits()[0, -1])
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            new_ids.append(token)
            new_logprobs.append(float(logprobs[token]))
            new_top.append(top_logprobs(logprobs, top_k))
            if token in stops:
                break
        continuations.append(
            Continuation(
                prompt_ids=list(ids),
                runtime_prompt_ids=[int(t) for t in tokenizer.encode(text)],
                prompt_logprobs=[float(prefill[j, ids[j + 1]]) for j in range(len(ids) - 1)],
                new_ids=new_ids,
                new_logprobs=new_logprobs,
                new_top=new_top,
            )
        )
        del generator
    return RuntimeRun(runtime=f"onnxruntime-genai {genai_version()}", dtype=dtype,
                      continuations=continuations).model_dump()  # fmt: skip
