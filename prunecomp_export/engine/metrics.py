"""Layer-importance metrics, one registry. Every metric scores the current layers; the lowest
score is removed. Scores for protected layers may be skipped (NaN) when they are costly."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from prunecomp_export.engine.streams import ResidualStreams, next_token_positions
from prunecomp_export.registry import Registry


@dataclass(frozen=True)
class RemovalProbe:
    """What removing current layer k with the run's compensation does: ``start(k)`` gives the
    streams entering layer k+1 (its index and one stream per batch of ``batch_ids``)."""

    start: Callable[[int], tuple[int, list[torch.Tensor]]]
    batch_ids: list[int]
    #: candidates run through the model together (each holds its streams; a pass reads every layer once)
    group: int = 8


@dataclass(frozen=True)
class MetricContext:
    streams: ResidualStreams
    #: current layer indices that may be removed; others need no score
    candidates: frozenset[int]
    removal: RemovalProbe | None = None


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
        scores[k] = s.lm_loss(s.final_streams_from(k, k + 1))
    return scores


def compensated_loss(ctx: MetricContext) -> list[float]:
    """Calibration loss (on a bounded subset of the batches) after removing each candidate layer with
    the run's compensation: SLEB's criterion, seeing what the removal costs once compensated."""
    s, removal = ctx.streams, ctx.removal
    scores = [math.nan] * s.num_layers
    candidates = sorted(ctx.candidates)
    for at in range(0, len(candidates), removal.group):
        group = candidates[at : at + removal.group]
        for k, loss in zip(group, s.probe_losses([removal.start(k) for k in group], removal.batch_ids), strict=True):
            scores[k] = loss
    return scores


def _l1_grad_product(layer: torch.nn.Module) -> float:
    params = [p for p in layer.parameters() if p.grad is not None]
    return sum((p.detach().float() * p.grad.float()).abs().sum().item() for p in params)


def taylor_plus(ctx: MetricContext) -> list[float]:
    """Shortened-LLaMA Taylor+: per block, sum over its parameters of |w * dL/dw|, with the gradient
    of each batch's mean next-token loss accumulated over the calibration batches.

    Backpropagated one layer at a time from the cached streams (each layer's forward is recomputed
    with gradients on), so the whole model never needs to be resident."""
    s = ctx.streams
    grads: list[torch.Tensor] = []
    chunk = s.model.logits_chunk
    with s.model.head(s.variant.embedding_scale, s.variant.untie) as logits_of, torch.enable_grad():
        for input_ids, hidden in zip(s.batches, s.boundary(s.num_layers), strict=True):
            hidden = hidden.detach().requires_grad_(True)
            positions, targets = next_token_positions(hidden, input_ids)
            # the batch's mean loss, backpropagated a chunk of tokens at a time (the head's output for
            # the whole batch never exists): the gradients of the chunks add up to the mean's
            for start in range(0, targets.numel(), chunk):
                logits = logits_of(positions[start : start + chunk])
                loss = F.cross_entropy(logits, targets[start : start + chunk], reduction="sum") / targets.numel()
                loss.backward()
            grads.append(hidden.grad)
    scores = [0.0] * s.num_layers
    for k in reversed(range(s.num_layers)):
        with s.layer(k) as layer, torch.enable_grad():
            for p in layer.parameters():
                p.requires_grad_(True)
            for b, hidden in enumerate(s.boundary(k)):
                hidden = hidden.detach().requires_grad_(True)
                s.apply(layer, k, b, hidden).backward(grads[b])
                s.layer_forwards += 2  # the backward costs about two forwards
                grads[b] = hidden.grad
            scores[k] = _l1_grad_product(layer)
            for p in layer.parameters():
                p.grad = None
                p.requires_grad_(False)
    return scores


@torch.no_grad()
def magnitude_plus(ctx: MetricContext) -> list[float]:
    """Mag+: per block, the L1 mass of its weights as they stand (compensation folded in; no data)."""
    s = ctx.streams
    scores = []
    for k in range(s.num_layers):
        with s.layer(k) as layer:
            scores.append(sum(p.float().abs().sum().item() for p in layer.parameters()))
    return scores


METRICS.add("block_influence", Metric("block_influence", "ShortGPT block influence (cosine)", block_influence))
METRICS.add(
    "contiguous_cosine",
    Metric("contiguous_cosine", "LLM-Streamline contiguous block (one shot)", contiguous_cosine, block=True),
)
METRICS.add(
    "ppl",
    Metric("ppl", "SLEB: calibration loss with the layer bypassed", layer_bypass_loss, lambda n: {0, n - 1}),
)
METRICS.add(
    "compensated_loss",
    Metric("compensated_loss", "calibration loss after the removal with its compensation", compensated_loss),
)
METRICS.add("taylor_plus", Metric("taylor_plus", "Shortened-LLaMA Taylor+", taylor_plus, _keep_first4_last2))
METRICS.add("magnitude_plus", Metric("magnitude_plus", "Weight L1 mass (Mag+)", magnitude_plus, _keep_first4_last2))
