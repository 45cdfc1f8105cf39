"""One owner for the model variants of a run: the dense source, Prune&Comp after k removals and the
one-shot baseline at k. Each is a ``Variant`` of the source files; this class decides where it
lives: run layer by layer (perplexity, logits), or written as a plain checkpoint by tensor surgery
(the output, lm-eval, the bench). No variant is ever a copy of a model in memory.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from prunecomp_export.adapters import Adapter
from prunecomp_export.engine.layerwise import LayerwiseModel, layer_output
from prunecomp_export.engine.loop import Plan, Step, Trajectory, baseline_layers, steps_for, variant_of
from prunecomp_export.engine.streams import Divergence, mean_nll, token_divergence
from prunecomp_export.engine.variant import Variant, dense_variant, variant_after
from prunecomp_export.source.weights import SafetensorsCheckpoint


@dataclass
class WindowFigures:
    """A variant on a corpus' windows: token perplexity, its streams entering the final norm (per
    batch, kept for the dense model: the reference of every divergence) and its divergence from the
    dense model, when the dense streams were given."""

    perplexity: float
    finals: list[torch.Tensor]
    divergence: Divergence | None


@dataclass
class ModelVariants:
    directory: Path  # the plain safetensors source (a GGUF source's dequantised cache)
    checkpoint: SafetensorsCheckpoint
    config: object
    adapter: Adapter
    model: LayerwiseModel
    plan: Plan
    scratch: Path  # where temporary checkpoints go (inside the run's staging directory)

    # -- which variants -------------------------------------------------------------------------
    @property
    def dense(self) -> Variant:
        return dense_variant(self.plan.num_layers)

    def prunecomp(self, trajectory: Trajectory, layers_removed: int) -> Variant | None:
        """The run's model after ``layers_removed`` removals, if the run passed through that count."""
        steps = steps_for(trajectory, layers_removed)
        return None if steps is None else variant_of("prunecomp", self.plan, steps)

    def baseline(self, trajectory: Trajectory, layers_removed: int) -> Variant:
        """The paper's baseline: the same metric's one-shot choice, no compensation."""
        removed = baseline_layers(self.plan, trajectory, layers_removed)
        steps = [Step([i], 1.0) for i in removed]
        return variant_after("baseline", self.plan.num_layers, [(s.removed, s.alpha) for s in steps], None)

    # -- run layer by layer ---------------------------------------------------------------------
    @torch.no_grad()
    def final_streams(self, variant: Variant, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """The stream entering the final norm for each batch, running one layer at a time."""
        inputs = [self.model.layer_inputs(ids, variant.embedding_scale) for ids in batches]
        hidden = [h for h, _kwargs in inputs]
        for k, (original, scale) in enumerate(zip(variant.kept, variant.writer_scale, strict=True)):
            with self.model.layer(original, scale, k, variant.output_map_of(original)) as layer:
                hidden = [
                    layer_output(layer(h, **kwargs[original])) for h, (_h, kwargs) in zip(hidden, inputs, strict=True)
                ]
        return hidden

    @torch.no_grad()
    def logits(self, variant: Variant, input_ids: torch.Tensor) -> torch.Tensor:
        (hidden,) = self.final_streams(variant, [input_ids])
        flat = hidden.reshape(-1, hidden.shape[-1])
        chunk = self.model.logits_chunk
        with self.model.head(variant.embedding_scale, variant.untie) as logits_of:
            parts = [logits_of(flat[start : start + chunk]).cpu() for start in range(0, flat.shape[0], chunk)]
        return torch.cat(parts).reshape(*hidden.shape[:-1], -1)

    @torch.no_grad()
    def perplexity(self, variant: Variant, windows: torch.Tensor, batch_size: int) -> float:
        """Token perplexity over ``windows`` (the paper's protocol), exp of the mean next-token NLL."""
        return self.window_figures(variant, windows, batch_size).perplexity

    @torch.no_grad()
    def window_figures(
        self, variant: Variant, windows: torch.Tensor, batch_size: int, dense_finals: list[torch.Tensor] | None = None
    ) -> WindowFigures:
        """Token perplexity over ``windows`` and, given the dense model's streams entering the final norm
        for the same batches, the divergence from the dense model: the variant runs once for both."""
        batches = list(windows.split(batch_size))
        finals = self.final_streams(variant, batches)
        with self.model.head(variant.embedding_scale, variant.untie) as logits_of:
            perplexity = math.exp(mean_nll(logits_of, batches, finals, self.model.logits_chunk))
            divergence = None if dense_finals is None else self._divergence(variant, logits_of, dense_finals, finals)
        return WindowFigures(perplexity, finals, divergence)

    def _divergence(self, variant: Variant, logits_of, dense_finals, finals) -> Divergence:
        """KL(dense || variant) and top-1 agreement per token; the dense head is the variant's unless
        the variant scales a tied embedding (``tied_embedding: scale_tied``), then both are held."""
        tokens = []
        with ExitStack() as stack:
            same_head = not (self.model.tied and not variant.untie and variant.embedding_scale != 1.0)
            dense_logits_of = logits_of if same_head else stack.enter_context(self.model.head())
            for dense_hidden, hidden in zip(dense_finals, finals, strict=True):
                tokens.append(
                    token_divergence(dense_logits_of, logits_of, dense_hidden, hidden, self.model.logits_chunk)
                )
        kl, agree = (torch.cat(parts) for parts in zip(*tokens, strict=True))
        return Divergence.of_tokens(kl, agree)

    # -- write as a checkpoint ------------------------------------------------------------------
    def write(self, variant: Variant, directory: Path, max_shard_size: int | str = "5GB") -> None:
        from prunecomp_export.output.tensor_surgery import write_variant_checkpoint

        write_variant_checkpoint(self.checkpoint, self.config, self.adapter, variant, directory, max_shard_size)

    @contextmanager
    def materialised(self, variant: Variant) -> Iterator[Path]:
        """A plain checkpoint of ``variant`` for a tool that loads one (lm-eval, a bench worker),
        removed afterwards. The dense variant is the source directory itself."""
        if variant == replace(self.dense, name=variant.name):
            yield self.directory
            return
        self.scratch.mkdir(parents=True, exist_ok=True)
        directory = Path(tempfile.mkdtemp(prefix=f"{variant.name}-{variant.layers_removed}-", dir=self.scratch))
        try:
            self.write(variant, directory)
            yield directory
        finally:
            shutil.rmtree(directory, ignore_errors=True)
