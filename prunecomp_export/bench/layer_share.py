"""The share of a run spent inside the decoder layers, from ONNX Runtime's own profiler.

The ideal speedup of removing k of L layers is 1 / (1 - s k / L), with s the decoder layers' share of
a dense run. A runtime that fuses or schedules the rest differently (the embedding, the final norm,
the LM head) has its own s, so each runtime's ideal comes from its own profile where it has one.
ONNX Runtime's profiler reports each kernel's time under its node's name; the torch exporter records
the module scope of every node (``pkg.torch.onnx.name_scopes``), and fused nodes keep the name of
the node they start from before a ``/`` (``node_MatMul_470/MatMulScaleFusion/``).
"""

from __future__ import annotations

import re
from pathlib import Path

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_LAYER_SCOPE = re.compile(r"\.layers\.(\d+)['\"]")
KERNEL_SUFFIX = "_kernel_time"


def onnx_node_layers(onnx_path: Path) -> dict[str, int | None]:
    """Each node's decoder layer index (None outside the layers), from the exporter's name scopes."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    layers: dict[str, int | None] = {}
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), "")
        match = _LAYER_SCOPE.search(scopes)
        layers[node.name] = int(match.group(1)) if match else None
    return layers


def ort_layer_share(events: list[dict], node_layers: dict[str, int | None]) -> float:
    """Kernel time of nodes inside the decoder layers over all kernel time, from a profile's events.
    A kernel whose node the model does not name (neither itself nor the node a fusion started from)
    is a ValueError: the share would be a guess."""
    inside = total = 0.0
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith(KERNEL_SUFFIX):
            continue
        name = event["name"][: -len(KERNEL_SUFFIX)].split("/")[0]
        if name not in node_layers:
            raise ValueError(f"profiled node {event['name']!r} is not in the model")
        total += event["dur"]
        if node_layers[name] is not None:
            inside += event["dur"]
    if total == 0:
        raise ValueError("the profile holds no kernel times")
    return inside / total
