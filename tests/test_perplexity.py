"""Token perplexity against an independent computation: a plain per-window loop."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from prunecomp_export.perplexity import perplexity
from tests.conftest import make_model


def test_perplexity_matches_a_plain_loop_over_windows():
    model = make_model("llama")
    windows = torch.randint(3, 128, (5, 20), generator=torch.Generator().manual_seed(0))
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0]
            for t in range(window.numel() - 1):
                nll += F.cross_entropy(logits[t], window[t + 1]).item()
                count += 1
    expected = math.exp(nll / count)
    # batch sizes that do and do not divide the number of windows
    for batch_size in (1, 2, 5):
        assert abs(perplexity(model, windows, batch_size) - expected) / expected < 1e-5
