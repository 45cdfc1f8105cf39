"""Architecture adapters: where a family keeps its layers, residual writers and norms, and which
config fields are per layer. The engine only talks to an adapter, so a new family plugs in here."""

from __future__ import annotations

from prunecomp_export.adapters.base import Adapter
from prunecomp_export.adapters.gemma import GEMMA_FAMILY, UNSUPPORTED_HINTS
from prunecomp_export.adapters.llama import LLAMA_FAMILY
from prunecomp_export.adapters.moe import MOE_FAMILY
from prunecomp_export.adapters.phi3 import PHI3_FAMILY
from prunecomp_export.errors import ModelError
from prunecomp_export.registry import Registry

ADAPTERS: Registry[Adapter] = Registry("architecture")
for _adapter in (*LLAMA_FAMILY, *PHI3_FAMILY, *GEMMA_FAMILY, *MOE_FAMILY):
    ADAPTERS.add(_adapter.model_type, _adapter)


def supported_model_types() -> list[str]:
    return ADAPTERS.names()


def adapter_for(config) -> Adapter:
    """The adapter for a transformers config, or a ModelError that lists the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        hint = f"; {UNSUPPORTED_HINTS[model_type]}" if model_type in UNSUPPORTED_HINTS else ""
        raise ModelError(
            f"unsupported architecture {model_type!r}: prunecomp-export supports "
            f"{', '.join(supported_model_types())}{hint}"
        )
    return ADAPTERS.get(model_type)


__all__ = ["ADAPTERS", "Adapter", "adapter_for", "supported_model_types"]
