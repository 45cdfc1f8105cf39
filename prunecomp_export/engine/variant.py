"""A model variant: what a dense source becomes after some recorded steps, as data.

Every variant of a run (the dense model, Prune&Comp after k removals, the one-shot baseline) is the
source's tensors with some layers left out and some tensors multiplied by a factor. Describing it
this way lets the streamed engine, the evaluator and the checkpoint writer all derive it from the
source files, without a model in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from prunecomp_export.engine.compensation import FoldForm

#: a fitted linear compensation: (original layer, d x d map T its MLP output is multiplied by)
OutputMap = tuple[int, torch.Tensor]


@dataclass(frozen=True)
class Variant:
    """``kept``: original layer indices, in order; ``writer_scale[i]`` multiplies the residual writes
    of layer ``kept[i]``; ``embedding_scale`` multiplies the token embedding (pre-gap fold);
    ``untie``: a tied source gets its own LM head, the unscaled embedding; ``output_maps``: layers whose
    MLP output is multiplied by a d x d map (linear compensation), folded into their down projection."""

    name: str
    num_layers: int
    kept: tuple[int, ...]
    writer_scale: tuple[float, ...]
    embedding_scale: float = 1.0
    untie: bool = False
    output_maps: tuple[OutputMap, ...] = field(default=(), compare=False)

    @property
    def layers_removed(self) -> int:
        return self.num_layers - len(self.kept)

    @property
    def removed(self) -> list[int]:
        kept = set(self.kept)
        return [i for i in range(self.num_layers) if i not in kept]

    def scale_of(self, original_layer: int) -> float:
        return self.writer_scale[self.kept.index(original_layer)]

    def output_map_of(self, original_layer: int) -> torch.Tensor | None:
        return next((t for layer, t in self.output_maps if layer == original_layer), None)


def dense_variant(num_layers: int) -> Variant:
    return Variant("dense", num_layers, tuple(range(num_layers)), (1.0,) * num_layers)


def variant_after(
    name: str,
    num_layers: int,
    steps: Sequence[tuple[Sequence[int], float] | tuple[Sequence[int], float, OutputMap | None]],
    fold_form: FoldForm | None,
    untie: bool = False,
) -> Variant:
    """Apply steps ``(removed original layers (contiguous among the current ones), alpha[, output map])``
    in order, exactly as the in-memory fold does: pre_gap multiplies the embedding and every current layer
    before the gap by alpha, post_gap every current layer after it by 1/alpha; no fold when the gap
    is at the end (only the final norm follows, which ignores a uniform scale). Factors compound in
    float64 and are applied once, in fp32, to the stored tensors."""
    current = list(range(num_layers))
    scale = dict.fromkeys(current, 1.0)
    embedding = 1.0
    maps: dict[int, torch.Tensor] = {}
    for removed, alpha, *rest in steps:
        if rest and rest[0] is not None:
            layer, t = rest[0]
            maps[layer] = maps[layer] @ t if layer in maps else t  # M T0, then (M T0) T1
        first = current.index(removed[0])
        if current[first : first + len(removed)] != list(removed):
            raise ValueError(f"step {list(removed)} is not a run of current layers")
        del current[first : first + len(removed)]
        if fold_form is None or alpha == 1.0 or first >= len(current):
            continue
        if fold_form == "pre_gap":
            embedding *= alpha
            for layer in current[:first]:
                scale[layer] *= alpha
        else:
            for layer in current[first:]:
                scale[layer] /= alpha
    kept_maps = tuple((layer, t) for layer, t in maps.items() if layer in current)
    return Variant(name, num_layers, tuple(current), tuple(scale[i] for i in current), embedding, untie, kept_maps)
