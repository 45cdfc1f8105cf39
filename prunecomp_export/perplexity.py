"""Token-level perplexity with the paper's protocol: text joined with a blank line, tokenized
once, cut into non-overlapping windows, exp of the mean next-token NLL over all windows.

This is *token* perplexity; lm-evaluation-harness's ``wikitext`` task reports word and byte
perplexity per document, a different number.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from prunecomp_export.progress import Reporter

PROTOCOL = "token perplexity: joined with '\\n\\n', tokenized once, non-overlapping windows, exp(mean NLL)"


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, reporter: Reporter | None = None) -> float:
    total, count = 0.0, 0
    for batch in (reporter or Reporter()).track(windows.split(batch_size), "perplexity windows"):
        logits = model(input_ids=batch, use_cache=False).logits.float()
        total += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
