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
  parity check fails;
- ``parity_checks(record) -> list[dict]`` (every target but ``hf``): its record's parity figures as
  rows of the report's ``ParityCheck`` (name, measured, comparison, limit, unit, passed, detail), so
  only the target module knows its record's layout.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

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
    module = load_target(name)
    return module.build(Path(checkpoint), Path(out_dir), module.Options.model_validate(options))


def validated_options(name: str, raw: dict) -> Any:
    """A target's ``Options`` from its recipe section, then its ``preflight`` (runtime installed,
    hardware present): everything that can fail before any weight is read. Raises ``RecipeError``
    naming the key path, or ``TargetUnavailable``."""
    from pydantic import ValidationError

    from prunecomp_export.errors import RecipeError
    from prunecomp_export.validation import first_error

    module = load_target(name)
    try:
        options = module.Options.model_validate(raw)
    except ValidationError as exc:
        key, message = first_error(exc, module.Options)
        raise RecipeError(message, key=".".join(filter(None, ("targets", name, key)))) from None
    if (check := getattr(module, "preflight", None)) is not None:
        check(options)
    return options


def parity_checks(name: str, record: dict) -> list[dict]:
    """A built target's parity figures, from its record (``ParityCheck`` rows)."""
    return load_target(name).parity_checks(record)


def target_parity(records: dict[str, dict]) -> list[dict]:
    """Each built target's parity, in build order (``TargetParity`` for results.json): what the
    sign-off report shows of each target's proof that it computes what the checkpoint computes."""
    parity = []
    for name, record in records.items():
        checks = parity_checks(name, record)
        parity.append({"target": name, "passed": all(c["passed"] for c in checks), "checks": checks})
    return parity


def build_targets(
    options: dict[str, Any], checkpoint: Path, output: Path, log: Callable[[str], None]
) -> dict[str, dict]:
    """Build each target but ``hf`` (the checkpoint itself) from ``checkpoint`` into
    ``output/targets/<name>`` (which must not exist), each in a child process of its own: the
    pipeline's targets stage and ``prunecomp-export export`` alike. Each target's record, by name."""
    from prunecomp_export.child import ChildRequest, run_child

    records = {}
    for name, chosen in options.items():
        if name == "hf":
            continue
        log(f"stage targets: {name}")
        out_dir = output / "targets" / name
        out_dir.mkdir(parents=True)
        request = ChildRequest(
            name=f"{name} target",
            target="prunecomp_export.targets:build_target",
            kwargs={"name": name, "checkpoint": str(checkpoint), "out_dir": str(out_dir),
                    "options": chosen.model_dump()},
        )  # fmt: skip
        records[name] = run_child(request).value
    return records
