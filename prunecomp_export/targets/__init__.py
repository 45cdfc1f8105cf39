"""Deployment targets. Each target is a module of its own that imports its runtime only inside
``build``; this package maps target names to those modules without importing any runtime.

A target module provides:
- ``Options``: a pydantic model (``extra="forbid"``) of the target's recipe options, with defaults;
- optionally ``preflight(options)``: the checks that need no model (runtime installed, hardware
  present), run before any weight is read, raising ``TargetUnavailable``;
- ``build(checkpoint: Path, out_dir: Path, options: Options) -> dict``: takes the pruned plain
  HF checkpoint, writes everything into ``out_dir`` (a fresh temporary directory that the caller
  renames to ``<output>/targets/<name>`` on success), proves the artifact computes what the
  checkpoint computes, and returns a JSON-serialisable record for the manifest. No absolute path
  of the output goes into what it writes (the output is staged, then renamed, and may be moved):
  files in ``out_dir`` refer to the checkpoint relative to themselves, and the record's paths are
  relative to the output directory (``out_dir`` is ``<output>/targets/<name>``). It raises
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


def build_target(name: str, checkpoint: str, out_dir: str, options: dict) -> dict:
    """Build one target from its validated options (the entry point of the target's child process)."""
    from pathlib import Path

    module = load_target(name)
    return module.build(Path(checkpoint), Path(out_dir), module.Options.model_validate(options))
