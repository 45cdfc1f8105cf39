"""Prune&Comp's magnitude compensation: estimate the gap, fold it into the weights.

See the paper (Prune&Comp, arXiv 2507.18212) and README.md, "How it works". alpha is one scalar per
removal: the mean over channels of the mean over sequences of the ratio of per-channel L1 magnitudes
(mean |x| over tokens) of the stream after and before the removed layer(s). Statistics and scaling
are fp32.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from prunecomp_export.adapters import Adapter

FoldForm = Literal["pre_gap", "post_gap"]


@torch.no_grad()
def magnitude_gap(before: Iterable[torch.Tensor], after: Iterable[torch.Tensor]) -> float:
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


@torch.no_grad()
def fit_output_map(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], ridge: float) -> torch.Tensor:
    """The d x d map T (float64) minimising sum |M T - Y|^2 + lam |T - I|^2 over the tokens of every
    (M, Y) pair, lam = ridge * trace(M^T M) / d: the normal equations, accumulated batch by batch.

    M is the last kept layer's MLP output, Y what it must write so that the stream after it equals the
    stream after the removed layer(s). The ridge pulls T towards the identity (no compensation), not
    towards zero: a small calibration set then leaves the map close to the unpruned write."""
    gram = cross = None
    for m, y in pairs:
        m = m.reshape(-1, m.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).to(m)
        gram = m.T @ m if gram is None else gram.add_(m.T @ m)
        cross = m.T @ y if cross is None else cross.add_(m.T @ y)
    if gram is None:
        raise ValueError("no calibration tokens to fit the map on")
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    lam = ridge * gram.diagonal().mean()
    return torch.linalg.solve(gram + lam * eye, cross + lam * eye)


def scalar_candidates(alpha: float) -> list[float]:
    """Scalars a fitted compensation tries: none (1), the paper's alpha, and points between and
    beyond them on the line 1 + s (alpha - 1)."""
    return [1.0 + s * (alpha - 1.0) for s in (-0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5)]


def refine_minimum(points: list[tuple[float, float]]) -> float | None:
    """The vertex of the parabola through the best (x, loss) point and its two neighbours, if the
    best is interior and the parabola opens upwards; None otherwise."""
    points = sorted(points)
    best = min(range(len(points)), key=lambda i: points[i][1])
    if best in (0, len(points) - 1):
        return None
    (x0, y0), (x1, y1), (x2, y2) = points[best - 1 : best + 2]
    denominator = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denominator
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denominator
    if a <= 0:
        return None
    return min(max(-b / (2 * a), x0), x2)
