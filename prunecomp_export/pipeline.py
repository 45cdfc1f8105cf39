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
from prunecomp_export.engine.execution import Placement, resolve_device
from prunecomp_export.engine.layerwise import trim_host_memory
from prunecomp_export.engine.loop import Plan, Trajectory, check_points, make_plan, prune
from prunecomp_export.errors import RecipeError
from prunecomp_export.evaluation.evaluator import DenseCache, Evaluator, Measurement
from prunecomp_export.memory import RELOAD, Machine, MemoryPlan, ModelShape, make_memory_plan
from prunecomp_export.output.checkpoint import dtype_name, write_verification_sample
from prunecomp_export.output.manifest import Manifest, ReloadCheck, ReloadResult, SourceModel, write_manifest
from prunecomp_export.output.outputdir import OutputLock, recipe_output, staged_output
from prunecomp_export.progress import Reporter
from prunecomp_export.recipe import Recipe, dump_recipe
from prunecomp_export.report.render import write_reports
from prunecomp_export.report.results import (
    SCHEMA,
    Execution,
    MeasurementRow,
    MemoryPlanRecord,
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
    with_target_parity,
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
from prunecomp_export.targets import TargetContext, build_targets, validated_options

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
    memory: MemoryPlan
    target_options: dict[str, Any]
    #: what every target knows of the run (architecture, device, the plan's memory for it)
    target_context: TargetContext
    runtimes: list[str]
    output: Path


@dataclass
class DryRunResult:
    model_type: str
    num_layers: int
    tied_embeddings: bool
    plan: Plan
    memory: MemoryPlan
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


def preflight(recipe: Recipe, targets: list[str], bench: bool = False, machine: Machine | None = None) -> Checked:
    """Everything that can be checked without weights: source, architecture, plan, lengths, trajectory
    and bench points, corpora, QA tasks and backend, sign-off thresholds, target options, bench
    runtimes, and the memory plan of every stage (for ``machine``, default this one)."""
    output = recipe_output(recipe, require_weights=machine is None)
    source = resolve_source(recipe.model, require_weights=machine is None)
    _check_signoff(recipe, bench)
    config = load_config(source, recipe.model)
    adapter = adapter_for(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    batches = -(-recipe.calibration.num_samples // recipe.calibration.batch_size)
    plan = make_plan(recipe.prune, config.num_hidden_layers, tied, num_batches=batches)
    if plan.compensation == "linear" and (refusal := adapter.output_map_refusal()) is not None:
        raise RecipeError(refusal, key="prune.compensation")
    check_points(recipe.evaluation.trajectory, plan, key="evaluation.trajectory", final_included=False)
    if bench:
        check_points(recipe.bench.points, plan, key="bench.points", final_included=True)
    _check_lengths(recipe, config, bench)
    calibration.check_calibration_source(recipe.calibration)
    if recipe.evaluation.qa is not None:
        from prunecomp_export.evaluation import qa

        qa.validate_tasks(recipe.evaluation.qa.tasks)  # lm-eval's task index only for a task not built offline
        qa.require_backend(recipe.evaluation.qa.backend)
    if recipe.evaluation.perplexity is not None:
        for index, name in enumerate(recipe.evaluation.perplexity.corpora):
            corpus.check_corpus(name, key=f"evaluation.perplexity.corpora.{index}")
    device = machine.device if machine is not None else str(resolve_device(recipe.execution))
    context = TargetContext(architecture=(getattr(config, "architectures", None) or [""])[0], device=device)
    here = machine is None  # a plan for another machine checks the options, not this machine's runtimes
    options = {name: validated_options(name, recipe.targets.get(name, {}), context, here=here) for name in targets}
    runtimes = runtimes_for(recipe.bench, targets) if bench else []
    if here:
        require_runtimes(runtimes)
    memory = memory_plan(recipe, config, adapter, options, bench, machine, plan.num_layers - plan.num_drop)
    context = context.model_copy(update={"logits_chunk": memory.logits_chunk, "vllm_engine": _vllm_engine(memory)})
    return Checked(recipe, source, config, adapter, tied, plan, memory, options, context, runtimes, output)


def checkpoint_targets(recipe: Recipe, checkpoint: Path, names: list[str]) -> tuple[dict[str, Any], TargetContext]:
    """For a written checkpoint (``export``, ``serve``): the targets' validated options, and their
    context with the memory the plan gives them on this machine; a target stage that cannot fit is
    refused in one line."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    adapter = adapter_for(config)
    device = resolve_device(recipe.execution)
    context = TargetContext(architecture=(getattr(config, "architectures", None) or [""])[0], device=str(device))
    options = {name: validated_options(name, recipe.targets.get(name, {}), context) for name in names}
    shape = ModelShape.from_config(config, adapter, compute_dtype(recipe.model, config))
    memory = make_memory_plan(recipe, shape, Machine.here(device), targets=options, bench=False)
    for stage in memory.stages:
        if stage.stage.startswith("targets:") and not stage.fits and stage.refusal is not None:
            raise RecipeError(stage.refusal, key="execution.memory_budget")
    return options, context.model_copy(
        update={"logits_chunk": memory.logits_chunk, "vllm_engine": _vllm_engine(memory)}
    )


def _vllm_engine(memory: MemoryPlan) -> dict[str, Any]:
    """The memory the plan gives the vllm target (none when it is not built)."""
    planned = next((stage for stage in memory.stages if stage.stage == "targets: vllm"), None)
    return dict(planned.vllm_engine or {}) if planned is not None else {}


def memory_plan(
    recipe: Recipe,
    config,
    adapter: Adapter,
    targets: dict[str, Any],
    bench: bool,
    machine: Machine | None,
    layers_after: int | None = None,
):
    """The memory plan of every stage (``memory.py``), refused in one line when a stage cannot fit."""
    if machine is None:
        machine = Machine.here(resolve_device(recipe.execution))
    elif recipe.execution.device not in ("auto", machine.device.partition(":")[0]):
        raise RecipeError(
            f"{recipe.execution.device!r} does not match the machine planned for ({machine.device})",
            key="execution.device",
        )
    shape = ModelShape.from_config(config, adapter, compute_dtype(recipe.model, config))
    memory = make_memory_plan(recipe, shape, machine, targets=targets, bench=bench, layers_after=layers_after)
    memory.check()
    return memory


def _check_signoff(recipe: Recipe, bench: bool) -> None:
    """A threshold whose figure the run will not measure would fail it after all the work: refused now."""
    signoff, evaluation = recipe.signoff, recipe.evaluation
    if signoff.min_speedup is not None and not bench:
        raise RecipeError("needs the latency benchmark: run with --bench (or drop the threshold)",
                          key="signoff.min_speedup")  # fmt: skip
    if signoff.min_accuracy_kept is not None and evaluation.qa is None:
        raise RecipeError("needs evaluation.qa (QA accuracy), which is null", key="signoff.min_accuracy_kept")
    for key in ("max_perplexity_ratio", "max_kl_divergence", "min_top1_agreement"):
        if getattr(signoff, key) is not None and evaluation.perplexity is None:
            raise RecipeError("needs evaluation.perplexity, which is null", key=f"signoff.{key}")


def _check_lengths(recipe: Recipe, config: Any, bench: bool) -> None:
    """Token lengths the model cannot take: longer than its ``max_position_embeddings``."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return
    # key -> (what is that long, its length in tokens)
    lengths = {"calibration.seq_len": ("a calibration window", recipe.calibration.seq_len)}
    if recipe.evaluation.perplexity is not None:
        lengths["evaluation.perplexity.seq_len"] = ("a perplexity window", recipe.evaluation.perplexity.seq_len)
    if bench:
        for index, scenario in enumerate(recipe.bench.scenarios):
            key = f"bench.scenarios.{index}"
            if scenario.kind == "prefill":
                lengths[f"{key}.prompt_len"] = ("the prompt", scenario.prompt_len)
            elif scenario.kind == "decode":
                lengths[f"{key}.past_len"] = ("past_len + 1", scenario.past_len + 1)
            else:
                lengths[f"{key}.new_tokens"] = ("prompt_len + new_tokens", scenario.prompt_len + scenario.new_tokens)
    for key, (what, length) in lengths.items():
        if length > limit:
            raise RecipeError(
                f"{what} is {length} tokens, more than the model's max_position_embeddings ({limit})", key=key
            )


def dry_run(recipe: Recipe, targets: list[str], bench: bool = False, machine: Machine | None = None) -> DryRunResult:
    checked = preflight(recipe, targets, bench, machine)
    config = checked.config
    return DryRunResult(
        config.model_type, config.num_hidden_layers, checked.tied, checked.plan, checked.memory, targets
    )


def run(
    recipe: Recipe,
    targets: list[str],
    reporter: Reporter | None = None,
    bench: bool = False,
    lock: OutputLock | None = None,
) -> RunResult:
    """The whole job, under the output's lock: ``lock``, when the caller already holds it (the CLI takes
    it before importing this module), else one taken before the slow checks."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    meter = CostMeter()
    overwrite = recipe.output.overwrite
    output = recipe_output(recipe)
    if lock is not None and lock.out != output.resolve():
        raise ValueError(f"the lock given is {lock.out}'s, not {output}'s")
    # the lock first: a second run on this output fails at once, not after the slow checks
    with lock or OutputLock(output), staged_output(output, overwrite=overwrite) as stage:
        checked = preflight(recipe, targets, bench)
        with meter.stage("load") as cost:
            loaded = _load(checked, stage, reporter, cost)
            trim_host_memory()  # tokenizing a corpus leaves hundreds of MB of freed heap behind
        with meter.stage("prune") as cost:
            trajectory = _prune(checked, loaded, reporter, cost)
            trim_host_memory()
        with meter.stage("evaluate"):
            measurements = _evaluate(checked, loaded, trajectory, reporter)
        with meter.stage("save"):
            checkpoint, verification = _save(checked, loaded, trajectory, stage, reporter)
        with meter.stage("targets"):
            loaded.variants.model.release()
            target_records = _targets(checked, checkpoint, stage, reporter)
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

    from prunecomp_export.engine.layerwise import LayerwiseModel
    from prunecomp_export.source.weights import SafetensorsCheckpoint
    from prunecomp_export.variants import ModelVariants

    recipe = checked.recipe
    reporter.log(f"stage load: {checked.source.description}")
    identity = source_identity(checked.source)
    directory = local_checkpoint(checked.source, recipe.model, identity, reporter.log)
    tokenizer = load_tokenizer(directory, recipe.model)
    windows = calibration.calibration_windows(recipe.calibration, tokenizer)
    batches = list(windows.split(recipe.calibration.batch_size))
    evaluator = Evaluator(recipe.evaluation, tokenizer, reporter, checked.memory)

    device = resolve_device(recipe.execution)
    dtype = compute_dtype(recipe.model, checked.config)
    files = SafetensorsCheckpoint(directory)
    # the local checkpoint's own config: for GGUF it is what transformers wrote when dequantising
    config = load_config(ResolvedSource(str(directory), None, True, f"dir:{directory}"), recipe.model)
    memory = checked.memory
    placement = memory.placement
    model = LayerwiseModel(
        files, config, checked.adapter, device, dtype, resident=placement.weights_resident,
        attn_implementation=recipe.model.attn_implementation, logits_chunk=memory.logits_chunk,
    )  # fmt: skip
    cost.notes.update(placement.describe())
    reporter.log(
        f"stage load: {device}, {dtype}; weights {placement.describe()['weights']} "
        f"({placement.weights_bytes / 1e9:.2f} GB), stream cache on {placement.cache} "
        f"({placement.cache_bytes / 1e9:.2f} GB), budget {placement.budget_bytes / 1e9:.2f} GB, "
        f"head in chunks of {memory.logits_chunk} tokens"
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


def _save(checked: Checked, loaded: Loaded, trajectory: Trajectory, stage: Path, reporter):
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
    load = checked.memory.stage(RELOAD).load
    check = ReloadCheck(
        dtype=dtype_name(variants.model.dtype),
        attn_implementation=recipe.model.attn_implementation,
        device=str(variants.model.device),
        max_memory=None if load is None else load.max_memory,
    )
    write_verification_sample(stage / check.sample_file, loaded.sample, variants.logits(final, loaded.sample))
    variants.model.release()  # the reload check's child gets the memory this process held
    verification = check.run(stage, scratch=variants.scratch)
    return checkpoint, ReloadResult(**verification, check=check)


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
    dense = None
    if cached is not None:
        reporter.log(f"dense results reused from {cache.path}")
        dense, evaluator.dense_finals = cached
    # the dense model first: its streams are the reference of every divergence figure
    models = [] if dense is not None else [variants.dense]
    for k in [*_trajectory_points(recipe, plan), plan.num_drop]:
        variant = variants.prunecomp(trajectory, k)
        if variant is None:
            reporter.log(f"no checkpoint with {k} layers removed in a {trajectory.schedule} run; skipped")
            continue
        models += [variant, variants.baseline(trajectory, k)] if recipe.evaluation.baseline else [variant]
    rows = evaluator.evaluate(variants, models)
    if dense is None:
        dense = [row for row in rows if row.variant == "dense"]
        cache.store(dense, evaluator.dense_finals)
        rows = [row for row in rows if row.variant != "dense"]
    rows = dense + rows
    add_paired_differences(rows)
    return rows


def _targets(checked: Checked, checkpoint: Path, stage: Path, reporter: Reporter) -> dict[str, dict]:
    """Each target built from the written checkpoint in a child process of its own."""
    return build_targets(checked.target_options, checkpoint, stage, reporter.log, checked.target_context)


def _bench(checked: Checked, loaded: Loaded, trajectory: Trajectory, checkpoint: Path, stage: Path, reporter) -> dict:
    """Time the dense source and each requested point, each written by tensor surgery into the
    scratch directory (removed afterwards), and the final checkpoint."""
    from contextlib import ExitStack

    recipe, plan, variants = checked.recipe, checked.plan, loaded.variants
    wanted = recipe.bench.points
    points = sorted({k for k in (range(1, plan.num_drop + 1) if wanted == "all" else wanted) if k <= plan.num_drop})
    device, dtype = str(variants.model.device), dtype_name(variants.model.dtype)
    onnx_export = onnx_exporter(variants.scratch / "bench", {checkpoint: stage / "targets" / "onnx"}, device, dtype)
    with ExitStack() as stack:
        checkpoints = {0: stack.enter_context(variants.materialised(variants.dense)), plan.num_drop: checkpoint}
        for k in points:
            variant = variants.prunecomp(trajectory, k)
            if k != plan.num_drop and variant is not None:
                checkpoints[k] = stack.enter_context(variants.materialised(variant))
        reporter.log(f"stage bench: {', '.join(checked.runtimes)} on {len(checkpoints)} checkpoints")
        vocab = checked.config.vocab_size
        return benchmark(
            recipe.bench, checked.runtimes, checkpoints, plan.num_layers, vocab, reporter, onnx_export,
            device=device, dtype=dtype,
            vllm_engine=bench_vllm_engine(checked.target_options, checked.target_context, dtype),
        )  # fmt: skip


def bench_vllm_engine(options: dict[str, Any], context: TargetContext, dtype: str) -> dict[str, Any]:
    """vLLM's engine for the bench: the vllm target's settings (the run's compute dtype where no
    vllm target is built) and the memory the plan gives vLLM."""
    from prunecomp_export.targets.vllm import Options

    chosen = options.get("vllm") or Options(dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "auto")
    return {k: v for k, v in chosen.engine(context.vllm_engine).items() if k != "max_model_len"}


def _results(
    checked: Checked, loaded: Loaded, trajectory: Trajectory, rows, target_records, bench_results, meter
) -> RunResults:
    recipe, plan = checked.recipe, checked.plan
    final = plan.num_drop
    identity = loaded.identity
    targets = deployed_targets(target_records)
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
        signoff=with_target_parity(
            evaluate_signoff(recipe.signoff, rows, final, speedups_at(bench_results, final) if bench_results else None),
            targets,
        ),
        execution=Execution.model_validate(loaded.placement.describe()),
        memory_plan=MemoryPlanRecord.model_validate(checked.memory.to_json()),
        targets=targets,
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
    manifest = Manifest.model_validate(
        {
            "source_model": SourceModel.model_validate(identity),
            "recipe": recorded_recipe(checked.recipe),
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
            "files": {},  # write_manifest lists them, last
        }
    )
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
