"""Architecture adapters: where a family keeps its layers, residual writers and norms, and which
config fields are per layer. The engine only talks to an adapter, so a new family plugs in here."""

from __future__ import annotations

from prunecomp_export.adapters.base import Adapter
from prunecomp_export.adapters.llama import LLAMA_FAMILY
from prunecomp_export.errors import ModelError
from prunecomp_export.registry import Registry

ADAPTERS: Registry[Adapter] = Registry("architecture")
for _adapter in LLAMA_FAMILY:
    ADAPTERS.add(_adapter.model_type, _adapter)


def supported_model_types() -> list[str]:
    return ADAPTERS.names()


def adapter_for(config) -> Adapter:
    """The adapter for a transformers config, or a ModelError that lists the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ModelError(
            f"unsupported architecture {model_type!r}: prunecomp-export supports {', '.join(supported_model_types())}"
        )
    return ADAPTERS.get(model_type)


__all__ = ["ADAPTERS", "Adapter", "adapter_for", "supported_model_types"]
