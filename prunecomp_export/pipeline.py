"""The whole job as explicit stages, top to bottom:

preflight (everything that needs no weights) -> load (the source as plain safetensors, tokenizer,
token windows, the layer-by-layer model and where things live) -> prune -> evaluate -> save (the
checkpoint by tensor surgery from the source files, then a reload check) -> targets -> bench ->
report. Each stage's wall time and peak memory are measured (``costs``).

``run`` is the library call behind the CLI; it returns a ``RunResult`` and raises
``PrunecompError`` subclasses for anything the user can fix.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from prunecomp_export.adapters import Adapter, adapter_for
from prunecomp_export.bench.timing import benchmark, onnx_exporter, require_runtimes, runtimes_for, speedups_at
from prunecomp_export.costs import CostMeter, StageCost
from prunecomp_export.engine.execution import Placement, check_cache_dir, plan_placement, resolve_device
from prunecomp_export.engine.layerwise import trim_host_memory
from prunecomp_export.engine.loop import Plan, Trajectory, make_plan, prune
from prunecomp_export.errors import RecipeError
from prunecomp_export.evaluation.evaluator import DenseCache, Evaluator, Measurement
from prunecomp_export.output.checkpoint import ReloadCheck, dtype_name, write_verification_sample
from prunecomp_export.output.manifest import write_manifest
from prunecomp_export.output.outputdir import OutputLock, check_output_dir, staged_output
from prunecomp_export.progress import Reporter
from prunecomp_export.recipe import Recipe, dump_recipe
from prunecomp_export.report.render import write_reports
from prunecomp_export.report.results import (
    SCHEMA,
    Execution,
    MeasurementRow,
    ModelInfo,
    RunResults,
    Summary,
    TrajectoryInfo,
    deployed_targets,
)
from prunecomp_export.report.signoff import (
    accuracy_kept,
    accuracy_kept_interval,
    add_paired_differences,
    corpus_figures,
    evaluate_signoff,
    perplexity_ratios,
)
from prunecomp_export.source import calibration, corpus
from prunecomp_export.source.loading import (
    ResolvedSource,
    compute_dtype,
    load_config,
    load_tokenizer,
    local_checkpoint,
    resolve_source,
    source_identity,
)
from prunecomp_export.targets import build_targets, validated_options

PACKAGES = ("prunecomp-export", "torch", "transformers", "safetensors", "tokenizers", "gguf", "numpy")


@dataclass
class RunResult:
    output: Path
    model_type: str
    layers_before: int
    layers_after: int
    trajectory: Trajectory
    results: RunResults | None = None
    targets: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0
    costs: list[StageCost] = field(default_factory=list)

    @property
    def measurements(self) -> list[Measurement]:
        return [] if self.results is None else [Measurement(**row.model_dump()) for row in self.results.measurements]

    @property
    def signoff_passed(self) -> bool:
        return self.results is None or self.results.signoff.passed


@dataclass
class Checked:
    """What preflight established without reading a weight."""

    recipe: Recipe
    source: ResolvedSource
    config: Any
    adapter: Adapter
    tied: bool
    plan: Plan
    target_options: dict[str, Any]
    runtimes: list[str]
    output: Path


@dataclass
class DryRunResult:
    model_type: str
    num_layers: int
    tied_embeddings: bool
    plan: Plan
    targets: list[str]


@dataclass
class Loaded:
    """The source as the run uses it: files, tokenizer, token windows, the layer-by-layer model."""

    variants: Any  # ModelVariants (imported with torch, in the load stage)
    tokenizer: Any
    identity: dict
    batches: list
    sample: Any
    evaluator: Evaluator
    placement: Placement


def preflight(recipe: Recipe, targets: list[str], bench: bool = False) -> Checked:
    """Everything that can be checked without weights: source, architecture, plan, corpora, target
    options, bench runtimes."""
    output = Path(recipe.output.dir)
    source = resolve_source(recipe.model)
    protected = [Path(source.location), *source.files] if source.local else []
    check_output_dir(output, overwrite=recipe.output.overwrite, protected=protected)
    config = load_config(source, recipe.model)
    adapter = adapter_for(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    batches = -(-recipe.calibration.num_samples // recipe.calibration.batch_size)
    plan = make_plan(recipe.prune, config.num_hidden_layers, tied, num_batches=batches)
    if plan.compensation == "linear" and (refusal := adapter.output_map_refusal()) is not None:
        raise RecipeError(refusal, key="prune.compensation")
    calibration.check_calibration_source(recipe.calibration)
    if recipe.evaluation.perplexity is not None:
        for index, name in enumerate(recipe.evaluation.perplexity.corpora):
            corpus.check_corpus(name, key=f"evaluation.perplexity.corpora.{index}")
    options = {name: validated_options(name, recipe.targets.get(name, {})) for name in targets}
    runtimes = runtimes_for(recipe.bench, targets) if bench else []
    require_runtimes(runtimes)
    resolve_device(recipe.execution)
    check_cache_dir(recipe.execution)
    return Checked(recipe, source, config, adapter, tied, plan, options, runtimes, output)


def dry_run(recipe: Recipe, targets: list[str], bench: bool = False) -> DryRunResult:
    checked = preflight(recipe, targets, bench)
    config = checked.config
    return DryRunResult(config.model_type, config.num_hidden_layers, checked.tied, checked.plan, targets)


def run(recipe: Recipe, targets: list[str], reporter: Reporter | None = None, bench: bool = False) -> RunResult:
    reporter = reporter or Reporter()
    started = time.perf_counter()
    checked = preflight(recipe, targets, bench)
    meter = CostMeter()
    overwrite = recipe.output.overwrite
    with OutputLock(checked.output), staged_output(checked.output, overwrite=overwrite) as stage:
        with meter.stage("load") as cost:
            loaded = _load(checked, stage, reporter, cost)
            trim_host_memory()  # tokenizing a corpus leaves hundreds of MB of freed heap behind
        with meter.stage("prune") as cost:
            trajectory = _prune(checked, loaded, reporter, cost)
            trim_host_memory()
        with meter.stage("evaluate") as cost:
            measurements = _evaluate(checked, loaded, trajectory, reporter)
            cost.child_peak_rss_bytes = loaded.evaluator.child_peak_rss_bytes or None
        with meter.stage("save") as cost:
            checkpoint, verification = _save(checked, loaded, trajectory, stage, reporter, cost)
        with meter.stage("targets") as cost:
            target_records = _targets(checked, checkpoint, stage, reporter, cost)
        bench_results = None
        if bench:
            with meter.stage("bench"):
                bench_results = _bench(checked, loaded, trajectory, checkpoint, stage, reporter)
                (stage / "bench.json").write_text(json.dumps(bench_results, indent=2) + "\n")
        with meter.stage("report"):
            (stage / "recipe.resolved.yaml").write_text(dump_recipe(recorded_recipe(recipe)))
            (stage / "trajectory.json").write_text(json.dumps(trajectory.to_json(), indent=2) + "\n")
            results = _results(checked, loaded, trajectory, measurements, target_records, bench_results, meter)
            write_reports(results, stage)
        shutil.rmtree(loaded.variants.scratch, ignore_errors=True)
        _write_manifest(stage, checked, loaded.identity, trajectory, verification, target_records, results)
    return RunResult(
        checked.output,
        checked.config.model_type,
        checked.plan.num_layers,
        checked.plan.num_layers - checked.plan.num_drop,
        trajectory,
        results,
        target_records,
        time.perf_counter() - started,
        meter.stages,
    )


def _load(checked: Checked, stage: Path, reporter: Reporter, cost) -> Loaded:
    """The source as plain safetensors, the tokenizer, the token windows and the layer-by-layer
    model, placed by the memory budget."""
    import torch

    from prunecomp_export.engine.layerwise import LayerwiseModel, slice_bytes
    from prunecomp_export.source.weights import SafetensorsCheckpoint
    from prunecomp_export.variants import ModelVariants

    recipe = checked.recipe
    reporter.log(f"stage load: {checked.source.description}")
    identity = source_identity(checked.source)
    directory, child_peak = local_checkpoint(checked.source, recipe.model, identity, reporter.log)
    cost.child_peak_rss_bytes = child_peak
    tokenizer = load_tokenizer(directory, recipe.model)
    windows = calibration.calibration_windows(recipe.calibration, tokenizer)
    batches = list(windows.split(recipe.calibration.batch_size))
    evaluator = Evaluator(recipe.evaluation, tokenizer, reporter)

    device = resolve_device(recipe.execution)
    dtype = compute_dtype(recipe.model, checked.config)
    files = SafetensorsCheckpoint(directory)
    # the local checkpoint's own config: for GGUF it is what transformers wrote when dequantising
    config = load_config(ResolvedSource(str(directory), None, True, f"dir:{directory}"), recipe.model)
    weights_bytes, largest = slice_bytes(files, checked.adapter, dtype)
    element = torch.empty((), dtype=dtype).element_size()
    cache_bytes = (checked.plan.num_layers + 1) * windows.numel() * config.hidden_size * element
    placement = plan_placement(
        recipe.execution, device, weights_bytes=weights_bytes, largest_slice_bytes=largest, cache_bytes=cache_bytes
    )
    model = LayerwiseModel(
        files, config, checked.adapter, device, dtype, resident=placement.weights_resident,
        attn_implementation=recipe.model.attn_implementation,
    )  # fmt: skip
    cost.notes.update(placement.describe())
    reporter.log(
        f"stage load: {device}, {dtype}; weights {placement.describe()['weights']} "
        f"({weights_bytes / 1e9:.2f} GB), stream cache on {placement.cache} ({cache_bytes / 1e9:.2f} GB), "
        f"budget {placement.budget_bytes / 1e9:.2f} GB"
    )
    variants = ModelVariants(directory, files, config, checked.adapter, model, checked.plan, stage / ".scratch")
    return Loaded(variants, tokenizer, identity, batches, windows[:2, :64], evaluator, placement)


def _prune(checked: Checked, loaded: Loaded, reporter: Reporter, cost) -> Trajectory:
    from prunecomp_export.engine.stream_cache import StreamCache

    plan, placement = checked.plan, loaded.placement
    schedule = checked.recipe.prune.schedule
    reporter.log(f"stage prune: {plan.num_drop} of {plan.num_layers} layers ({schedule}, {plan.metric.name})")
    model = loaded.variants.model
    with StreamCache.open(placement.cache, model.device, len(loaded.batches), placement.cache_dir) as cache:
        trajectory = prune(model, loaded.batches, plan, schedule, cache, reporter)
        cost.notes.update({"stream_cache": placement.cache, "stream_cache_peak_bytes": cache.peak_nbytes})
    return trajectory


def _save(checked: Checked, loaded: Loaded, trajectory: Trajectory, stage: Path, reporter, cost):
    """The final variant written by tensor surgery from the source files, then reloaded with
    transformers in a child process and compared with what the engine computes for it. The sample
    and the expected logits stay in the output (``verification.safetensors``) and how the check ran
    in the manifest, so ``prunecomp-export verify`` can repeat it without the source."""
    recipe, variants = checked.recipe, loaded.variants
    final = variants.prunecomp(trajectory, checked.plan.num_drop)
    checkpoint = stage / "checkpoint"
    reporter.log(f"stage save: writing the checkpoint by tensor surgery to {checked.output / 'checkpoint'}")
    variants.write(final, checkpoint, recipe.output.max_shard_size)
    if not recipe.output.verify:
        return checkpoint, None
    check = ReloadCheck(dtype_name(variants.model.dtype), recipe.model.attn_implementation, str(variants.model.device))
    write_verification_sample(stage / check.sample_file, loaded.sample, variants.logits(final, loaded.sample))
    verification, cost.child_peak_rss_bytes = check.run(stage)
    return checkpoint, {**verification, "check": check.to_json()}


def _trajectory_points(recipe: Recipe, plan: Plan) -> list[int]:
    """Numbers of removed layers, short of the final one, at which to evaluate again."""
    wanted = recipe.evaluation.trajectory
    points = range(1, plan.num_drop) if wanted == "all" else wanted
    return sorted({k for k in points if k < plan.num_drop})


def _evaluate(checked: Checked, loaded: Loaded, trajectory: Trajectory, reporter: Reporter) -> list[Measurement]:
    """Dense (cached by model hash), Prune&Comp at the final count and at each trajectory point, and
    the one-shot baseline beside each: every variant derived from the source files."""
    evaluator, variants, recipe, plan = loaded.evaluator, loaded.variants, checked.recipe, checked.plan
    if not evaluator.enabled:
        return []
    reporter.log("stage evaluate")
    cache = DenseCache(
        loaded.identity["sha256"], {**evaluator.protocol(), "dtype": str(variants.model.dtype)},
        recipe.evaluation.cache_dense,
    )  # fmt: skip
    cached = cache.load(list(evaluator.windows))
    if cached is not None:
        reporter.log(f"dense results reused from {cache.path}")
        rows, evaluator.dense_finals = cached
    else:
        rows = evaluator.evaluate(variants, variants.dense)
        cache.store(rows, evaluator.dense_finals)
    points = _trajectory_points(recipe, plan)
    for k in [*points, plan.num_drop]:
        variant = variants.prunecomp(trajectory, k)
        if variant is None:
            reporter.log(f"no checkpoint with {k} layers removed in a {trajectory.schedule} run; skipped")
            continue
        rows += evaluator.evaluate(variants, variant)
        if recipe.evaluation.baseline:
            rows += evaluator.evaluate(variants, variants.baseline(trajectory, k))
    add_paired_differences(rows)
    return rows


def _targets(checked: Checked, checkpoint: Path, stage: Path, reporter: Reporter, cost) -> dict[str, dict]:
    """Each target built from the written checkpoint in a child process of its own."""
    builds = build_targets(checked.target_options, checkpoint, stage, reporter.log)
    for name, peak in builds.peak_rss_bytes.items():
        cost.notes[f"{name}_child_peak_rss_bytes"] = peak
    cost.child_peak_rss_bytes = max(builds.peak_rss_bytes.values(), default=None)
    return builds.records


def _bench(checked: Checked, loaded: Loaded, trajectory: Trajectory, checkpoint: Path, stage: Path, reporter) -> dict:
    """Time the dense source and each requested point, each written by tensor surgery into the
    scratch directory (removed afterwards), and the final checkpoint."""
    from contextlib import ExitStack

    recipe, plan, variants = checked.recipe, checked.plan, loaded.variants
    wanted = recipe.bench.points
    points = sorted({k for k in (range(1, plan.num_drop + 1) if wanted == "all" else wanted) if k <= plan.num_drop})
    onnx_export = onnx_exporter(variants.scratch / "bench", {checkpoint: stage / "targets" / "onnx"})
    with ExitStack() as stack:
        checkpoints = {0: stack.enter_context(variants.materialised(variants.dense)), plan.num_drop: checkpoint}
        for k in points:
            variant = variants.prunecomp(trajectory, k)
            if k != plan.num_drop and variant is not None:
                checkpoints[k] = stack.enter_context(variants.materialised(variant))
        reporter.log(f"stage bench: {', '.join(checked.runtimes)} on {len(checkpoints)} checkpoints")
        vocab = checked.config.vocab_size
        return benchmark(recipe.bench, checked.runtimes, checkpoints, plan.num_layers, vocab, reporter, onnx_export)


def _results(
    checked: Checked, loaded: Loaded, trajectory: Trajectory, rows, target_records, bench_results, meter
) -> RunResults:
    recipe, plan = checked.recipe, checked.plan
    final = plan.num_drop
    identity = loaded.identity
    return RunResults(
        schema=SCHEMA,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo(
            source=identity["source"],
            sha256=identity["sha256"],
            model_type=checked.config.model_type,
            layers_before=plan.num_layers,
            layers_after=plan.num_layers - final,
            layers_removed=final,
        ),
        recipe=recorded_recipe(recipe).model_dump(mode="json"),
        seeds={"calibration": recipe.calibration.seed},
        trajectory=TrajectoryInfo.model_validate(trajectory.to_json()),
        protocol=loaded.evaluator.protocol(),
        measurements=[MeasurementRow.model_validate(row.to_json()) for row in rows],
        summary=_summary(rows, final),
        bench=bench_results,
        signoff=evaluate_signoff(
            recipe.signoff, rows, final, speedups_at(bench_results, final) if bench_results else None
        ),
        execution=Execution.model_validate(loaded.placement.describe()),
        targets=deployed_targets(target_records),
        costs=meter.stages,
        peak_rss_bytes=meter.process_peak_rss_bytes(),
        packages=_package_versions(),
        machine=_machine(),
    )


def _summary(rows, final: int) -> Summary:
    """The final pruned model and the one-shot baseline against the dense model."""
    margins = {v: accuracy_kept_interval(rows, v, final) for v in ("prunecomp", "baseline")}
    agreement = {v: corpus_figures(rows, "top1_agreement", v, final) for v in ("prunecomp", "baseline")}
    return Summary(
        perplexity_ratio=perplexity_ratios(rows, "prunecomp", final),
        baseline_perplexity_ratio=perplexity_ratios(rows, "baseline", final),
        accuracy_kept_percent=accuracy_kept(rows, "prunecomp", final),
        baseline_accuracy_kept_percent=accuracy_kept(rows, "baseline", final),
        accuracy_kept_margin=None if margins["prunecomp"] is None else margins["prunecomp"].margin,
        baseline_accuracy_kept_margin=None if margins["baseline"] is None else margins["baseline"].margin,
        kl_divergence=corpus_figures(rows, "kl_divergence", "prunecomp", final),
        baseline_kl_divergence=corpus_figures(rows, "kl_divergence", "baseline", final),
        top1_agreement_percent={c: 100.0 * v for c, v in agreement["prunecomp"].items()},
        baseline_top1_agreement_percent={c: 100.0 * v for c, v in agreement["baseline"].items()},
    )


def recorded_recipe(recipe: Recipe) -> Recipe:
    """The recipe as the output records it: ``output.dir`` is ``.``, the output itself. Every path
    inside an output is relative to it: the output is written in a staging directory and renamed,
    and may be moved or copied to another machine after."""
    return recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": "."})})


def _write_manifest(stage: Path, checked: Checked, identity, trajectory, verification, targets, results) -> None:
    plan = checked.plan
    manifest = {
        "source_model": identity,
        "recipe": recorded_recipe(checked.recipe).model_dump(mode="json"),
        "model_type": checked.config.model_type,
        "layers_before": plan.num_layers,
        "layers_after": plan.num_layers - plan.num_drop,
        "removed": [step.to_json() for step in trajectory.steps],
        "compensation": trajectory.compensation,
        "fold_form": trajectory.fold_form,
        "untied_embeddings": trajectory.untie,
        "verification": verification,
        "targets": targets,
        "packages": results.packages,
        "machine": results.machine,
    }
    write_manifest(stage, manifest)


def _machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
