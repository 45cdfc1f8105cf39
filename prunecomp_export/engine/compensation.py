"""Prune&Comp's magnitude compensation: estimate the gap, fold it into the weights.

See docs in method.md section 2 and 3. alpha is one scalar per removal: the mean over channels of
the mean over sequences of the ratio of per-channel L1 magnitudes (mean |x| over tokens) of the
stream after and before the removed layer(s). Statistics and scaling are fp32.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from prunecomp_export.adapters import Adapter

FoldForm = Literal["pre_gap", "post_gap"]


@torch.no_grad()
def magnitude_gap(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """alpha = mean_c mean_s (mean_t |after[s,t,c]| / mean_t |before[s,t,c]|), in fp32."""
    m_before = torch.cat([x.float().abs().mean(dim=1) for x in before])  # [sequences, channels]
    m_after = torch.cat([x.float().abs().mean(dim=1) for x in after])
    alpha = (m_after / m_before).mean(dim=0).mean().item()
    if not torch.isfinite(torch.tensor(alpha)):
        raise ArithmeticError("the magnitude gap is not finite (a channel of the stream is all zeros)")
    return alpha


def fold(adapter: Adapter, model: nn.Module, gap: int, alpha: float, form: FoldForm) -> None:
    """Fold alpha into the weights around a gap; ``gap`` is the current index of the first layer
    after the removed one(s) (== number of layers when the last layer was removed).

    pre_gap: the embedding and every write before the gap times alpha, so the stream arriving at
    the gap is alpha times larger (exact: each layer reads the stream through a scale-free norm).
    post_gap: every write after the gap times 1/alpha; the stream is then 1/alpha times the
    pre-gap form's everywhere after the gap, which the final norm removes. Use it when the
    embedding is tied to the LM head, where scaling the embedding would scale the logits.
    """
    layers = adapter.layers(model)
    if alpha == 1.0 or gap >= len(layers):
        return  # nothing after the gap but the final norm, which ignores a uniform scale
    if form == "pre_gap":
        adapter.scale_embedding(model, alpha)
        for layer in layers[:gap]:
            adapter.scale_residual_writes(layer, alpha)
    elif form == "post_gap":
        for layer in layers[gap:]:
            adapter.scale_residual_writes(layer, 1.0 / alpha)
    else:
        raise ValueError(f"unknown fold form {form!r}")
