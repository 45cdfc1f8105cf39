"""The recipe: a YAML file validated by pydantic models that forbid unknown keys.

Every problem is reported as one ``RecipeError`` naming the file and the key path, so a user can
fix the recipe without reading a traceback. ``--set key.path=value`` overrides are applied to the
raw YAML before validation, so they are checked exactly like the file; command-line flags that
carry values (``--output``) are merged as values, never re-parsed as YAML.

The file is read as at most ``MAX_RECIPE_BYTES`` of strict UTF-8, and parsed by a loader that
refuses YAML anchors and aliases (so an alias bomb cannot expand), merge keys, a key given twice in
one mapping, and nesting deeper than ``MAX_DEPTH``. Values keep their YAML types (``true`` is not a
number), and every float is finite.
"""

from __future__ import annotations

import codecs
import copy
import re
import stat
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from prunecomp_export.errors import RecipeError
from prunecomp_export.validation import FiniteFloat, either, first_error, nested_error

MAX_RECIPE_BYTES = 1 << 20
MAX_DEPTH = 64

#: An override: ``"key.path=yaml value"`` (``--set``), or ``("key.path", value)`` or
#: ``("key.path", value, "--flag")`` (a typed value from a flag; the flag is what a message names).
Override = str | tuple[str, Any] | tuple[str, Any, str]

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


def _checked_size(value: Any) -> Any:
    parse_size(value)  # raises ValueError with the user's message (a boolean is not a size)
    return value


#: a number of bytes: an int, or text with a unit (``500MB``); checked before pydantic coerces it
Size = Annotated[int | str, BeforeValidator(_checked_size)]

#: numbers of removed layers (each >= 1, none twice), or ``all``
Points = Annotated[list[int] | Literal["all"], either("a list of numbers of removed layers, or 'all'")]


def _distinct_positive(value: list[int] | str, what: str) -> list[int] | str:
    if isinstance(value, list):
        if bad := [point for point in value if point < 1]:
            raise ValueError(f"{what} count removed layers and must be >= 1, not {bad[0]}")
        if twice := [point for n, point in enumerate(value) if point in value[:n]]:
            raise ValueError(f"lists {twice[0]} twice")
    return value


def check_device_syntax(value: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether it exists is ``engine.execution.resolve_device``'s
    to say); raises ``ValueError`` with the user's message."""
    base, _, index = value.partition(":")
    if base not in ("auto", "cpu", "cuda") or (index and (base != "cuda" or not index.isdigit())):
        raise ValueError(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N")
    return value


class Strict(BaseModel):
    """Unknown keys are errors, and values are taken as the YAML types they are: ``true`` is not the
    number 1, ``"5"`` is not 5."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class ModelSpec(Strict):
    source: str = Field(
        description="A local HF directory, a .gguf file, 'package:<python package>/<file>' for a file "
        "shipped inside an installed package (its import or distribution name), or a hub id (needs network)."
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside a hub repo or directory.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; auto: the checkpoint's own (float32 for GGUF, which is dequantised)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub id.")
    trust_remote_code: bool = Field(False, description="Let transformers run the model repository's own code.")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="transformers' attention kernel.")


class CalibrationSpec(Strict):
    source: Literal["builtin", "text", "dataset"] = Field(
        "builtin", description="Where the calibration text comes from."
    )
    corpus: str | None = Field("gensim-wiki", description="Builtin corpus name (source: builtin).")
    files: list[str] = Field(default_factory=list, description="Text files (source: text).")
    dataset: str | None = Field(None, description="A datasets dir saved to disk, or a hub id (source: dataset).")
    dataset_config: str | None = Field(None, description="The dataset's configuration name (source: dataset).")
    split: str = Field("train", description="The dataset's split (source: dataset).")
    text_field: str = Field("text", description="The dataset's column holding the text (source: dataset).")
    num_samples: int = Field(16, gt=0, le=100_000, description="Calibration windows.")
    seq_len: int = Field(
        512, ge=8, le=1_048_576, description="Tokens per window; at most the model's max_position_embeddings."
    )
    seed: int = Field(0, description="Seed of the windows' random positions.")
    batch_size: int = Field(4, gt=0, le=4096, description="Windows per forward.")

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
    metric: str = Field(
        "block_influence",
        description="Layer importance: block_influence, contiguous_cosine, taylor_plus, magnitude_plus, ppl, "
        "compensated_loss.",
    )
    num_drop: int | None = Field(
        None, gt=0, description="Layers to remove (exactly one of num_drop, ratio, drop_layers)."
    )
    ratio: FiniteFloat | None = Field(None, gt=0, lt=1, description="Share of the layers to remove, rounded.")
    drop_layers: list[int] | None = Field(
        None, min_length=1, description="Original indices of the layers to remove (negative counts from the end)."
    )
    schedule: Literal["iterative", "one_shot"] = Field(
        "iterative", description="iterative: score again after each removal; one_shot: score the dense model once."
    )
    compensation: Literal["magnitude", "fitted", "linear", "none"] = Field(
        "magnitude",
        description="magnitude: the paper's alpha; fitted: the scalar with the lowest calibration loss "
        "(paper alpha recorded beside it); linear: a d x d map fitted by least squares, folded into the "
        "down projection of the last kept layer before the gap; none.",
    )
    ridge: FiniteFloat = Field(
        1e-4, ge=0, description="Linear compensation: ridge towards the identity, relative to mean diag(M^T M)."
    )
    probe_batches: int | None = Field(
        4,
        gt=0,
        description="Calibration batches that fit the scalar (compensation: fitted) and score candidates "
        "(metric: compensated_loss); null: all.",
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
        "shortlist and check every removal's compensation: the full one, half of it or none is folded, whichever "
        "leaves their loss lowest. null: a quarter of the batches, at least one (none when there is a single "
        "batch); 0: fit on every batch, no check.",
    )
    protected_layers: list[int] | None = Field(
        None,
        description="Original layer indices never removed (negative counts from the end). "
        "null: the metric's own default (e.g. Taylor+/Mag+ keep the first 4 and last 2).",
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
    corpora: list[str] = Field(
        default_factory=lambda: ["gensim-wiki-heldout", "gensim-news"],
        description="gensim-wiki-heldout, gensim-news, a text file, or wikitext2 / c4 / ptb (online).",
    )
    seq_len: int = Field(512, ge=8, description="Tokens per window; at most the model's max_position_embeddings.")
    max_windows: int | None = Field(16, gt=0, description="Windows per corpus, evenly spaced; null: all.")
    batch_size: int = Field(4, gt=0, description="Windows per forward.")


class QASpec(Strict):
    tasks: list[str] = Field(
        default_factory=lambda: ["gensim_analogy", "gensim_sentiment"],
        description="lm-eval task names; the gensim_* tasks are built offline, others need their datasets.",
    )
    limit: int | None = Field(None, gt=0, description="Questions per task (null: all).")
    batch_size: int = Field(8, gt=0, description="lm-eval's batch size (hf: lowered by the memory plan to fit).")
    backend: Literal["hf", "vllm"] = Field(
        "hf",
        description="hf: lm-eval's transformers model within the memory plan (offloading what does not fit); "
        "vllm: lm-eval's vLLM model, for models larger than one device (tensor_parallel_size).",
    )
    max_length: int = Field(
        2048,
        ge=16,
        description="Longest context lm-eval feeds the model, in tokens (longer ones are cut from the left); "
        "the memory plan sizes QA batches for it. At most the model's max_position_embeddings.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="backend vllm: GPUs the model is split across.")


class EvaluationSpec(Strict):
    perplexity: PerplexitySpec | None = Field(
        default_factory=PerplexitySpec, description="Held-out token perplexity; null: none."
    )
    qa: QASpec | None = Field(None, description="Zero-shot accuracy through lm-eval; null: none.")
    baseline: bool = Field(True, description="Also evaluate the same metric one-shot without compensation.")
    trajectory: Points = Field(
        default_factory=list,
        description="Numbers of removed layers, below the final one, at which to evaluate checkpoints "
        "rebuilt from the same run ('all': every round).",
    )
    cache_dense: bool = Field(True, description="Reuse the dense model's results, keyed by model hash.")

    @field_validator("trajectory")
    @classmethod
    def _valid_points(cls, value: list[int] | str) -> list[int] | str:
        return _distinct_positive(value, "trajectory points")


class SignoffSpec(Strict):
    """Thresholds a pipeline gates on: exit 0 when all pass, 1 when one fails. A threshold whose
    measurement the recipe does not make is refused before the run."""

    min_accuracy_kept: FiniteFloat | None = Field(
        None, gt=0, description="Percent of the dense mean QA accuracy (needs evaluation.qa)."
    )
    max_perplexity_ratio: FiniteFloat | None = Field(
        None, gt=0, description="Pruned / dense, on every corpus (needs evaluation.perplexity)."
    )
    min_speedup: FiniteFloat | None = Field(
        None, gt=0, description="Dense / pruned latency, every benchmarked runtime (needs --bench)."
    )
    max_kl_divergence: FiniteFloat | None = Field(
        None,
        gt=0,
        description="Mean KL(dense || pruned) per token, nats, on every perplexity corpus (needs "
        "evaluation.perplexity).",
    )
    min_top1_agreement: FiniteFloat | None = Field(
        None,
        gt=0,
        le=100,
        description="Percent of tokens whose most likely next token is the dense model's, on every perplexity "
        "corpus (needs evaluation.perplexity).",
    )


class Scenario(Strict):
    """One timing scenario. prefill: a forward over batch x prompt_len tokens; decode: one new token
    per sequence on top of past_len cached tokens; throughput: batch sequences generating new_tokens."""

    name: str = Field(description="The scenario's name in the results.")
    kind: Literal["prefill", "decode", "throughput"] = Field(description="What is timed.")
    batch: int = Field(1, gt=0, description="Sequences per call.")
    prompt_len: int = Field(128, gt=0, description="Prompt tokens (prefill, throughput).")
    past_len: int = Field(128, gt=0, description="Cached tokens before the timed token (decode).")
    new_tokens: int = Field(32, gt=1, description="Generated tokens per sequence (throughput).")


def _default_scenarios() -> list[Scenario]:
    return [
        Scenario(name="prefill-1x128", kind="prefill", batch=1, prompt_len=128),
        Scenario(name="decode-1@128", kind="decode", batch=1, past_len=128),
        Scenario(name="throughput-4x64+32", kind="throughput", batch=4, prompt_len=64, new_tokens=32),
    ]


class BenchSpec(Strict):
    runtimes: list[Literal["torch", "onnxruntime", "vllm"]] | None = Field(
        None, description="Runtimes to time; null: torch plus those of the requested targets."
    )
    points: Points = Field(
        "all", description="Numbers of removed layers to time, up to the final one (the dense model is always timed)."
    )
    scenarios: list[Scenario] = Field(
        default_factory=_default_scenarios,
        min_length=1,
        description="Each has name, kind (prefill, decode, throughput), batch, prompt_len, past_len, new_tokens; "
        "default: prefill-1x128, decode-1@128, throughput-4x64+32.",
    )
    warmup: int = Field(2, ge=1, description="Untimed calls before the repeats.")
    repeats: int = Field(5, ge=5, description="Measured repeats per scenario (median and spread reported).")
    rounds: int = Field(
        1, ge=1, description="Fresh processes per model and runtime, in alternating order; their repeats are pooled."
    )
    threads: int | None = Field(None, gt=0, description="Threads per runtime; null: all cores.")
    timeout_s: FiniteFloat = Field(1800, gt=0, description="Seconds per model-and-runtime process.")
    busy_load_per_core: FiniteFloat = Field(
        0.25, ge=0, description="Warn when other processes kept more than this share of the cores busy while timing."
    )

    @field_validator("points")
    @classmethod
    def _valid_points(cls, value: list[int] | str) -> list[int] | str:
        return _distinct_positive(value, "bench points")


class OutputSpec(Strict):
    dir: str = Field("outputs/run", min_length=1, description="The output directory (--output overrides it).")
    overwrite: bool = Field(False, description="Replace an earlier output of this tool at dir.")
    max_shard_size: Size = Field(
        "5GB",
        description="Largest safetensors shard: bytes, or e.g. 500MB, 5GB, 2GiB. Stored in a form transformers "
        "reads the same way (e.g. '5GB'), else as bytes.",
    )
    verify: bool = Field(True, description="Reload the checkpoint and compare logits and cached generation.")

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: int | str) -> str | int:
        match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
        if match and match[1].isdigit() and match[2].lower() in _HF_UNITS:
            return f"{int(match[1])}{_HF_UNITS[match[2].lower()]}"
        return parse_size(value)


class ExecutionSpec(Strict):
    """Where the work runs and where the weights and calibration streams live (see engine/execution.py)."""

    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")
    memory_budget: Size | None = Field(
        None,
        description="Memory every stage may use on the device (host memory on CPU) for weights, streams, "
        "activations and logits, e.g. 40GB: the memory plan (shown by --dry-run). null: 80% of the free "
        "device memory, or half the available host memory on CPU.",
    )
    host_memory_budget: Size | None = Field(
        None,
        description="GPU runs: host memory the stages may use beside the device (a stream cache in host memory, "
        "weights a child offloads from the device), e.g. 64GB. null: half the available host memory. On CPU "
        "the host is the device: memory_budget covers both.",
    )
    weights: Literal["auto", "resident", "streamed"] = Field(
        "auto", description="Keep every weight on the device, or read each layer from the files when it runs."
    )
    stream_cache: Literal["auto", "device", "host", "disk"] = Field(
        "auto", description="Where the residual streams of the calibration batches live between rounds."
    )
    cache_dir: str | None = Field(None, description="Directory for the disk stream cache (null: the temp dir).")

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        return check_device_syntax(value)


class RecipeOrigin(BaseModel):
    """Where a recipe's values came from: its file (or the manifest that recorded it), and the key
    paths a ``--set`` or a flag overrode, with the option's words; so that a problem found later names
    the right place."""

    model_config = ConfigDict(frozen=True)

    file: str | None = None
    #: prefix of every key path where the recipe sits inside another file (``recipe`` in a manifest)
    key_prefix: str = ""
    overridden: dict[str, str] = Field(default_factory=dict)

    def locate(self, key: str | None) -> tuple[str | None, str | None]:
        """(where the value at ``key`` came from, its key path there)."""
        for path, label in self.overridden.items():
            if key is not None and (key == path or key.startswith(path + ".")):
                return label, key
        where = ".".join(part for part in (self.key_prefix, key or "") if part) or None
        return self.file, where


class Recipe(Strict):
    model: ModelSpec = Field(description="The model to prune.")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec, description="Calibration text.")
    prune: PruneSpec = Field(description="What to remove and how to compensate.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="What to measure.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where and how to write the output.")
    signoff: SignoffSpec = Field(default_factory=SignoffSpec, description="Thresholds for exit code 1.")
    bench: BenchSpec = Field(default_factory=BenchSpec, description="Latency benchmark (with --bench).")
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec, description="Where the work runs.")
    targets: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-target options, validated by each target's Options model."
    )
    _origin: RecipeOrigin = PrivateAttr(default_factory=RecipeOrigin)

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
                key, message = first_error(exc, model)
                raise nested_error(".".join(filter(None, ("targets", name, key))), message) from None
        return value

    @property
    def origin(self) -> RecipeOrigin:
        return self._origin

    def with_origin(self, origin: RecipeOrigin) -> Recipe:
        self._origin = origin
        return self

    def locate(self, exc: RecipeError) -> RecipeError:
        """``exc`` naming where its key's value came from (the recipe file or a ``--set``), when it
        names no file yet: a problem found after validation (the model has fewer layers) still names it."""
        if exc.file is not None:
            return exc
        file, key = self._origin.locate(exc.key)
        return exc.located(file, key) if file is not None else exc


def validate_recipe(raw: Any, *, file: str | None = None, origin: RecipeOrigin | None = None) -> Recipe:
    """Validate already-parsed YAML; the first problem becomes one RecipeError line naming where the
    value came from (``origin``: the file, or the ``--set`` that gave it)."""
    origin = origin or RecipeOrigin(file=file)
    if not isinstance(raw, dict):
        raise RecipeError("the recipe must be a YAML mapping with sections model, prune, ...", file=origin.file)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        where, key = origin.locate(first_error(exc, Recipe)[0] or None)
        raise RecipeError(first_error(exc, Recipe)[1], key=key, file=where) from None
    except RecursionError:
        raise RecipeError(f"nested deeper than {MAX_DEPTH} levels", file=origin.file) from None
    return recipe.with_origin(origin)


class _NotAllowed(yaml.MarkedYAMLError):
    """Raised by the loader for YAML that is well-formed but not accepted in a recipe."""

    def __init__(self, problem: str, mark: Any, key: str | None = None):
        super().__init__(problem=problem, problem_mark=mark)
        self.key = key


class RefusedYAML(ValueError):
    """YAML refused on purpose (anchors, aliases, merge keys, a key given twice, deep nesting): never
    read as a plain string instead. ``key``: the key path concerned, when there is one."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _mapping_paths(root: yaml.Node) -> dict[int, list[str]]:
    """The key path of every mapping node below ``root`` (by node id), for messages."""
    paths: dict[int, list[str]] = {}
    pending: list[tuple[yaml.Node, list[str]]] = [(root, [])]
    while pending:
        node, path = pending.pop()
        if isinstance(node, yaml.MappingNode):
            paths[id(node)] = path
            for key, value in node.value:
                pending.append((value, [*path, key.value if isinstance(key, yaml.ScalarNode) else "?"]))
        elif isinstance(node, yaml.SequenceNode):
            pending.extend((item, [*path, str(index)]) for index, item in enumerate(node.value))
    return paths


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors, aliases and merge keys, with bounded nesting, and refusing
    a key given twice in one mapping (PyYAML would keep the last silently)."""

    depth = 0
    _paths: dict[int, list[str]]

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _NotAllowed("YAML anchors and aliases (&name, *name) are not allowed", event.start_mark)
        if self.depth >= MAX_DEPTH:
            raise _NotAllowed(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_document(self, node: yaml.Node) -> Any:
        self._paths = _mapping_paths(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            if key_node.tag == _MERGE_TAG:
                raise _NotAllowed("YAML merge keys (<<) are not allowed", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            try:
                twice = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: SafeConstructor reports it
            if twice:
                path = ".".join([*self._paths.get(id(node), []), str(key)])
                raise _NotAllowed("the key is given twice in one mapping", key_node.start_mark, key=path)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """Parse one YAML document with the recipe's loader; raises ``ValueError`` with a one-line
    message (``RefusedYAML`` for anchors, aliases, merge keys, duplicate keys and deep nesting)."""
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
        if isinstance(exc, _NotAllowed):
            raise RefusedYAML(f"{where}{problem}", key=exc.key) from None
        raise ValueError(f"{where}{problem}") from None
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
    is not valid YAML stays a string; anchors, aliases, duplicate keys and deep nesting are refused)."""
    label = _set_label(item)
    if "=" not in item:
        raise RecipeError(f"{label}: expected key.path=value")
    key, _, value = item.partition("=")
    path = _key_path(key, label)
    try:
        parsed = parse_yaml(value) if value.strip() else None
    except RefusedYAML as exc:
        raise RecipeError(str(exc), key=".".join([*path, *([exc.key] if exc.key else [])]), file=label) from None
    except ValueError:
        parsed = value
    return path, parsed


def _override_path(item: Override) -> tuple[list[str], str]:
    """(key path, the option's words) of one override, without parsing its value."""
    if isinstance(item, str):
        label = _set_label(item)
        if "=" not in item:
            raise RecipeError(f"{label}: expected key.path=value")
        return _key_path(item.partition("=")[0], label), label
    key, *flag = item[0], *item[2:]
    return _key_path(key, key), (flag[0] if flag else key)


def apply_overrides(raw: dict[str, Any], overrides: Iterable[Override]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each override set: a ``"key.path=value"`` string from ``--set``
    (value parsed as YAML), or a ``("key.path", value[, "--flag"])`` tuple whose value is used as it is."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, label = _override_path(item)
        value = parse_override(item)[1] if isinstance(item, str) else item[1]
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise RecipeError(f"{where} is a {type(child).__name__}, not a section", key=".".join(path),
                                  file=label)  # fmt: skip
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
    ``("key.path", value[, "--flag"])`` tuples (typed values from command-line flags, used as they are).
    A problem with an overridden value names the option that gave it, not the file."""
    path = Path(path)
    file = str(path)
    try:
        raw = parse_yaml(read_recipe_text(path))
    except RefusedYAML as exc:
        raise RecipeError(str(exc), key=exc.key, file=file) from None
    except ValueError as exc:
        raise RecipeError(f"not valid YAML: {exc}", file=file) from None
    if raw is None:
        raise RecipeError("the recipe is empty", file=file)
    overrides = list(overrides or [])
    overridden = {".".join(key): label for key, label in map(_override_path, overrides)}
    origin = RecipeOrigin(file=file, overridden=overridden)
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides)
    return validate_recipe(raw, origin=origin)


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe (defaults filled in), as saved beside the output."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
