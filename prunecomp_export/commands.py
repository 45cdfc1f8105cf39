"""The stage commands: act on an existing output of this tool, so a pipeline can prune once and
check, export, serve or time the result later (``prunecomp-export verify|export|serve|bench OUT``).

Each reuses what the run itself does (the reload check and its recorded sample, the targets' child
processes, vLLM's server, the bench package); a command that changes an output (export, bench)
takes the output's lock first, then changes a staging copy and swaps it in, as a run writes one.

An output is untrusted input: its manifest is read through one typed schema (``output.manifest``),
and each command checks what it needs (the checkpoint's files, results.json, the source model)
before it starts any work, so a damaged output ends in one line naming the file, not in a child's
traceback or a half-finished timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunecomp_export.errors import ModelError, NotAnOutput, OutputFileError, PrunecompError, RecipeError, shown
from prunecomp_export.output.manifest import (
    Manifest,
    ReloadCheck,
    output_files,
    read_manifest,
    read_small_file,
    write_manifest,
)
from prunecomp_export.output.outputdir import MANIFEST, OutputLock, staged_update
from prunecomp_export.progress import Reporter
from prunecomp_export.recipe import Recipe

if TYPE_CHECKING:
    from prunecomp_export.report.results import RunResults

RESULTS = "results.json"
CHECKPOINT = "checkpoint"
#: results.json of a 70B run with every measurement and target is well under this
MAX_RESULTS_BYTES = 64 << 20
#: a model's config.json is a few KB
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class ExistingOutput:
    """An output directory of this tool and its manifest."""

    path: Path
    manifest: Manifest

    @property
    def recipe(self) -> Recipe:
        """The recipe the run recorded (its targets' and the bench's options apply to later commands)."""
        return self.manifest.recipe

    @property
    def layers_removed(self) -> int:
        return self.manifest.layers_removed


def open_output(path: str | Path) -> ExistingOutput:
    """The output at ``path``, or ``NotAnOutput`` (one line, exit 2) when it is not one."""
    path = Path(path)
    if not path.is_dir():
        raise NotAnOutput(f"{shown(path)}: not a directory (give an output directory of prunecomp-export)")
    if not os.path.lexists(path / MANIFEST):
        raise NotAnOutput(f"{shown(path)}: not an output of prunecomp-export (no {MANIFEST})")
    return ExistingOutput(path, read_manifest(path))


@contextlib.contextmanager
def _recorded_recipe_errors(output: ExistingOutput) -> Iterator[None]:
    """A problem with a value of the recorded recipe (a target's options, the model source) names the
    manifest and the key in it; the output's own lock and staging refusals name the output as they are."""
    try:
        yield
    except RecipeError as exc:
        if exc.key == "output.dir":  # OutputLock, staged_output: about OUT, not the recorded output.dir
            raise PrunecompError(exc.message) from None
        raise output.recipe.locate(exc) from None


# --- what a command needs, checked before it works -----------------------------------------------


class DamagedOutput(NotAnOutput):
    """A file a command needs is missing or not what the run wrote (``name``: relative to the output)."""

    def __init__(self, output: ExistingOutput, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"{shown(output.path / name)}: {problem} (prunecomp-export verify names every problem)")


def require_plain_files(output: ExistingOutput) -> None:
    """Nothing but regular files and directories in the output: a command that copies or serves it
    never follows a symbolic link out of it, nor blocks on a FIFO."""
    others = output_files(output.path, hashed=False).others
    if others:
        name, what = next(iter(others.items()))
        raise DamagedOutput(output, name, what)


def require_checkpoint(output: ExistingOutput) -> None:
    """The checkpoint's files as the manifest lists them, each present as a regular file (hashing them
    is ``verify``'s work), and its config.json readable with the manifest's layer count."""
    directory = output.path / CHECKPOINT
    if not directory.is_dir() or directory.is_symlink():
        raise DamagedOutput(output, CHECKPOINT, "missing or not a directory: the output has no checkpoint")
    for name in sorted(output.manifest.files):
        if not name.startswith(f"{CHECKPOINT}/"):
            continue
        try:
            mode = os.lstat(output.path / name).st_mode
        except (FileNotFoundError, NotADirectoryError):
            raise DamagedOutput(output, name, "missing: the checkpoint is incomplete") from None
        if not stat.S_ISREG(mode):
            what = "a symbolic link (not followed)" if stat.S_ISLNK(mode) else "not a regular file"
            raise DamagedOutput(output, name, what)
    checkpoint_config(output)


def checkpoint_config(output: ExistingOutput) -> dict[str, Any]:
    """``checkpoint/config.json`` as a mapping, with the number of layers the manifest records."""
    name = f"{CHECKPOINT}/config.json"

    def unreadable(problem: str) -> DamagedOutput:
        return DamagedOutput(output, name, problem)

    data = read_small_file(output.path / name, MAX_CONFIG_BYTES, unreadable)
    try:
        config = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        raise unreadable("not a model config (not JSON)") from None
    if not isinstance(config, dict):
        raise unreadable("not a model config (not a JSON object)")
    layers = config.get("num_hidden_layers")
    if layers != output.manifest.layers_after:
        raise unreadable(f"num_hidden_layers is {shown(repr(layers))[:40]}, the manifest records "
                         f"{output.manifest.layers_after}")  # fmt: skip
    return config


def read_output_results(directory: Path) -> RunResults:
    """The output's results.json (``report.results.RunResults``), read as untrusted input: a regular
    file, valid against its schema; else one line naming the file and the key."""
    from pydantic import ValidationError

    from prunecomp_export.report.results import RunResults, read_results
    from prunecomp_export.validation import first_error

    path = directory / RESULTS
    file = str(path)

    def unreadable(problem: str) -> OutputFileError:
        return OutputFileError(problem, file=file)

    read_small_file(path, MAX_RESULTS_BYTES, unreadable)  # a regular file of a sane size, not followed
    try:
        return read_results(path)
    except ValidationError as exc:
        key, message = first_error(exc, RunResults)
        raise OutputFileError(message, key=key or None, file=file) from None
    except RecursionError:
        raise unreadable("not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise unreadable(f"not valid JSON: {' '.join(str(exc).split())}") from None


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
    """Every file the manifest lists against its sha256: missing, changed, files it does not list, and
    anything that is not a regular file (a symbolic link is a problem, never followed)."""
    listed = output.manifest.files
    found = output_files(output.path)
    problems = {name: what for name, what in found.others.items()}
    for name in set(listed) | set(found.digests):
        if name in problems:
            continue
        if name not in found.digests:
            problems[name] = "missing"
        elif name not in listed:
            problems[name] = "not listed in the manifest"
        elif found.digests[name] != listed[name]:
            problems[name] = "changed (its sha256 differs from the manifest's)"
    return [f"{name}: {problems[name]}" for name in sorted(problems)]


def _sample_problem(output: ExistingOutput, check: ReloadCheck, vocab_size: int) -> str | None:
    """What is wrong with the reload check's sample file, read from its header (None: nothing): it
    must hold ``sample`` (token ids, batch x tokens, below the vocabulary size) and ``expected`` (fp32
    logits, batch x tokens x vocabulary), so the reload in a child process cannot fail on it."""
    import numpy as np

    from prunecomp_export.source.weights import read_header

    path = output.path / check.sample_file
    try:
        tensors = read_header(path)
    except ModelError as exc:
        return f"{check.sample_file}: {str(exc).removeprefix(f'{path}: ')}"
    sample, expected = tensors.get("sample"), tensors.get("expected")
    if sample is None or expected is None or set(tensors) != {"sample", "expected"}:
        return f"{check.sample_file}: not a reload sample (it must hold exactly 'sample' and 'expected')"
    if sample.dtype != "I64" or len(sample.shape) != 2 or not 0 < sample.shape[0] * sample.shape[1] <= 1 << 20:
        return f"{check.sample_file}: 'sample' is not a batch of token ids ({sample.dtype} {list(sample.shape)})"
    if expected.dtype != "F32" or expected.shape != (*sample.shape, vocab_size):
        return (f"{check.sample_file}: 'expected' is {expected.dtype} {list(expected.shape)}, not F32 "
                f"{[*sample.shape, vocab_size]} (the logits of the sample)")  # fmt: skip
    with path.open("rb") as handle:
        handle.seek(sample.start)
        ids = np.frombuffer(handle.read(sample.end - sample.start), dtype="<i8")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        return f"{check.sample_file}: 'sample' holds token ids outside the vocabulary (0..{vocab_size - 1})"
    return None


def _checkpoint_problem(output: ExistingOutput) -> str | None:
    """What makes the checkpoint unloadable, from its config and safetensors headers (None: nothing)."""
    from prunecomp_export.source.weights import SafetensorsCheckpoint

    try:
        checkpoint_config(output)
        SafetensorsCheckpoint(output.path / CHECKPOINT)
    except DamagedOutput as exc:
        return f"{exc.name}: {exc.problem}"
    except ModelError as exc:
        return str(exc)
    return None


def verify_output(path: str | Path, device: str | None = None) -> Verification:
    """The files against the manifest's hashes, then the run's reload check repeated: the checkpoint
    reloaded with transformers must give the logits the run recorded for its sample. The reload runs
    only on a checkpoint and a sample the manifest vouches for, and whose headers are sound: on
    anything else it could only crash."""
    output = open_output(path)
    result = Verification(problems=check_files(output))
    verification = output.manifest.verification
    if verification is None:
        result.reload_skipped = "the run made no reload check (output.verify: false)"
        return result
    check = verification.check
    if check is None:
        result.reload_skipped = "the run recorded no reload sample (an output of an older prunecomp-export)"
        return result
    concerned = [p for p in result.problems if p.startswith((f"{CHECKPOINT}/", f"{CHECKPOINT}:", check.sample_file))]
    if concerned:
        result.problems.append("reload check: not run (the checkpoint or its sample does not match the manifest)")
        return result
    problem = _checkpoint_problem(output)
    if problem is None:
        vocab_size = checkpoint_config(output).get("vocab_size")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
            problem = f"{CHECKPOINT}/config.json: vocab_size is not a positive number"
        else:
            problem = _sample_problem(output, check, vocab_size)
    if problem is not None:
        result.problems += [problem, "reload check: not run (the checkpoint or its sample cannot be read)"]
        return result
    try:
        result.reload = check.run(output.path, device)
    except PrunecompError as exc:  # ChildFailed too: the child could not load the checkpoint
        result.problems.append(f"reload check: {' '.join(str(exc).split())}")
    return result


# --- export --------------------------------------------------------------------------------------


def export_targets(path: str | Path, names: list[str], log) -> dict[str, dict]:
    """Build ``names`` for an existing output as the run does (same options from the recorded recipe,
    same child processes), replacing any earlier build of those targets, and record them in the
    manifest and their parity in results.json and the reports; the output changes in one step,
    under its lock, taken before anything else (before the heavy imports too)."""
    output = open_output(path)
    with _recorded_recipe_errors(output), OutputLock(output.path):
        from prunecomp_export.report.render import write_reports
        from prunecomp_export.report.results import deployed_targets, read_results
        from prunecomp_export.targets import build_targets, validated_options

        require_plain_files(output)
        require_checkpoint(output)
        read_output_results(output.path)
        targets = output.recipe.targets
        options = {name: validated_options(name, targets.get(name, {})) for name in names if name != "hf"}
        with staged_update(output.path) as stage:
            current = open_output(stage)  # read under the lock
            for name in options:
                shutil.rmtree(stage / "targets" / name, ignore_errors=True)
            built = build_targets(options, stage / CHECKPOINT, stage, log)
            records = {**current.manifest.targets, **built}
            results = read_results(stage / RESULTS)
            write_reports(results.model_copy(update={"targets": deployed_targets(records)}), stage)
            write_manifest(stage, current.manifest.model_copy(update={"targets": records}))
    return built


# --- serve ---------------------------------------------------------------------------------------


def serve_output(path: str | Path, host: str | None = None, port: int | None = None) -> int:
    """vLLM's OpenAI server on the output's checkpoint in the foreground, with the recorded recipe's
    ``targets.vllm`` options (host and port overridden when given); its exit code."""
    from prunecomp_export.targets import validated_options, vllm

    output = open_output(path)
    with _recorded_recipe_errors(output):
        require_plain_files(output)
        require_checkpoint(output)
        raw = dict(output.recipe.targets.get("vllm", {}))
        raw.update({key: value for key, value in (("host", host), ("port", port)) if value is not None})
        options = validated_options("vllm", raw)  # a missing vLLM fails here, in one line
    return vllm.serve(output.path / CHECKPOINT, options)


# --- bench ---------------------------------------------------------------------------------------


def source_directory(output: ExistingOutput, log) -> Path:
    """The run's source model as plain safetensors, refused unless it is the model the run pruned."""
    from prunecomp_export.source.loading import local_checkpoint, resolve_source, source_identity

    spec = output.recipe.model
    recorded = output.manifest.source_model
    try:
        source = resolve_source(spec)
    except RecipeError as exc:
        raise RecipeError(f"the source model is missing: {exc.message} (bench times the output against it)",
                          key=exc.key) from None  # fmt: skip
    if not source.local and not recorded.source.startswith("hub:"):
        raise RecipeError(f"the source model {spec.source!r} is missing (the run read {recorded.source}); "
                          "bench times the output against it", key="model.source")  # fmt: skip
    identity = source_identity(source)
    if identity["sha256"] != recorded.sha256:
        raise ModelError(f"{source.description}: not the model this output was pruned from (its sha256 differs)")
    return local_checkpoint(source, spec, identity, log)


def bench_output(path: str | Path, reporter: Reporter):
    """Time the output's checkpoint against its source as ``--bench`` does (the bench recipe section,
    torch plus the runtimes of the output's targets), for the dense model and the final one; write
    bench.json, the bench and the sign-off into results.json and the reports. Returns the RunResults.
    Everything it needs (runtimes, checkpoint, results.json, the source model) is checked under the
    output's lock (taken first, before the heavy imports too) before anything is timed."""
    output = open_output(path)
    recipe = output.recipe
    with _recorded_recipe_errors(output), OutputLock(output.path):
        from prunecomp_export.bench.timing import (
            benchmark,
            onnx_exporter,
            require_runtimes,
            runtimes_for,
            speedups_at,
        )
        from prunecomp_export.report.render import write_reports
        from prunecomp_export.report.results import deployed_targets, read_results
        from prunecomp_export.report.signoff import evaluate_signoff
        from prunecomp_export.source.loading import load_config, resolve_source

        runtimes = runtimes_for(recipe.bench, list(output.manifest.targets))
        require_runtimes(runtimes)
        require_plain_files(output)
        require_checkpoint(output)
        read_output_results(output.path)
        dense = source_directory(output, reporter.log)
        vocab_size = load_config(resolve_source(recipe.model), recipe.model).vocab_size
        removed = output.layers_removed
        with staged_update(output.path) as stage:
            current = open_output(stage)
            checkpoint = stage / CHECKPOINT
            scratch = stage / ".scratch"
            try:
                export = onnx_exporter(scratch, {checkpoint: stage / "targets" / "onnx"})
                checkpoints = {0: dense, removed: checkpoint}
                reporter.log(f"stage bench: {', '.join(runtimes)} on {len(checkpoints)} checkpoints")
                layers = current.manifest.layers_before
                bench = benchmark(recipe.bench, runtimes, checkpoints, layers, vocab_size, reporter, export)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            (stage / "bench.json").write_text(json.dumps(bench, indent=2) + "\n")
            results = read_results(stage / RESULTS)
            signoff = evaluate_signoff(recipe.signoff, results.measurements, removed, speedups_at(bench, removed))
            targets = deployed_targets(current.manifest.targets)
            results = results.model_copy(update={"bench": bench, "signoff": signoff, "targets": targets})
            write_reports(results, stage)
            write_manifest(stage, current.manifest)
    return results
