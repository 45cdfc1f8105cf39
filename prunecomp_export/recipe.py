"""The recipe: a YAML file validated by pydantic models that forbid unknown keys.

Every problem is reported as one ``RecipeError`` naming the file and the key path, so a user can
fix the recipe without reading a traceback. ``--set key.path=value`` overrides are applied to the
raw YAML before validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prunecomp_export.errors import RecipeError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Strict):
    source: str = Field(
        description="A local HF directory, a .gguf file, 'package:<python package>/<file>' for a file "
        "shipped inside an installed package, or a hub id (needs network)."
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside a hub repo or directory.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


class CalibrationSpec(Strict):
    source: Literal["builtin", "text", "dataset"] = "builtin"
    corpus: str | None = Field("gensim-wiki", description="Builtin corpus name (source: builtin).")
    files: list[str] = Field(default_factory=list, description="Text files (source: text).")
    dataset: str | None = Field(None, description="A datasets dir saved to disk, or a hub id (source: dataset).")
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    num_samples: int = Field(16, gt=0, le=100_000)
    seq_len: int = Field(512, ge=8, le=1_048_576)
    seed: int = 0
    batch_size: int = Field(4, gt=0, le=4096)

    @model_validator(mode="after")
    def _source_fields(self) -> CalibrationSpec:
        if self.source == "builtin" and not self.corpus:
            raise ValueError("calibration.corpus is required when calibration.source is 'builtin'")
        if self.source == "text" and not self.files:
            raise ValueError("calibration.files is required when calibration.source is 'text'")
        if self.source == "dataset" and not self.dataset:
            raise ValueError("calibration.dataset is required when calibration.source is 'dataset'")
        return self


class PruneSpec(Strict):
    metric: str = "block_influence"
    num_drop: int | None = Field(None, gt=0)
    ratio: float | None = Field(None, gt=0, lt=1)
    drop_layers: list[int] | None = Field(None, min_length=1)
    schedule: Literal["iterative", "one_shot"] = "iterative"
    compensation: Literal["magnitude", "none"] = "magnitude"
    protected_layers: list[int] | None = Field(
        None,
        description="Original layer indices never removed (negative counts from the end). "
        "None: the metric's own default (e.g. Taylor+/Mag+ keep the first 4 and last 2).",
    )
    fold: Literal["pre_gap", "post_gap"] = Field(
        "pre_gap",
        description="Where alpha goes on untied models: embedding + writers before the gap (the paper), "
        "or 1/alpha on writers after the gap.",
    )
    tied_embedding: Literal["post_gap", "untie", "scale_tied"] = Field(
        "post_gap",
        description="On tied embeddings: fold 1/alpha after the gap (safe default), untie and save lm_head, "
        "or scale the shared matrix as the authors' code does (also scales the logits).",
    )

    @model_validator(mode="after")
    def _exactly_one_amount(self) -> PruneSpec:
        given = [k for k in ("num_drop", "ratio", "drop_layers") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of prune.num_drop, prune.ratio, prune.drop_layers"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.drop_layers is not None and len(set(self.drop_layers)) != len(self.drop_layers):
            raise ValueError("prune.drop_layers lists a layer twice")
        return self


class PerplexitySpec(Strict):
    corpora: list[str] = Field(default_factory=lambda: ["gensim-wiki-heldout", "gensim-news"])
    seq_len: int = Field(512, ge=8)
    max_windows: int | None = Field(16, gt=0)
    batch_size: int = Field(4, gt=0)


class QASpec(Strict):
    tasks: list[str] = Field(
        default_factory=lambda: ["gensim_analogy", "gensim_sentiment"],
        description="lm-eval task names; the gensim_* tasks are built offline, others need their datasets.",
    )
    limit: int | None = Field(None, gt=0, description="Questions per task (None: all).")
    batch_size: int = Field(8, gt=0)


class EvaluationSpec(Strict):
    perplexity: PerplexitySpec | None = Field(default_factory=PerplexitySpec)
    qa: QASpec | None = None
    baseline: bool = Field(True, description="Also evaluate the same metric one-shot without compensation.")
    trajectory: list[int] | Literal["all"] = Field(
        default_factory=list,
        description="Numbers of removed layers, besides the final one, at which to evaluate checkpoints "
        "rebuilt from the same run ('all': every round).",
    )
    cache_dense: bool = Field(True, description="Reuse the dense model's results, keyed by model hash.")

    @field_validator("trajectory")
    @classmethod
    def _positive_points(cls, value: list[int] | str) -> list[int] | str:
        if isinstance(value, list) and any(point < 1 for point in value):
            raise ValueError("trajectory points count removed layers and must be >= 1")
        return value


class SignoffSpec(Strict):
    """Thresholds a pipeline gates on: exit 0 when all pass, 1 when one fails. A threshold whose
    measurement is missing fails, since it cannot be signed off."""

    min_accuracy_kept: float | None = Field(None, gt=0, description="Percent of the dense mean QA accuracy.")
    max_perplexity_ratio: float | None = Field(None, gt=0, description="Pruned / dense, on every corpus.")
    min_speedup: float | None = Field(None, gt=0, description="Dense / pruned latency, every benchmarked runtime.")


class Scenario(Strict):
    """One timing scenario. prefill: a forward over batch x prompt_len tokens; decode: one new token
    per sequence on top of past_len cached tokens; throughput: batch sequences generating new_tokens."""

    name: str
    kind: Literal["prefill", "decode", "throughput"]
    batch: int = Field(1, gt=0)
    prompt_len: int = Field(128, gt=0)
    past_len: int = Field(128, gt=0)
    new_tokens: int = Field(32, gt=1)


def _default_scenarios() -> list[Scenario]:
    return [
        Scenario(name="prefill-1x128", kind="prefill", batch=1, prompt_len=128),
        Scenario(name="decode-1@128", kind="decode", batch=1, past_len=128),
        Scenario(name="throughput-4x64+32", kind="throughput", batch=4, prompt_len=64, new_tokens=32),
    ]


class BenchSpec(Strict):
    runtimes: list[Literal["torch", "onnxruntime", "vllm"]] | None = Field(
        None, description="Runtimes to time; default: torch plus those of the requested targets."
    )
    points: list[int] | Literal["all"] = Field(
        "all", description="Numbers of removed layers to time (the dense model is always timed)."
    )
    scenarios: list[Scenario] = Field(default_factory=_default_scenarios, min_length=1)
    warmup: int = Field(2, ge=1)
    repeats: int = Field(5, ge=5, description="Measured repeats per scenario (median and spread reported).")
    rounds: int = Field(
        1, ge=1, description="Fresh processes per model and runtime, in alternating order; their repeats are pooled."
    )
    threads: int | None = Field(None, gt=0, description="Threads per runtime; default: all cores.")
    timeout_s: float = Field(1800, gt=0, description="Per model-and-runtime process.")
    busy_load_per_core: float = Field(
        0.25, ge=0, description="Warn when other processes kept more than this share of the cores busy while timing."
    )


class OutputSpec(Strict):
    dir: str = "outputs/run"
    overwrite: bool = False
    max_shard_size: str = "5GB"
    verify: bool = Field(True, description="Reload the checkpoint and compare logits and cached generation.")


class Recipe(Strict):
    model: ModelSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    prune: PruneSpec
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    signoff: SignoffSpec = Field(default_factory=SignoffSpec)
    bench: BenchSpec = Field(default_factory=BenchSpec)
    targets: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-target options, validated by each target's Options model."
    )

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from prunecomp_export.targets import TARGETS

        for name in value:
            if name not in TARGETS:
                raise ValueError(TARGETS.unknown_message(name))
        return value


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-"))


def validate_recipe(raw: Any, *, file: str | None = None) -> Recipe:
    """Validate already-parsed YAML; the first problem becomes one RecipeError line."""
    if not isinstance(raw, dict):
        raise RecipeError("the recipe must be a YAML mapping with sections model, prune, ...", file=file)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _format_loc(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key" + _did_you_mean(err["loc"])
        elif err["type"] == "missing":
            message = "required key is missing"
        raise RecipeError(message, key=key or None, file=file) from None


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    import difflib

    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model else None
        annotation = getattr(field, "annotation", None)
        model = _model_in(annotation)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(model.model_fields)})"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found:
            return found
    return None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value``; the value is parsed as YAML so numbers, lists and booleans work."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key.path=value")
    key, _, value = item.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RecipeError(f"--set {item!r}: empty key path")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is not a section", key=".".join(path))
            node = child
        node[path[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Relative paths in it stay relative to the CWD."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError("recipe file not found", file=str(path))
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"not valid YAML{where}", file=str(path)) from None
    if raw is None:
        raise RecipeError("the recipe is empty", file=str(path))
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
    return validate_recipe(raw, file=str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled in), as saved beside the output."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
