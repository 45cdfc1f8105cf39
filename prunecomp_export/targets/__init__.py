"""Deployment targets, kept apart the way optimum keeps its exporters apart:

- ``export/``: building an artifact from the written checkpoint (the torch.onnx decoder,
  onnxruntime-genai's model builder, a TensorRT engine);
- ``runtimes/``: running one (ONNX Runtime, onnxruntime-genai, TensorRT, TensorRT-LLM, vLLM), each
  returning a ``parity.RuntimeRun`` from a child process;
- ``parity.py``: the one check every target passes, against the layer-streamed fp32 reference;
- ``hf.py``, ``onnx.py``, ``vllm.py``, ``tensorrt.py``: each target a small ``Target`` over them.

This package maps target names to those modules without importing any runtime. A target's
``Options`` (pydantic, ``extra="forbid"``) are validated once, with its ``preflight`` (runtime
installed, hardware present), before any weight is read (``validated_options``); ``build`` writes
its artifact into ``out_dir`` (``<output>/targets/<name>``, no absolute path of the output inside) and
returns a ``TargetRecord``. A target that fails its parity check or cannot run returns or becomes a
failed record: the run's output stays complete and its sign-off fails (exit 1); ``prunecomp-export
export OUT --target NAME`` builds it again.
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from prunecomp_export.registry import Registry
from prunecomp_export.targets.parity import ParityReport
from prunecomp_export.validation import FiniteFloat

TARGETS: Registry[str] = Registry("target")
TARGETS.add("hf", "prunecomp_export.targets.hf")
TARGETS.add("onnx", "prunecomp_export.targets.onnx")
TARGETS.add("vllm", "prunecomp_export.targets.vllm")
TARGETS.add("tensorrt", "prunecomp_export.targets.tensorrt")


class TargetContext(BaseModel):
    """What a target knows of the run beyond its options: the model's architecture, where the
    runtimes and the reference run, and what the memory plan gives them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: the checkpoint's transformers architecture, e.g. "LlamaForCausalLM"
    architecture: str = ""
    #: the run's execution device: "cpu", "cuda", "cuda:1"
    device: str = "cpu"
    #: tokens per chunk of the reference's head (the plan's)
    logits_chunk: int = Field(256, ge=1)
    #: vLLM's memory and parallelism from the plan (``memory.py``): gpu_memory_utilization or
    #: kv_cache_memory_bytes, max_model_len
    vllm_engine: dict[str, Any] = Field(default_factory=dict)


class TargetRecord(BaseModel):
    """What building a target produced, for the manifest and the report."""

    model_config = ConfigDict(extra="forbid")

    target: str
    passed: bool
    #: the runtime against the fp32 reference; None when the target could not build or run
    parity: ParityReport | None = None
    #: why a target failed without a parity verdict (one line; a crash names its log)
    error: str | None = None
    #: what was built: files, versions, the serving command, seconds (paths relative to the output)
    artifact: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def judged(cls, target: str, parity: ParityReport, artifact: dict[str, Any]) -> TargetRecord:
        return cls(target=target, passed=parity.passed, parity=parity, artifact=artifact)


class Target:
    """A deployment target: its options, the checks it makes before any weight is read, its build."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]]

    def preflight(self, options: Any, context: TargetContext) -> None:
        """Everything that can fail before pruning (runtime installed, hardware present): raises
        ``TargetUnavailable`` or ``RecipeError``."""

    def build(self, checkpoint: Path, out_dir: Path, options: Any, context: TargetContext) -> TargetRecord:
        raise NotImplementedError


def load_target(name: str) -> Target:
    """A target by name (cheap: runtimes are imported inside ``build``)."""
    return importlib.import_module(TARGETS.get(name)).TARGET


def build_target(name: str, checkpoint: str, out_dir: str, options: dict, context: dict) -> dict:
    """Build one target (the entry point of the target's child process)."""
    target = load_target(name)
    record = target.build(
        Path(checkpoint), Path(out_dir), target.Options.model_validate(options), TargetContext.model_validate(context)
    )
    return record.model_dump(mode="json")


def validated_options(name: str, raw: dict, context: TargetContext | None = None, *, here: bool = True) -> Any:
    """A target's ``Options`` from its recipe section, then its ``preflight``: everything that can
    fail before any weight is read. Raises ``RecipeError`` naming the key path, or ``TargetUnavailable``.
    ``here=False`` (a dry run planning another machine): the options only, not this machine's runtimes."""
    from pydantic import ValidationError

    from prunecomp_export.errors import RecipeError
    from prunecomp_export.validation import first_error

    target = load_target(name)
    try:
        options = target.Options.model_validate(raw)
    except ValidationError as exc:
        key, message = first_error(exc, target.Options)
        raise RecipeError(message, key=".".join(filter(None, ("targets", name, key)))) from None
    if here:
        target.preflight(options, context or TargetContext())
    return options


def failed_record(name: str, error: Exception) -> TargetRecord:
    return TargetRecord(target=name, passed=False, error=" ".join(str(error).split()))


def build_targets(
    options: dict[str, Any], checkpoint: Path, output: Path, log: Callable[[str], None], context: TargetContext
) -> dict[str, dict]:
    """Build each target but ``hf`` (the checkpoint itself) from ``checkpoint`` into
    ``output/targets/<name>``, each in a child process of its own: the pipeline's targets stage and
    ``prunecomp-export export`` alike. A target that cannot build or run is recorded as failed with
    its error (the output stays complete); Ctrl-C still stops everything. Each record, by name."""
    from prunecomp_export.child import ChildRequest, run_child
    from prunecomp_export.errors import PrunecompError

    records = {}
    for name, chosen in options.items():
        if name == "hf":
            continue
        log(f"stage targets: {name}")
        out_dir = output / "targets" / name
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        request = ChildRequest(
            name=f"{name} target",
            target="prunecomp_export.targets:build_target",
            kwargs={"name": name, "checkpoint": str(checkpoint), "out_dir": str(out_dir),
                    "options": chosen.model_dump(mode="json"), "context": context.model_dump(mode="json")},
        )  # fmt: skip
        try:
            record = TargetRecord.model_validate(run_child(request).value)
        except PrunecompError as exc:  # a crash, a timeout, a runtime missing after all: a failed target
            record = failed_record(name, exc)
        verdict = "PASS" if record.passed else "FAIL"
        why = record.parity.summary() if record.parity is not None else record.error
        log(f"stage targets: {name} {verdict}: {why}")
        records[name] = record.model_dump(mode="json")
    return records


class _OlderRecord(BaseModel):
    model_config = ConfigDict(extra="allow")


class _OlderLogitCheck(_OlderRecord):
    max_abs_diff: FiniteFloat
    passed: bool


class _OlderLogits(_OlderRecord):
    """An ``onnx`` or ``tensorrt`` record of an older prunecomp-export: max abs logit differences."""

    checks: dict[str, _OlderLogitCheck]
    tolerance: FiniteFloat


class _OlderPrompt(_OlderRecord):
    tokens_equal: bool
    prompt_ids_equal: bool


class _OlderGreedy(_OlderRecord):
    """A ``vllm`` record of an older prunecomp-export: greedy-token equality per prompt."""

    tokens_equal: bool
    prompts: list[_OlderPrompt]


#: the records an older prunecomp-export wrote, by target: read as "rebuild it", while a record that
#: is neither this version's nor one of these is a damaged manifest
OLDER_RECORDS: dict[str, type[BaseModel]] = {"onnx": _OlderLogits, "tensorrt": _OlderLogits, "vllm": _OlderGreedy}


def target_parity(records: dict[str, dict]) -> list[dict]:
    """Each built target's parity, in build order (``TargetParity`` for results.json). A record of an
    older prunecomp-export is a failed target to rebuild; an unknown target name raises
    ``UnknownName``, and a record that is no version's a ``ValueError`` (the manifest refuses both)."""
    from pydantic import ValidationError

    parity = []
    for name, raw in records.items():
        TARGETS.get(name)
        try:
            record = TargetRecord.model_validate(raw)
        except ValidationError:  # built by an older prunecomp-export, judged by its old check
            older = OLDER_RECORDS.get(name)
            if older is None:
                raise
            older.model_validate(raw)
            error = f"built by an older prunecomp-export; rebuild it: prunecomp-export export OUT --target {name}"
            record = TargetRecord(target=name, passed=False, error=error)
        entry: dict[str, Any] = {"target": name, "passed": record.passed, "error": record.error, "checks": []}
        if (report := record.parity) is not None:
            entry.update(
                runtime=report.runtime, dtype=report.dtype, reference=report.reference,
                tokens_compared=report.tokens_compared, checks=report.checks(),
                divergences=[d.model_dump() for d in report.divergences],
            )  # fmt: skip
        parity.append(entry)
    return parity
