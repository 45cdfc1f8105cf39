"""Deleting decoder layers so the model stays a plain, consistent transformers model."""

from __future__ import annotations

from torch import nn

from prunecomp_export.adapters import Adapter


def delete_layers(adapter: Adapter, model: nn.Module, index: int, count: int = 1) -> None:
    """Delete current layers index..index+count-1, renumber attention ``layer_idx`` (KV-cache slots)
    and make the config describe the kept layers (num_hidden_layers and every per-layer field)."""
    layers = adapter.layers(model)
    total = len(layers)
    if index < 0 or count < 1 or index + count > total:
        raise IndexError(f"cannot delete layers {index}..{index + count - 1} of {total}")
    for _ in range(count):
        del layers[index]
    for new_index, layer in enumerate(layers):
        adapter.set_layer_index(layer, new_index)
    keep = [i for i in range(total) if not index <= i < index + count]
    adapter.prune_config(model.config, keep)
