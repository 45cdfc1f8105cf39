"""The stage commands: act on an existing output of this tool, so a pipeline can prune once and
check, export, serve or time the result later (``prunecomp-export verify|export|serve|bench OUT``).

Each reuses what the run itself does (the reload check and its recorded sample, the targets' child
processes, vLLM's server, the bench package); a command that changes an output (export, bench)
changes a staging copy under the output's lock and swaps it in, as a run writes one.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunecomp_export.errors import ModelError, NotAnOutput, PrunecompError
from prunecomp_export.output.checkpoint import ReloadCheck
from prunecomp_export.output.manifest import MANIFEST_SCHEMA, listed_files, write_manifest
from prunecomp_export.output.outputdir import MANIFEST, OutputLock, staged_update
from prunecomp_export.progress import Reporter
from prunecomp_export.recipe import Recipe


@dataclass
class ExistingOutput:
    """An output directory of this tool and its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def recipe(self) -> Recipe:
        """The recipe the run recorded (its targets' and the bench's options apply to later commands)."""
        from pydantic import ValidationError

        try:
            return Recipe.model_validate(self.manifest["recipe"])
        except (KeyError, ValidationError) as exc:
            raise NotAnOutput(f"{self.path / MANIFEST}: the recorded recipe is not valid: {exc}") from None

    @property
    def layers_removed(self) -> int:
        return int(self.manifest["layers_before"]) - int(self.manifest["layers_after"])


def open_output(path: str | Path) -> ExistingOutput:
    """The output at ``path``, or ``NotAnOutput`` (one line, exit 2) when it is not one."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise NotAnOutput(f"{path}: not a directory (give an output directory of prunecomp-export)")
    if not manifest_path.is_file():
        raise NotAnOutput(f"{path}: not an output of prunecomp-export (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise NotAnOutput(f"{manifest_path}: cannot read the manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
        raise NotAnOutput(f"{manifest_path}: not a {MANIFEST_SCHEMA} manifest")
    return ExistingOutput(path, manifest)


# --- verify --------------------------------------------------------------------------------------


@dataclass
class Verification:
    """What ``verify`` found: one line per problem; the repeated reload check's record, or why not."""

    problems: list[str] = field(default_factory=list)
    reload: dict[str, Any] | None = None
    reload_skipped: str | None = None

    @property
    def passed(self) -> bool:
        return not self.problems


def check_files(output: ExistingOutput) -> list[str]:
    """Every file the manifest lists against its sha256: missing, changed, and files it does not list."""
    listed = output.manifest.get("files")
    if not isinstance(listed, dict):
        raise NotAnOutput(f"{output.path / MANIFEST}: lists no files")
    found = listed_files(output.path)
    problems = []
    for name in sorted(set(listed) | set(found)):
        if name not in found:
            problems.append(f"{name}: missing")
        elif name not in listed:
            problems.append(f"{name}: not listed in the manifest")
        elif found[name] != listed[name]:
            problems.append(f"{name}: changed (its sha256 differs from the manifest's)")
    return problems


def recorded_reload_check(output: ExistingOutput) -> ReloadCheck | str:
    """The reload check the run made, or why there is none to repeat."""
    verification = output.manifest.get("verification")
    if not verification:
        return "the run made no reload check (output.verify: false)"
    if "check" not in verification:
        return "the run recorded no reload sample (an output of an older prunecomp-export)"
    return ReloadCheck(**verification["check"])


def verify_output(path: str | Path, device: str | None = None) -> Verification:
    """The files against the manifest's hashes, then the run's reload check repeated: the checkpoint
    reloaded with transformers must give the logits the run recorded for its sample."""
    output = open_output(path)
    result = Verification(problems=check_files(output))
    check = recorded_reload_check(output)
    if isinstance(check, str):
        result.reload_skipped = check
        return result
    try:
        result.reload = check.run(output.path, device)
    except PrunecompError as exc:  # ChildFailed too: the child could not load the checkpoint
        result.problems.append(f"reload check: {' '.join(str(exc).split())}")
    return result


# --- export --------------------------------------------------------------------------------------


def export_targets(path: str | Path, names: list[str], log) -> dict[str, dict]:
    """Build ``names`` for an existing output as the run does (same options from the recorded recipe,
    same child processes, the memory the plan gives them on this machine), replacing any earlier
    build of those targets, and record them in the manifest, their parity in results.json and the
    reports, and the sign-off again (a target that failed in the run and passes now signs off); the
    output changes in one step, under its lock."""
    from prunecomp_export.pipeline import checkpoint_targets
    from prunecomp_export.report.render import write_reports
    from prunecomp_export.report.results import deployed_targets, read_results
    from prunecomp_export.report.signoff import with_target_parity
    from prunecomp_export.targets import build_targets

    output = open_output(path)
    if not (output.path / "checkpoint" / "config.json").is_file():
        raise NotAnOutput(f"{output.path / 'checkpoint'}: no checkpoint to build targets from")
    wanted = [name for name in names if name != "hf"]
    options, context = checkpoint_targets(output.recipe, output.path / "checkpoint", wanted)
    with OutputLock(output.path), staged_update(output.path) as stage:
        current = open_output(stage)  # read under the lock
        records = build_targets(options, stage / "checkpoint", stage, log, context)
        targets = {**(current.manifest.get("targets") or {}), **records}
        results = read_results(stage / "results.json")
        deployed = deployed_targets(targets)
        signoff = with_target_parity(results.signoff, deployed)
        write_reports(results.model_copy(update={"targets": deployed, "signoff": signoff}), stage)
        write_manifest(stage, {**current.manifest, "targets": targets})
    return records


# --- serve ---------------------------------------------------------------------------------------


def serve_output(path: str | Path, host: str | None = None, port: int | None = None) -> int:
    """vLLM's OpenAI server on the output's checkpoint in the foreground, with the recorded recipe's
    ``targets.vllm`` options (host and port overridden when given); its exit code."""
    from prunecomp_export.pipeline import checkpoint_targets
    from prunecomp_export.targets.runtimes import vllm

    output = open_output(path)
    checkpoint = output.path / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        raise NotAnOutput(f"{checkpoint}: no checkpoint to serve")
    raw = dict(output.recipe.targets.get("vllm", {}))
    raw.update({key: value for key, value in (("host", host), ("port", port)) if value is not None})
    # a missing vLLM or a budget too small for it fails here, in one line
    options, context = checkpoint_targets(output.recipe.model_copy(update={"targets": {"vllm": raw}}), checkpoint,
                                          ["vllm"])  # fmt: skip
    return vllm.serve(checkpoint, options["vllm"], planned=context.vllm_engine)


# --- bench ---------------------------------------------------------------------------------------


def source_directory(output: ExistingOutput, log) -> Path:
    """The run's source model as plain safetensors, refused unless it is the model the run pruned."""
    from prunecomp_export.source.loading import local_checkpoint, resolve_source, source_identity

    spec = output.recipe.model
    source = resolve_source(spec)
    identity = source_identity(source)
    recorded = (output.manifest.get("source_model") or {}).get("sha256")
    if identity["sha256"] != recorded:
        raise ModelError(f"{source.description}: not the model this output was pruned from (its sha256 differs)")
    return local_checkpoint(source, spec, identity, log)


def bench_output(path: str | Path, reporter: Reporter):
    """Time the output's checkpoint against its source as ``--bench`` does (the bench recipe section,
    torch plus the runtimes of the output's targets), for the dense model and the final one; write
    bench.json, the bench and the sign-off into results.json and the reports. Returns the RunResults."""
    from prunecomp_export.bench.timing import benchmark, onnx_exporter, require_runtimes, runtimes_for, speedups_at
    from prunecomp_export.output.checkpoint import dtype_name
    from prunecomp_export.pipeline import bench_vllm_engine, checkpoint_targets
    from prunecomp_export.report.render import write_reports
    from prunecomp_export.report.results import deployed_targets, read_results
    from prunecomp_export.report.signoff import evaluate_signoff, with_target_parity
    from prunecomp_export.source.loading import compute_dtype, load_config, resolve_source

    output = open_output(path)
    recipe = output.recipe
    runtimes = runtimes_for(recipe.bench, list(output.manifest.get("targets") or {}))
    require_runtimes(runtimes)
    dense = source_directory(output, reporter.log)
    vocab_size = load_config(resolve_source(recipe.model), recipe.model).vocab_size
    removed = output.layers_removed
    with OutputLock(output.path), staged_update(output.path) as stage:
        current = open_output(stage)
        checkpoint = stage / "checkpoint"
        scratch = stage / ".scratch"
        try:
            options, context = checkpoint_targets(recipe, checkpoint, ["vllm"] if "vllm" in runtimes else [])
            device = context.device
            dtype = dtype_name(compute_dtype(recipe.model, load_config(resolve_source(recipe.model), recipe.model)))
            export = onnx_exporter(scratch, {checkpoint: stage / "targets" / "onnx"}, device, dtype)
            checkpoints = {0: dense, removed: checkpoint}
            reporter.log(f"stage bench: {', '.join(runtimes)} on {len(checkpoints)} checkpoints ({device}, {dtype})")
            layers = int(current.manifest["layers_before"])
            bench = benchmark(recipe.bench, runtimes, checkpoints, layers, vocab_size, reporter, export, device=device,
                              dtype=dtype, vllm_engine=bench_vllm_engine(options, context, dtype))  # fmt: skip
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        (stage / "bench.json").write_text(json.dumps(bench, indent=2) + "\n")
        results = read_results(stage / "results.json")
        targets = deployed_targets(current.manifest.get("targets") or {})
        signoff = with_target_parity(
            evaluate_signoff(recipe.signoff, results.measurements, removed, speedups_at(bench, removed)), targets
        )
        results = results.model_copy(update={"bench": bench, "signoff": signoff, "targets": targets})
        write_reports(results, stage)
        write_manifest(stage, current.manifest)
    return results
