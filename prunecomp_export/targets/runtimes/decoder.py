"""Greedy generation with log-probabilities over a decoder called step by step with an explicit KV
cache (ONNX Runtime's session on the torch.onnx export, a TensorRT engine): the prompts run as one
left-padded batch (so padding is exercised), then one cached step per new token (so the runtime's
own cache is exercised)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from prunecomp_export.targets.parity import Continuation

#: ``step(input_ids, attention_mask, position_ids, past) -> (float32 logits [batch, seq, vocab], presents)``;
#: ``past=None`` is an empty cache
Step = Callable[..., tuple[np.ndarray, Any]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64."""
    values = np.asarray(logits, dtype=np.float64)
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_logprobs(logprobs: np.ndarray, k: int) -> dict[int, float]:
    """The ``k`` largest log-probabilities of one position, by token id."""
    ids = np.argpartition(-logprobs, k - 1)[:k]
    return {int(i): float(logprobs[i]) for i in ids}


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded ids, mask and position ids (pads at position 1, as transformers' generate does)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
    return ids, mask, positions


def greedy_continuations(
    step: Step,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    top_k: int,
    pad_id: int,
) -> list[Continuation]:
    """Each prompt's log-probabilities (from the batched prefill) and its greedy continuation (each
    token the argmax of the runtime's own logits), until a stop token or ``max_new_tokens``."""
    ids, mask, positions = left_pad(prompts, pad_id)
    width = ids.shape[1]
    logits, past = step(ids, mask, positions, None)
    logprobs = log_softmax(logits)
    stops = set(stop_ids)
    rows = []
    for row, prompt in enumerate(prompts):
        offset = width - len(prompt)
        prompt_logprobs = [float(logprobs[row, offset + j, prompt[j + 1]]) for j in range(len(prompt) - 1)]
        rows.append({"prompt_ids": list(prompt), "prompt_logprobs": prompt_logprobs, "new_ids": [],
                     "new_logprobs": [], "new_top": []})  # fmt: skip
    last = logprobs[:, -1]
    done = [False] * len(prompts)
    lengths = np.array([len(p) for p in prompts])
    for step_index in range(max_new_tokens):
        tokens = last.argmax(-1)
        for row, token in enumerate(tokens):
            if done[row]:
                continue
            rows[row]["new_ids"].append(int(token))
            rows[row]["new_logprobs"].append(float(last[row, token]))
            rows[row]["new_top"].append(top_logprobs(last[row], top_k))
            done[row] = int(token) in stops
        if all(done) or step_index == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        new_positions = (lengths + step_index)[:, None]
        logits, past = step(tokens[:, None].astype(np.int64), mask, new_positions, past)
        last = log_softmax(logits[:, -1])
    return [Continuation(**row) for row in rows]
