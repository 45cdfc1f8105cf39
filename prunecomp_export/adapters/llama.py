"""Llama-shaped families: Llama, Mistral, Qwen2, Qwen3.

They share the layout of ``Adapter``'s defaults: pre-norm RMSNorm blocks whose residual writers are
``o_proj`` and ``down_proj``. Qwen2 adds q/k/v biases (not writers, untouched) and sliding-window
fields; Qwen3 adds q/k norms (inside attention, untouched). Folding alpha is exact for all four up
to the RMSNorm epsilon, since every layer reads the stream only through its input norms.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunecomp_export.adapters.base import Adapter


@dataclass(frozen=True)
class QwenAdapter(Adapter):
    def prune_config(self, config, keep: list[int]) -> None:
        # Qwen computes layer types from max_window_layers when layer_types is absent (transformers
        # 4.x): layers below it use full attention. Count the kept layers below the old threshold so
        # the scalar still describes the kept layers, next to the explicit layer_types list.
        threshold = getattr(config, "max_window_layers", None)
        super().prune_config(config, keep)
        if threshold is not None:
            config.max_window_layers = sum(1 for i in keep if i < threshold)


LLAMA_FAMILY: tuple[Adapter, ...] = (
    Adapter("llama"),
    Adapter("mistral"),
    QwenAdapter("qwen2"),
    QwenAdapter("qwen3"),
)
