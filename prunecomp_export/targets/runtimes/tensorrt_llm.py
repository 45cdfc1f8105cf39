"""TensorRT-LLM through its ``LLM`` API (the PyTorch backend; its ``trtllm-build`` engine path was
removed in 2026), for 7B-70B models over several GPUs (``tensor_parallel_size``). It loads the plain
HF checkpoint as it is. ``generate`` runs it in a child process: greedy continuations with the
context (prompt) logits and the generation logits, from which the log-probabilities and the top-k
are computed here, the same way for every runtime.

Memory: ``kv_cache_config.free_gpu_memory_fraction`` is the share of what is free after the weights
loaded that the KV cache may take; the target sets it from the plan's device budget.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from prunecomp_export.errors import TargetUnavailable

INSTALL_HINT = "pip install tensorrt_llm (NVIDIA's wheel, on a Linux machine with NVIDIA GPUs and CUDA)"
SERVE_COMMAND = "trtllm-serve"


def require_tensorrt_llm(tensor_parallel_size: int) -> None:
    """TensorRT-LLM installed and ``tensor_parallel_size`` GPUs visible, without importing it (it
    starts MPI and CUDA on import)."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise TargetUnavailable(f"the tensorrt target with runtime tensorrt_llm needs TensorRT-LLM: {INSTALL_HINT}")
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < tensor_parallel_size:
        raise TargetUnavailable(
            f"TensorRT-LLM with tensor_parallel_size {tensor_parallel_size} needs {tensor_parallel_size} NVIDIA "
            f"GPU(s); torch sees {gpus}"
        )


def generate(
    checkpoint: str,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    top_k: int,
    engine: dict[str, Any],
) -> dict[str, Any]:
    """In a child process: ``LLM.generate`` on the prompt ids, greedy; a ``parity.RuntimeRun`` as JSON."""
    import numpy as np
    import tensorrt_llm
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm.llmapi import KvCacheConfig

    from prunecomp_export.targets.parity import Continuation, RuntimeRun
    from prunecomp_export.targets.runtimes.decoder import log_softmax, top_logprobs

    started = time.perf_counter()
    llm = LLM(
        model=checkpoint,
        tensor_parallel_size=engine["tensor_parallel_size"],
        dtype=engine["dtype"],
        kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=engine["kv_cache_free_gpu_memory_fraction"]),
    )
    engine_start_s = time.perf_counter() - started
    params = SamplingParams(
        max_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop_ids or None,
        return_context_logits=True, return_generation_logits=True,
    )  # fmt: skip
    outputs = llm.generate(prompt_ids, params)
    continuations = []
    for ids, output in zip(prompt_ids, outputs, strict=True):
        completion = output.outputs[0]
        context = log_softmax(np.asarray(output.context_logits.float().cpu()))
        generation = log_softmax(np.asarray(completion.generation_logits.float().cpu()))
        new_ids = [int(t) for t in completion.token_ids]
        continuations.append(
            Continuation(
                prompt_ids=list(ids),
                prompt_logprobs=[float(context[j, ids[j + 1]]) for j in range(len(ids) - 1)],
                new_ids=new_ids,
                new_logprobs=[float(generation[i, t]) for i, t in enumerate(new_ids)],
                new_top=[top_logprobs(generation[i], top_k) for i in range(len(new_ids))],
            )
        )
    llm.shutdown()
    run = RuntimeRun(runtime=f"TensorRT-LLM {tensorrt_llm.__version__}", dtype=engine["dtype"],
                     continuations=continuations)  # fmt: skip
    return {**run.model_dump(), "engine_start_s": engine_start_s}
