"""The residual stream at every layer boundary for the calibration batches, computed layer by layer.

Capturing runs the calibration set through the model one decoder layer at a time (each layer is
materialised once and applied to every batch), storing the input of every layer and of the final
norm in a ``StreamCache``. After a layer is removed only the layers after the gap are run again:
the stream before the gap is either untouched (post-gap fold) or exactly alpha times the cached
one (pre-gap fold, up to the RMSNorm epsilon), which the cache records as a factor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from prunecomp_export.engine.layerwise import LayerwiseModel, layer_output, trim_host_memory
from prunecomp_export.engine.stream_cache import StreamCache
from prunecomp_export.engine.variant import Variant
from prunecomp_export.progress import Reporter


@dataclass
class ResidualStreams:
    model: LayerwiseModel
    batches: list[torch.Tensor]
    cache: StreamCache
    #: the model as it stands: kept original layers and the factors folded so far
    variant: Variant
    #: layer_kwargs[b][original layer]: keyword arguments that layer receives for batch b
    layer_kwargs: list[list[dict]] = field(default_factory=list)
    layer_forwards: int = 0

    @property
    def adapter(self):
        return self.model.adapter

    @property
    def num_layers(self) -> int:
        return len(self.variant.kept)

    @torch.no_grad()
    def capture(self, reporter: Reporter | None = None) -> None:
        """Embed every batch, record each layer's call kwargs, and run all layers (layer-major)."""
        while len(self.cache):
            self.cache.delete(0)
        for _ in range(self.num_layers + 1):
            self.cache.insert(0)
        self.layer_kwargs = []
        for b, input_ids in enumerate(self.batches):
            hidden, kwargs = self.model.layer_inputs(input_ids, self.variant.embedding_scale)
            self.cache.put(0, b, hidden)
            self.layer_kwargs.append(kwargs)
        self.run_from(0, reporter)

    def apply(self, layer, k: int, b: int, hidden: torch.Tensor) -> torch.Tensor:
        self.layer_forwards += 1
        return layer_output(layer(hidden, **self.layer_kwargs[b][self.variant.kept[k]]))

    def layer(self, k: int):
        original = self.variant.kept[k]
        return self.model.layer(original, self.variant.writer_scale[k], k, self.variant.output_map_of(original))

    @torch.no_grad()
    def run_from(self, start: int, reporter: Reporter | None = None) -> None:
        """Recompute boundaries start+1..end from boundary ``start``, one layer at a time."""
        for k in (reporter or Reporter()).track(range(start, self.num_layers), "layers"):
            with self.layer(k) as layer:
                for b in range(len(self.batches)):
                    self.cache.put(k + 1, b, self.apply(layer, k, b, self.cache.get(k, b)))
        trim_host_memory()

    def boundary(self, k: int) -> Iterator[torch.Tensor]:
        """The stream entering current layer k (k == num_layers: entering the final norm), per batch."""
        return self.cache.batches(k)

    @torch.no_grad()
    def final_streams_from(self, k: int, first_layer: int) -> list[torch.Tensor]:
        """Run current layers first_layer.. on the streams at boundary ``k`` (bypassing those in between)."""
        hidden = list(self.boundary(k))
        for j in range(first_layer, self.num_layers):
            with self.layer(j) as layer:
                hidden = [self.apply(layer, j, b, h) for b, h in enumerate(hidden)]
        return hidden

    @torch.no_grad()
    def mlp_writes(self, k: int, batch_ids: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """For current layer k, per batch in ``batch_ids``: what its MLP adds to the stream, and the
        layer's output (the stream entering layer k+1). The layer is materialised once."""
        captured: list[torch.Tensor] = []

        def keep(_module, _inputs, output):
            captured.append(output[0] if isinstance(output, tuple) else output)

        with self.layer(k) as layer:
            handle = self.adapter.mlp_output_module(layer).register_forward_hook(keep)
            try:
                for b in batch_ids:
                    out = self.apply(layer, k, b, self.cache.get(k, b))
                    yield captured.pop().reshape(out.shape), out
            finally:
                handle.remove()

    @torch.no_grad()
    def probe_losses(self, probes: list[tuple[int, list[torch.Tensor]]], batch_ids: list[int]) -> list[float]:
        """Calibration loss on the batches ``batch_ids`` of each probe ``(first, streams)``: streams that
        enter current layer ``first`` and run through the rest of the model. Each layer is materialised
        once for all probes (the head too), so a streamed model reads its weights once per call."""
        hidden = [list(streams) for _first, streams in probes]
        for j in range(min((first for first, _ in probes), default=self.num_layers), self.num_layers):
            with self.layer(j) as layer:
                for p, (first, _streams) in enumerate(probes):
                    if first <= j:
                        hidden[p] = [self.apply(layer, j, b, h) for b, h in zip(batch_ids, hidden[p], strict=True)]
        batches = [self.batches[b] for b in batch_ids]
        with self.model.head(self.variant.embedding_scale, self.variant.untie) as logits_of:
            return [mean_nll(logits_of, batches, finals, self.model.logits_chunk) for finals in hidden]

    @torch.no_grad()
    def after_removal(
        self, index: int, count: int, variant: Variant, scale_before: float = 1.0, changed_before: bool = False
    ) -> None:
        """Layers index..index+count-1 were removed and ``variant`` is the model now: drop their
        outputs, rescale the stream before the gap (pre-gap fold) and rerun the layers after it
        (from the layer before the gap when its weights changed: a linear compensation map)."""
        for _ in range(count):
            self.cache.delete(index + 1)
        if scale_before != 1.0:
            for k in range(index + 1):
                self.cache.rescale(k, scale_before)
        self.variant = variant
        self.run_from(index - 1 if changed_before and index > 0 else index)

    @torch.no_grad()
    def lm_loss(self, final_streams: list[torch.Tensor] | None = None, batch_ids: list[int] | None = None) -> float:
        """Mean next-token NLL of the calibration tokens (of ``batch_ids``, default all), from the
        streams entering the final norm."""
        finals = final_streams if final_streams is not None else self.boundary(self.num_layers)
        batches = self.batches if batch_ids is None else [self.batches[b] for b in batch_ids]
        with self.model.head(self.variant.embedding_scale, self.variant.untie) as logits_of:
            return mean_nll(logits_of, batches, finals, self.model.logits_chunk)


def mean_nll(logits_of, batches: list[torch.Tensor], finals, chunk: int) -> float:
    """Mean next-token NLL over every token of ``batches``, from the streams entering the final norm,
    the head applied to ``chunk`` tokens at a time."""
    total, count = 0.0, 0
    for input_ids, hidden in zip(batches, finals, strict=True):
        nll, n = token_nll(logits_of, hidden, input_ids, chunk)
        total, count = total + nll, count + n
    return total / count


def next_token_positions(hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position that predicts a next token, flattened (tokens x hidden), and the tokens it predicts."""
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]), input_ids.to(hidden.device)[:, 1:].reshape(-1)


def token_nll(logits_of, hidden: torch.Tensor, input_ids: torch.Tensor, chunk: int) -> tuple[float, int]:
    """Sum of next-token NLL (fp32) and the token count. The logits are made ``chunk`` positions at a
    time (the memory plan sizes it): a 128k-token vocabulary makes a batch's logits far larger than
    its stream."""
    positions, targets = next_token_positions(hidden, input_ids)
    total = 0.0
    for start in range(0, positions.shape[0], chunk):
        logits = logits_of(positions[start : start + chunk])
        total += F.cross_entropy(logits.float(), targets[start : start + chunk], reduction="sum").item()
    return total, targets.numel()


@dataclass(frozen=True)
class Divergence:
    """How far a model's next-token distributions moved from the dense model's, over the tokens of a
    corpus: mean KL(dense || model) per token in nats, its 90th and 99th percentiles, and the share of
    tokens whose most likely next token is the dense model's (llama.cpp's ``--kl-divergence`` figures)."""

    mean_kl: float
    p90_kl: float
    p99_kl: float
    top1_agreement: float
    tokens: int

    @classmethod
    def of_tokens(cls, kl: torch.Tensor, agree: torch.Tensor) -> Divergence:
        """From every token's KL (nats) and whether its top-1 token is the dense model's."""
        kl = kl.double()
        p90, p99 = torch.quantile(kl, torch.tensor([0.9, 0.99], dtype=kl.dtype)).tolist()
        return cls(kl.mean().item(), p90, p99, agree.double().mean().item(), kl.numel())


def token_divergence(
    dense_logits_of: Callable[[torch.Tensor], torch.Tensor],
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    dense_hidden: torch.Tensor,
    hidden: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per next-token position: KL(dense || model) in nats (fp32), and whether both models' most
    likely token is the same. ``chunk`` is the engine's chunk of the head's output (the memory plan
    sizes it for ``memory.ENGINE_LOGIT_COPIES`` fp32 copies): both heads' log-probabilities are made
    for half of it at a time and their difference is taken in place, so that at most the plan's
    copies of ``chunk`` tokens exist at once and the vocabulary's log-probabilities are never held
    for more than one chunk."""
    width = hidden.shape[-1]
    dense_positions = dense_hidden.to(hidden.device)[:, :-1].reshape(-1, width)
    positions = hidden[:, :-1].reshape(-1, width)
    # The results go into tensors made before the loop: a small tensor kept alive between two chunks'
    # allocations is carved out of a freed chunk by the C allocator, so that the next chunk no longer
    # fits there and the heap grows by about a chunk per step (a 151k vocabulary grew a process by
    # 1.1 GB over one corpus this way).
    kl = torch.empty(positions.shape[0], dtype=torch.float32, device=hidden.device)
    agree = torch.empty(positions.shape[0], dtype=torch.bool, device=hidden.device)
    step = max(1, chunk // 2)
    for start in range(0, positions.shape[0], step):
        end = min(start + step, positions.shape[0])
        dense_log_p = F.log_softmax(dense_logits_of(dense_positions[start:end]), dim=-1, dtype=torch.float32)
        log_q = F.log_softmax(logits_of(positions[start:end]), dim=-1, dtype=torch.float32)
        torch.eq(dense_log_p.argmax(dim=-1), log_q.argmax(dim=-1), out=agree[start:end])
        difference = log_q.neg_().add_(dense_log_p)  # log p - log q, in log_q's memory
        torch.sum(difference.mul_(dense_log_p.exp_()), dim=-1, out=kl[start:end])
        del dense_log_p, log_q, difference
    return kl.clamp_min_(0.0).cpu(), agree.cpu()
