"""The whole job, top to bottom: recipe -> load -> calibrate -> score -> fold -> save -> targets.

``run`` is the library call behind the CLI; it returns a ``RunResult`` and raises
``PrunecompError`` subclasses for anything the user can fix.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from pydantic import ValidationError

from prunecomp_export import calibration, corpus
from prunecomp_export.adapters import adapter_for
from prunecomp_export.checkpoint import save_checkpoint, sha256_tree, staged_directory, verify_reload
from prunecomp_export.engine import Plan, Step, Trajectory, apply_steps, baseline_layers, make_plan, prune
from prunecomp_export.errors import RecipeError
from prunecomp_export.loading import load_config, load_model, resolve_source, source_identity
from prunecomp_export.perplexity import PROTOCOL, perplexity
from prunecomp_export.progress import Reporter
from prunecomp_export.recipe import Recipe, dump_recipe
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
    #: perplexity[corpus][variant] with variants dense / baseline / prunecomp
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    baseline_removed: list[int] | None = None
    targets: dict[str, dict] = field(default_factory=dict)
    seconds: float = 0.0


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


def run(recipe: Recipe, targets: list[str], reporter: Reporter | None = None) -> RunResult:
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

    log("building calibration windows")
    windows = calibration.calibration_windows(recipe.calibration, tokenizer)
    batches = list(windows.split(recipe.calibration.batch_size))
    eval_sets = _evaluation_windows(recipe, tokenizer)

    ppl: dict[str, dict[str, float]] = {name: {} for name in eval_sets}
    _evaluate(model, eval_sets, ppl, "dense", recipe, reporter)

    log(f"pruning {plan.num_drop} of {plan.num_layers} layers ({recipe.prune.schedule}, {plan.metric.name})")
    dense = model
    model = copy.deepcopy(dense) if recipe.evaluation.baseline and eval_sets else dense
    trajectory = prune(model, adapter, batches, plan, recipe.prune.schedule, reporter)
    _evaluate(model, eval_sets, ppl, "prunecomp", recipe, reporter)

    baseline_removed = None
    if model is not dense:
        # The paper's baseline: the same metric, one shot, no compensation. Its choice comes from
        # the first round's scores, which were computed on the dense model.
        baseline_removed = baseline_layers(plan, trajectory)
        log(f"baseline: {plan.metric.name} one-shot without compensation removes {baseline_removed}")
        apply_steps(dense, adapter, [Step([i], 1.0) for i in baseline_removed], None)
        _evaluate(dense, eval_sets, ppl, "baseline", recipe, reporter)
    del dense

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
        (stage / "recipe.resolved.yaml").write_text(dump_recipe(recipe))
        (stage / "trajectory.json").write_text(json.dumps(trajectory.to_json(), indent=2) + "\n")
        result = RunResult(
            output,
            config.model_type,
            plan.num_layers,
            plan.num_layers - plan.num_drop,
            trajectory,
            ppl,
            baseline_removed,
            target_records,
            time.perf_counter() - started,
        )
        manifest = {
            "schema": "prunecomp-manifest/1",
            "source_model": identity,
            "recipe": recipe.model_dump(mode="json"),
            "model_type": config.model_type,
            "layers_before": plan.num_layers,
            "layers_after": result.layers_after,
            "removed": [{"original_layers": r.step.removed, "alpha": r.step.alpha} for r in trajectory.rounds],
            "fold_form": trajectory.fold_form,
            "untied_embeddings": trajectory.untie,
            "perplexity": {"protocol": PROTOCOL, "values": ppl, "baseline_removed": baseline_removed},
            "verification": verification,
            "targets": target_records,
            "packages": _package_versions(),
            "machine": {"python": platform.python_version(), "platform": platform.platform()},
            "files": sha256_tree(stage),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return result


def _evaluation_windows(recipe: Recipe, tokenizer) -> dict:
    spec = recipe.evaluation.perplexity
    if spec is None:
        return {}
    sets = {}
    for index, name in enumerate(spec.corpora):
        tokens = calibration.tokenize_joined(
            tokenizer, corpus.resolve_corpus(name, key=f"evaluation.perplexity.corpora.{index}")
        )
        try:
            sets[name] = calibration.spaced_windows(tokens, spec.seq_len, spec.max_windows)
        except ValueError as exc:
            raise RecipeError(str(exc), key=f"evaluation.perplexity.corpora.{index}") from None
    return sets


def _evaluate(model, eval_sets: dict, ppl: dict, variant: str, recipe: Recipe, reporter: Reporter) -> None:
    spec = recipe.evaluation.perplexity
    for name, windows in eval_sets.items():
        ppl[name][variant] = perplexity(model, windows, spec.batch_size if spec else 4, reporter)
        reporter.log(f"{variant} perplexity on {name}: {ppl[name][variant]:.2f}")


def _package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
