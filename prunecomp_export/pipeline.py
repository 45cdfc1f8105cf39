"""The whole job, top to bottom: recipe -> load -> calibrate -> score -> fold -> save -> targets.

``run`` is the library call behind the CLI; it returns a ``RunResult`` and raises
``PrunecompError`` subclasses for anything the user can fix.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from pydantic import ValidationError

from prunecomp_export import calibration, corpus
from prunecomp_export.adapters import adapter_for
from prunecomp_export.bench import benchmark, runtimes_for, speedups_at
from prunecomp_export.checkpoint import save_checkpoint, sha256_tree, staged_directory, verify_reload
from prunecomp_export.engine import (
    Plan,
    Step,
    Trajectory,
    apply_steps,
    baseline_layers,
    make_plan,
    prune,
    replay,
    steps_for,
)
from prunecomp_export.errors import RecipeError
from prunecomp_export.evaluation import DenseCache, Evaluator, Measurement
from prunecomp_export.loading import load_config, load_model, resolve_source, source_identity
from prunecomp_export.progress import Reporter
from prunecomp_export.recipe import Recipe, dump_recipe
from prunecomp_export.report import SCHEMA, write_reports
from prunecomp_export.signoff import accuracy_kept, evaluate_signoff, perplexity_ratios
from prunecomp_export.targets import load_target

MANIFEST = "prunecomp_manifest.json"
PACKAGES = ("prunecomp-export", "torch", "transformers", "safetensors", "tokenizers", "gguf", "numpy")


@dataclass
class RunResult:
    output: Path
    model_type: str
    layers_before: int
    layers_after: int
    trajectory: Trajectory
    results: dict = field(default_factory=dict)
    targets: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def measurements(self) -> list[Measurement]:
        return [Measurement(**row) for row in self.results.get("measurements", [])]

    @property
    def signoff_passed(self) -> bool:
        return bool(self.results.get("signoff", {}).get("passed", True))


@dataclass
class DryRunResult:
    model_type: str
    num_layers: int
    tied_embeddings: bool
    plan: Plan
    targets: list[str]


def _prepare(recipe: Recipe, targets: list[str]):
    """Everything that can be checked without weights: source, architecture, plan, target options."""
    source = resolve_source(recipe.model)
    config = load_config(source, recipe.model)
    adapter = adapter_for(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan = make_plan(recipe.prune, config.num_hidden_layers, tied)
    calibration.check_calibration_source(recipe.calibration)
    if recipe.evaluation.perplexity is not None:
        for index, name in enumerate(recipe.evaluation.perplexity.corpora):
            corpus.check_corpus(name, key=f"evaluation.perplexity.corpora.{index}")
    options = {}
    for name in targets:
        module = load_target(name)
        try:
            options[name] = module.Options.model_validate(recipe.targets.get(name, {}))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(["targets", name, *map(str, err["loc"])])
            raise RecipeError(err["msg"], key=key) from None
    return source, config, adapter, tied, plan, options


def dry_run(recipe: Recipe, targets: list[str]) -> DryRunResult:
    _source, config, _adapter, tied, plan, _options = _prepare(recipe, targets)
    return DryRunResult(config.model_type, config.num_hidden_layers, tied, plan, targets)


def run(recipe: Recipe, targets: list[str], reporter: Reporter | None = None, bench: bool = False) -> RunResult:
    reporter = reporter or Reporter()
    log = reporter.log
    started = time.perf_counter()
    output = Path(recipe.output.dir)
    if output.exists() and not recipe.output.overwrite:
        raise RecipeError(f"{output} exists (set output.overwrite: true to replace it)", key="output.dir")
    source, config, adapter, _tied, plan, target_options = _prepare(recipe, targets)

    log(f"loading {source.description}")
    model, tokenizer = load_model(source, recipe.model)
    identity = source_identity(source)

    log("building calibration and evaluation windows")
    windows = calibration.calibration_windows(recipe.calibration, tokenizer)
    batches = list(windows.split(recipe.calibration.batch_size))
    evaluator = Evaluator(recipe.evaluation, tokenizer, reporter)
    measurements = _dense_measurements(model, evaluator, identity, recipe, log)

    log(f"pruning {plan.num_drop} of {plan.num_layers} layers ({recipe.prune.schedule}, {plan.metric.name})")
    points = _trajectory_points(recipe, plan)
    keep_dense = bench or (evaluator.enabled and (recipe.evaluation.baseline or bool(points)))
    runtimes = runtimes_for(recipe.bench, targets) if bench else []
    dense = model
    model = copy.deepcopy(dense) if keep_dense else dense
    trajectory = prune(model, adapter, batches, plan, recipe.prune.schedule, reporter)
    measurements += evaluator.evaluate(model, "prunecomp", plan.num_drop)
    if keep_dense and evaluator.enabled:
        measurements += _along_trajectory(
            dense, adapter, plan, trajectory, points, evaluator, recipe, log, consume_dense=not bench
        )

    with staged_directory(output, overwrite=recipe.output.overwrite) as stage:
        checkpoint = stage / "checkpoint"
        log(f"saving the checkpoint to {output / 'checkpoint'}")
        save_checkpoint(model, tokenizer, checkpoint, recipe.output.max_shard_size)
        verification = verify_reload(model, checkpoint, windows[:2, :64]) if recipe.output.verify else None
        target_records = {}
        for name, options in target_options.items():
            if name == "hf":
                continue
            log(f"target {name}")
            out_dir = stage / "targets" / name
            out_dir.mkdir(parents=True)
            target_records[name] = load_target(name).build(checkpoint, out_dir, options)
        bench_results = None
        if bench:
            bench_results = _bench(
                recipe, runtimes, dense, tokenizer, adapter, plan, trajectory, checkpoint, stage, reporter
            )
            (stage / "bench.json").write_text(json.dumps(bench_results, indent=2) + "\n")
        del dense
        (stage / "recipe.resolved.yaml").write_text(dump_recipe(recipe))
        (stage / "trajectory.json").write_text(json.dumps(trajectory.to_json(), indent=2) + "\n")
        results = _results(
            recipe, identity, config.model_type, plan, trajectory, evaluator, measurements, bench_results
        )
        write_reports(results, stage)
        manifest = {
            "schema": "prunecomp-manifest/1",
            "source_model": identity,
            "recipe": recipe.model_dump(mode="json"),
            "model_type": config.model_type,
            "layers_before": plan.num_layers,
            "layers_after": plan.num_layers - plan.num_drop,
            "removed": [{"original_layers": r.step.removed, "alpha": r.step.alpha} for r in trajectory.rounds],
            "fold_form": trajectory.fold_form,
            "untied_embeddings": trajectory.untie,
            "verification": verification,
            "targets": target_records,
            "packages": results["packages"],
            "machine": results["machine"],
            "files": sha256_tree(stage),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return RunResult(
        output,
        config.model_type,
        plan.num_layers,
        plan.num_layers - plan.num_drop,
        trajectory,
        results,
        target_records,
        time.perf_counter() - started,
    )


def _dense_measurements(model, evaluator: Evaluator, identity: dict, recipe: Recipe, log) -> list[Measurement]:
    if not evaluator.enabled:
        return []
    cache = DenseCache(
        identity["sha256"], {**evaluator.protocol(), "dtype": recipe.model.dtype}, recipe.evaluation.cache_dense
    )
    cached = cache.load()
    if cached is not None:
        log(f"dense results reused from {cache.path}")
        return cached
    rows = evaluator.evaluate(model, "dense", 0)
    cache.store(rows)
    return rows


def _trajectory_points(recipe: Recipe, plan: Plan) -> list[int]:
    """Numbers of removed layers, short of the final one, at which to evaluate again."""
    wanted = recipe.evaluation.trajectory
    points = range(1, plan.num_drop) if wanted == "all" else wanted
    return sorted({k for k in points if k < plan.num_drop})


def _along_trajectory(
    dense, adapter, plan: Plan, trajectory: Trajectory, points: list[int], evaluator, recipe, log, consume_dense: bool
):
    """Checkpoints rebuilt from the one run at each requested point, and the baseline beside them.
    ``consume_dense``: nothing needs the dense model afterwards, so the last baseline may prune it in
    place (one model copy less in memory); the bench still needs it dense."""
    rows = []
    for k in points:
        steps = steps_for(trajectory, k)
        if steps is None:
            log(f"no checkpoint with {k} layers removed in a {trajectory.schedule} run; skipped")
            continue
        rebuilt = copy.deepcopy(dense)
        replay(rebuilt, adapter, steps, trajectory.fold_form, trajectory.untie)
        rows += evaluator.evaluate(rebuilt, "prunecomp", k)
        del rebuilt
    if recipe.evaluation.baseline:
        # The paper's baseline: the same metric, one shot, no compensation.
        for k in [*points, plan.num_drop]:
            removed = baseline_layers(plan, trajectory, k)
            baseline = dense if (k == plan.num_drop and consume_dense) else copy.deepcopy(dense)
            log(f"baseline with {k} removed ({plan.metric.name} one-shot, no compensation): layers {removed}")
            apply_steps(baseline, adapter, [Step([i], 1.0) for i in removed], None)
            rows += [
                Measurement(**{**m.to_json(), "details": {**m.details, "removed": removed}})
                for m in evaluator.evaluate(baseline, "baseline", k)
            ]
    return rows


def _bench(
    recipe, runtimes, dense, tokenizer, adapter, plan: Plan, trajectory, checkpoint: Path, stage: Path, reporter
):
    """Save the dense model and each requested point of the trajectory as plain checkpoints (in a
    scratch directory, removed afterwards) and time them all."""
    wanted = recipe.bench.points
    points = sorted({k for k in (range(1, plan.num_drop + 1) if wanted == "all" else wanted) if k <= plan.num_drop})
    scratch = stage / ".bench-scratch"
    checkpoints = {0: scratch / "dense", plan.num_drop: checkpoint}
    save_checkpoint(dense, tokenizer, checkpoints[0])
    for k in points:
        steps = steps_for(trajectory, k)
        if k == plan.num_drop or steps is None:
            continue
        rebuilt = copy.deepcopy(dense)
        replay(rebuilt, adapter, steps, trajectory.fold_form, trajectory.untie)
        checkpoints[k] = scratch / f"removed-{k}"
        save_checkpoint(rebuilt, tokenizer, checkpoints[k])
        del rebuilt

    def onnx_export(directory: Path) -> Path:
        from prunecomp_export.targets.onnx import ONNX_FILE, export_onnx

        out = scratch / "onnx" / directory.name
        export_onnx(directory, out)
        return out / ONNX_FILE

    try:
        return benchmark(
            recipe.bench, runtimes, checkpoints, plan.num_layers, dense.config.vocab_size, reporter, onnx_export
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _results(
    recipe, identity, model_type, plan: Plan, trajectory: Trajectory, evaluator, rows, bench_results=None
) -> dict:
    final = plan.num_drop
    kept = accuracy_kept(rows, "prunecomp", final)
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "source": identity["source"],
            "sha256": identity["sha256"],
            "model_type": model_type,
            "layers_before": plan.num_layers,
            "layers_after": plan.num_layers - final,
            "layers_removed": final,
        },
        "recipe": recipe.model_dump(mode="json"),
        "seeds": {"calibration": recipe.calibration.seed},
        "trajectory": trajectory.to_json(),
        "protocol": evaluator.protocol(),
        "measurements": [row.to_json() for row in rows],
        "summary": {
            "perplexity_ratio": perplexity_ratios(rows, "prunecomp", final),
            "baseline_perplexity_ratio": perplexity_ratios(rows, "baseline", final),
            "accuracy_kept_percent": kept,
            "baseline_accuracy_kept_percent": accuracy_kept(rows, "baseline", final),
        },
        "bench": bench_results,
        "signoff": evaluate_signoff(
            recipe.signoff, rows, final, speedups_at(bench_results, final) if bench_results else None
        ),
        "packages": _package_versions(),
        "machine": _machine(),
    }


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
