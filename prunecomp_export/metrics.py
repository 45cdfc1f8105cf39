"""Layer-importance metrics, one registry. Every metric scores the current layers; the lowest
score is removed. Scores for protected layers may be skipped (NaN) when they are costly."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from prunecomp_export.registry import Registry
from prunecomp_export.streams import ResidualStreams, token_nll


@dataclass(frozen=True)
class MetricContext:
    streams: ResidualStreams
    #: current layer indices that may be removed; others need no score
    candidates: frozenset[int]

    @property
    def model(self):
        return self.streams.model

    @property
    def adapter(self):
        return self.streams.adapter


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    score: Callable[[MetricContext], list[float]]
    #: default protected original layers, given the number of layers (used when the recipe gives none)
    default_protected: Callable[[int], set[int]] = field(default=lambda n: set())
    #: block metrics choose a contiguous block once (one-shot) instead of scoring layers
    block: bool = False


METRICS: Registry[Metric] = Registry("metric")


def _keep_first4_last2(n: int) -> set[int]:
    return set(range(min(4, n))) | set(range(max(0, n - 2), n))


@torch.no_grad()
def _mean_cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean over all tokens of the cosine (over the hidden dim) between two streams."""
    total, count = 0.0, 0
    for x, y in zip(a, b, strict=True):
        cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
        total += cos.sum().item()
        count += cos.numel()
    return total / count


def block_influence(ctx: MetricContext) -> list[float]:
    """ShortGPT: 1 - cos(input, output) of each layer, averaged over tokens (cached streams)."""
    s = ctx.streams
    return [1.0 - _mean_cosine(s.boundary(k), s.boundary(k + 1)) for k in range(s.num_layers)]


def contiguous_cosine_blocks(streams: ResidualStreams, size: int) -> list[float]:
    """LLM-Streamline: for each start i, 1 - cos(input of layer i, input of layer i+size)."""
    return [
        1.0 - _mean_cosine(streams.boundary(i), streams.boundary(i + size))
        for i in range(streams.num_layers - size + 1)
    ]


def contiguous_cosine(ctx: MetricContext) -> list[float]:
    """Per-layer view of the block metric (size 1) for the record; selection uses the blocks."""
    return contiguous_cosine_blocks(ctx.streams, 1)


def layer_bypass_loss(ctx: MetricContext) -> list[float]:
    """SLEB: calibration NLL with each candidate layer bypassed; the least harmful goes first."""
    s = ctx.streams
    scores = [math.nan] * s.num_layers
    for k in sorted(ctx.candidates):
        total, count = 0.0, 0
        for b, input_ids in enumerate(s.batches):
            hidden = s.run_layers(b, k + 1, s.states[b][k])
            nll, n = token_nll(s.model, s.adapter, hidden, input_ids)
            total, count = total + nll, count + n
        scores[k] = total / count
    return scores


def _block_parameters(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The block's matrices and norm vectors (every parameter of the decoder layer)."""
    return list(layer.parameters())


def taylor_plus(ctx: MetricContext) -> list[float]:
    """Shortened-LLaMA Taylor+: per block, sum over its parameters of |w * dL/dw|, with the
    gradient accumulated over the calibration samples."""
    model, layers = ctx.model, ctx.adapter.layers(ctx.model)
    params = [p for layer in layers for p in _block_parameters(layer)]
    previous = [p.requires_grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            for input_ids in ctx.streams.batches:
                model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
                ctx.streams.layer_forwards += 3 * len(layers)  # forward + backward ~ 3 forwards
        scores = []
        for layer in layers:
            total = 0.0
            for p in _block_parameters(layer):
                if p.grad is not None:
                    total += (p.detach().float() * p.grad.float()).abs().sum().item()
            scores.append(total)
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in zip(model.parameters(), previous, strict=True):
            p.requires_grad_(flag)
    return scores


@torch.no_grad()
def magnitude_plus(ctx: MetricContext) -> list[float]:
    """Mag+: per block, the L1 mass of its weights (no data needed)."""
    return [
        sum(p.detach().float().abs().sum().item() for p in _block_parameters(layer))
        for layer in ctx.adapter.layers(ctx.model)
    ]


METRICS.add("block_influence", Metric("block_influence", "ShortGPT block influence (cosine)", block_influence))
METRICS.add(
    "contiguous_cosine",
    Metric("contiguous_cosine", "LLM-Streamline contiguous block (one shot)", contiguous_cosine, block=True),
)
METRICS.add(
    "ppl",
    Metric("ppl", "SLEB: calibration loss with the layer bypassed", layer_bypass_loss, lambda n: {0, n - 1}),
)
METRICS.add("taylor_plus", Metric("taylor_plus", "Shortened-LLaMA Taylor+", taylor_plus, _keep_first4_last2))
METRICS.add("magnitude_plus", Metric("magnitude_plus", "Weight L1 mass (Mag+)", magnitude_plus, _keep_first4_last2))
