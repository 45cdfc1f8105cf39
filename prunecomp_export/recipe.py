"""The recipe: a YAML file validated by pydantic models that forbid unknown keys.

Every problem is reported as one ``RecipeError`` naming the file and the key path, so a user can
fix the recipe without reading a traceback. ``--set key.path=value`` overrides are applied to the
raw YAML before validation, so they are checked exactly like the file; command-line flags that
carry values (``--output``) are merged as values, never re-parsed as YAML.

The file is read as at most ``MAX_RECIPE_BYTES`` of strict UTF-8, and parsed by a loader that
refuses YAML anchors and aliases (so an alias bomb cannot expand) and nesting deeper than
``MAX_DEPTH``.
"""

from __future__ import annotations

import codecs
import copy
import re
import stat
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from prunecomp_export.errors import RecipeError

MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 64

#: An override: ``"key.path=yaml value"`` (``--set``) or ``("key.path", value)`` (a typed value from a flag).
Override = str | tuple[str, Any]

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
#: units that transformers' ``max_shard_size`` parser reads as we do (it reads a trailing lower-case b as bits)
_HF_UNITS = {"kb": "KB", "mb": "MB", "gb": "GB", "kib": "KiB", "mib": "MiB", "gib": "GiB"}


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: a positive int, or a number and a unit, case-insensitive: B, KB, MB, GB, TB
    (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. ``500MB``, ``2GiB``, ``1.5 GB``.
    A lower-case ``b`` means bytes too. Raises ``ValueError`` with a message for the user."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"expected a size such as 500MB, 5GB or 2GiB, not a {type(text).__name__}")
    if isinstance(text, str):
        match = _SIZE.fullmatch(text.strip())
        unit = _SIZE_UNITS.get(match[2].lower()) if match else None
        if match is None or unit is None:
            raise ValueError(f"{text!r} is not a size: give bytes or a number with a unit, e.g. 500MB, 5GB, 2GiB")
        size = int(Decimal(match[1]) * unit)
    else:
        size = text
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return size


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Strict):
    source: str = Field(
        description="A local HF directory, a .gguf file, 'package:<python package>/<file>' for a file "
        "shipped inside an installed package, or a hub id (needs network)."
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside a hub repo or directory.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; auto: the checkpoint's own (float32 for GGUF, which is dequantised)."
    )
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
    compensation: Literal["magnitude", "fitted", "linear", "none"] = Field(
        "magnitude",
        description="magnitude: the paper's alpha; fitted: the scalar with the lowest calibration loss "
        "(paper alpha recorded beside it); linear: a d x d map fitted by least squares, folded into the "
        "down projection of the last kept layer before the gap; none.",
    )
    ridge: float = Field(
        1e-4, ge=0, description="Linear compensation: ridge towards the identity, relative to mean diag(M^T M)."
    )
    probe_batches: int | None = Field(
        4,
        gt=0,
        description="Calibration batches that fit the scalar (compensation: fitted) and score candidates "
        "(metric: compensated_loss); None: all.",
    )
    shortlist: int = Field(
        1,
        ge=1,
        description="Candidates judged each round: the metric's best `shortlist` layers are each removed with "
        "the recipe's compensation (measured on the fit batches) and the one with the lowest calibration loss on "
        "the judge batches goes (near-ties of the metric decided by the loss); 1: the metric alone decides.",
    )
    judge_batches: int | None = Field(
        None,
        ge=0,
        description="Calibration batches held back from measuring or fitting the compensation: they judge the "
        "shortlist and check every removal's compensation against none (half of it, or none, is folded where "
        "it would raise their loss). None: a quarter of the batches, at least one (none when there is a single "
        "batch); 0: fit on every batch, no check.",
    )
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
        return self

    @field_validator("drop_layers")
    @classmethod
    def _distinct_layers(cls, value: list[int] | None) -> list[int] | None:
        # as given; a negative index naming the same layer as a positive one is caught by engine.make_plan
        if value is not None and (twice := [i for n, i in enumerate(value) if i in value[:n]]):
            raise ValueError(f"lists layer {twice[0]} twice")
        return value


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
    max_kl_divergence: float | None = Field(
        None, gt=0, description="Mean KL(dense || pruned) per token, nats, on every perplexity corpus."
    )
    min_top1_agreement: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Percent of tokens whose most likely next token is the dense model's, on every perplexity corpus.",
    )


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
    dir: str = Field("outputs/run", min_length=1)
    overwrite: bool = False
    max_shard_size: str | int = Field(
        "5GB",
        description="Largest safetensors shard: bytes, or e.g. 500MB, 5GB, 2GiB. Stored in a form transformers "
        "reads the same way (e.g. '5GB'), else as bytes.",
    )
    verify: bool = Field(True, description="Reload the checkpoint and compare logits and cached generation.")

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _shard_size(cls, value: Any) -> str | int:
        size = parse_size(value)
        match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
        if match and match[1].isdigit() and match[2].lower() in _HF_UNITS:
            return f"{int(match[1])}{_HF_UNITS[match[2].lower()]}"
        return size


class ExecutionSpec(Strict):
    """Where the work runs and where the weights and calibration streams live (see engine/execution.py)."""

    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
    memory_budget: int | str | None = Field(
        None,
        description="Memory the resident weights and the stream cache may use on the device (host memory on CPU), "
        "e.g. 40GB. Default: 80% of the free device memory, or half the available host memory on CPU.",
    )
    weights: Literal["auto", "resident", "streamed"] = Field(
        "auto", description="Keep every weight on the device, or read each layer from the files when it runs."
    )
    stream_cache: Literal["auto", "device", "host", "disk"] = Field(
        "auto", description="Where the residual streams of the calibration batches live between rounds."
    )
    cache_dir: str | None = Field(None, description="Directory for the disk stream cache (default: the temp dir).")

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        base, _, index = value.partition(":")
        if base not in ("auto", "cpu", "cuda") or (index and (base != "cuda" or not index.isdigit())):
            raise ValueError(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("memory_budget")
    @classmethod
    def _budget_is_a_size(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            parse_size(value)
        return value


class Recipe(Strict):
    model: ModelSpec
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    prune: PruneSpec
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    signoff: SignoffSpec = Field(default_factory=SignoffSpec)
    bench: BenchSpec = Field(default_factory=BenchSpec)
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)
    targets: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-target options, validated by each target's Options model."
    )

    @field_validator("targets")
    @classmethod
    def _valid_targets(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Every target's options are checked against its ``Options`` model, requested or not
        (target modules import their runtimes only inside functions, so this is cheap)."""
        from prunecomp_export.targets import TARGETS, load_target

        for name, options in value.items():
            if name not in TARGETS:
                raise ValueError(TARGETS.unknown_message(name))
            model = load_target(name).Options
            try:
                model.model_validate(options)
            except ValidationError as exc:
                key, message = _describe(exc.errors()[0], model)
                raise PydanticCustomError(
                    "target_option",
                    "{message}",
                    {"key": ".".join(filter(None, ("targets", name, key))), "message": message},
                ) from None
        return value


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-"))


def _describe(err: Any, root: type[BaseModel]) -> tuple[str, str]:
    """(key path, message) of one pydantic error, in the words the CLI prints."""
    if err["type"] == "target_option":
        return err["ctx"]["key"], err["ctx"]["message"]
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key" + _did_you_mean(err["loc"], root)
    elif err["type"] == "missing":
        message = "required key is missing"
    return _format_loc(err["loc"]), message


def validate_recipe(raw: Any, *, file: str | None = None) -> Recipe:
    """Validate already-parsed YAML; the first problem becomes one RecipeError line."""
    if not isinstance(raw, dict):
        raise RecipeError("the recipe must be a YAML mapping with sections model, prune, ...", file=file)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        key, message = _describe(exc.errors()[0], Recipe)
        raise RecipeError(message, key=key or None, file=file) from None
    except RecursionError:
        raise RecipeError(f"nested deeper than {MAX_DEPTH} levels", file=file) from None


def _did_you_mean(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    import difflib

    model: type[BaseModel] | None = root
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


class _NotAllowed(yaml.MarkedYAMLError):
    """Raised by the loader for YAML that is well-formed but not accepted in a recipe."""


class RefusedYAML(ValueError):
    """YAML refused on purpose (anchors, aliases, deep nesting): never read as a plain string instead."""


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases, and with bounded nesting."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _NotAllowed(
                problem="YAML anchors and aliases (&name, *name) are not allowed", problem_mark=event.start_mark
            )
        if self.depth >= MAX_DEPTH:
            raise _NotAllowed(problem=f"nested deeper than {MAX_DEPTH} levels", problem_mark=event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def parse_yaml(text: str) -> Any:
    """Parse one YAML document with the recipe's loader; raises ``ValueError`` with a one-line
    message (``RefusedYAML`` for anchors, aliases and deep nesting)."""
    try:
        loader = _RecipeLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise (RefusedYAML if isinstance(exc, _NotAllowed) else ValueError)(f"{where}{problem}") from None
    except yaml.YAMLError as exc:
        raise ValueError(" ".join(str(exc).split("\n")[0].split())) from None
    except RecursionError:
        raise RefusedYAML(f"nested deeper than {MAX_DEPTH} levels") from None
    except (ValueError, TypeError, OverflowError) as exc:  # a constructor's: !!int x, 2024-13-45
        raise ValueError(" ".join(str(exc).split())) from None


def _key_path(key: str, label: str) -> list[str]:
    path = key.strip().split(".")
    if not key.strip() or "" in path:
        raise RecipeError(f"{label}: empty key path" if not key.strip() else f"{label}: empty part in key path {key!r}")
    if len(path) > MAX_DEPTH:
        raise RecipeError(f"{label}: key path deeper than {MAX_DEPTH} levels")
    return path


def _set_label(item: str) -> str:
    return f"--set {item if len(item) <= 80 else item[:77] + '...'!r}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value``; the value is parsed as YAML so numbers, lists and booleans work (text that
    is not valid YAML stays a string; anchors, aliases and deep nesting are refused)."""
    label = _set_label(item)
    if "=" not in item:
        raise RecipeError(f"{label}: expected key.path=value")
    key, _, value = item.partition("=")
    path = _key_path(key, label)
    try:
        parsed = parse_yaml(value) if value.strip() else None
    except RefusedYAML as exc:
        raise RecipeError(f"{label}: {exc}", key=".".join(path)) from None
    except ValueError:
        parsed = value
    return path, parsed


def apply_overrides(raw: dict[str, Any], overrides: Iterable[Override]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each override set: a ``"key.path=value"`` string from ``--set``
    (value parsed as YAML), or a ``("key.path", value)`` pair whose value is used as it is."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if isinstance(item, str):
            label = _set_label(item)
            path, value = parse_override(item)
        else:
            label, value = item
            path = _key_path(label, label)
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise RecipeError(f"{label}: {where} is a {type(child).__name__}, not a section", key=".".join(path))
            node = child
        node[path[-1]] = value
    return raw


def read_recipe_text(path: Path) -> str:
    """The recipe file as text: a regular file of at most ``MAX_RECIPE_BYTES``, strict UTF-8."""
    file = str(path)
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise RecipeError("recipe file not found", file=file) from None
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe: {exc.strerror}", file=file) from None
    if stat.S_ISDIR(mode):
        raise RecipeError("is a directory, not a recipe file", file=file)
    if not stat.S_ISREG(mode):
        raise RecipeError("is not a regular file", file=file)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe: {exc.strerror}", file=file) from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"the recipe is larger than {MAX_RECIPE_BYTES >> 20} MiB", file=file)
    for bom, encoding in (
        (codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
        (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"),
    ):  # fmt: skip
        if data.startswith(bom):
            raise RecipeError(f"the recipe is {encoding} text; save it as UTF-8", file=file)
    data = data.removeprefix(codecs.BOM_UTF8)
    if b"\0" in data:
        raise RecipeError("contains NUL bytes: a binary file, not a YAML recipe", file=file)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line} is not valid UTF-8 "
            "(latin-1 or another legacy encoding?); save the recipe as UTF-8",
            file=file,
        ) from None


def load_recipe(path: str | Path, overrides: Iterable[Override] | None = None) -> Recipe:
    """Read, override and validate a recipe file. Relative paths in it stay relative to the CWD.

    ``overrides``: ``"key.path=value"`` strings (``--set``, value parsed as YAML) and
    ``("key.path", value)`` pairs (typed values from command-line flags, used as they are)."""
    path = Path(path)
    file = str(path)
    try:
        raw = parse_yaml(read_recipe_text(path))
    except ValueError as exc:
        prefix = "" if isinstance(exc, RefusedYAML) else "not valid YAML: "
        raise RecipeError(f"{prefix}{exc}", file=file) from None
    if raw is None:
        raise RecipeError("the recipe is empty", file=file)
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
    return validate_recipe(raw, file=file)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled in), as saved beside the output."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
