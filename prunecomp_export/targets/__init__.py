"""Deployment targets. Each target is a module of its own that imports its runtime only inside
``build``; this package maps target names to those modules without importing any runtime.

A target module provides:
- ``Options``: a pydantic model (``extra="forbid"``) of the target's recipe options, with defaults;
- ``build(checkpoint: Path, out_dir: Path, options: Options) -> dict``: takes the pruned plain
  HF checkpoint, writes everything into ``out_dir`` (a fresh temporary directory that the caller
  renames to ``<output>/targets/<name>`` on success), proves the artifact computes what the
  checkpoint computes, and returns a JSON-serialisable record for the manifest. It raises
  ``TargetUnavailable`` when its runtime or hardware is missing and ``ValidationFailed`` when a
  parity check fails.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from prunecomp_export.registry import Registry

TARGETS: Registry[str] = Registry("target")
TARGETS.add("hf", "prunecomp_export.targets.hf")
TARGETS.add("onnx", "prunecomp_export.targets.onnx")
TARGETS.add("vllm", "prunecomp_export.targets.vllm")
TARGETS.add("tensorrt", "prunecomp_export.targets.tensorrt")


def load_target(name: str) -> ModuleType:
    """Import a target's module (cheap: runtimes are imported inside ``build``)."""
    return importlib.import_module(TARGETS.get(name))
