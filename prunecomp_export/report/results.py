"""``results.json`` as typed models: a run builds one ``RunResults``, the reports read its attributes,
and it is dumped once to ``results.json``. The JSON schema in ``schemas/results.schema.json`` is
generated from these models (``python -m prunecomp_export.report.results`` writes it; a test checks that
the committed file is what the models generate)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prunecomp_export.costs import StageCost

SCHEMA = "prunecomp-results/5"
#: the schemas a results.json of an older output may have, readable as this one (see ``read_results``)
OLDER_SCHEMAS = ("prunecomp-results/3", "prunecomp-results/4")
SCHEMA_FILE = Path(__file__).resolve().parent / "schemas" / "results.schema.json"

Variant = Literal["dense", "baseline", "prunecomp"]


class _Strict(BaseModel):
    """Unknown keys are an error, so results.json cannot grow a field the schema does not describe."""

    model_config = ConfigDict(extra="forbid")


class ModelInfo(_Strict):
    source: str
    sha256: str | None
    model_type: str
    layers_before: int = Field(ge=1)
    layers_after: int = Field(ge=1)
    layers_removed: int = Field(ge=1)


class CompensationCheck(_Strict):
    """``engine.CompensationCheck``: the removal's calibration loss on the judge batches (held back
    from the compensation's fit) with the full compensation, with none, and with half of it (null in
    a run whose check tried half only when the full one raised the loss); ``kept`` is what was folded:
    the lowest of them."""

    kept: Literal["full", "half", "none"]
    loss_full: float
    loss_none: float
    loss_half: float | None = None


class TrajectoryStep(_Strict):
    """One removal: contiguous original layer indices, the scalar folded for them, the paper's
    magnitude gap measured for them (None without scalar compensation), the layer whose MLP
    output carries a linear compensation map (None without one) and the held-back check of the
    compensation (None where there was none to check)."""

    removed: list[int] = Field(min_length=1)
    alpha: float = Field(gt=0)
    paper_alpha: float | None = Field(None, gt=0)
    output_map_layer: int | None = Field(None, ge=0)
    check: CompensationCheck | None = None


class TrajectoryRound(_Strict):
    round: int
    step: TrajectoryStep
    scored_layers: list[int] | None
    #: None where a layer was not scored (a protected layer)
    scores: list[float | None] | None
    #: NaN on the rounds of a one-shot run before the last
    calibration_loss: float | None
    layer_forwards: int
    full_forward_layer_forwards: int
    #: the shortlist judged this round (original indices) and each one's loss on the judge batches
    judged_layers: list[int] | None = None
    judged_losses: list[float] | None = None


class TrajectoryInfo(_Strict):
    """``engine.Trajectory.to_json()``."""

    metric: str
    schedule: str
    compensation: Literal["magnitude", "fitted", "linear", "none"]
    fold_form: Literal["pre_gap", "post_gap"] | None
    untie: bool
    #: candidates judged per round by their held-back loss, and the calibration batches held back
    shortlist: int = Field(1, ge=1)
    judge_batches: int = Field(0, ge=0)
    dense_calibration_loss: float
    removed_in_order: list[int]
    rounds: list[TrajectoryRound] = Field(min_length=1)


class MeasurementRow(_Strict):
    """``evaluation.Measurement`` as it goes into results.json."""

    variant: Variant
    layers_removed: int = Field(ge=0)
    #: kl_divergence: mean KL(dense || model) per token in nats (details: p90, p99, tokens);
    #: top1_agreement: share of tokens whose top-1 token is the dense model's
    kind: Literal["perplexity", "accuracy", "kl_divergence", "top1_agreement"]
    dataset: str
    value: float
    details: dict[str, Any] = {}


class Summary(_Strict):
    """The final pruned model against the dense one."""

    perplexity_ratio: dict[str, float]
    baseline_perplexity_ratio: dict[str, float]
    accuracy_kept_percent: float | None
    baseline_accuracy_kept_percent: float | None
    #: half-widths of the 95 % intervals of the accuracy kept, paired over the same questions
    accuracy_kept_margin: float | None = None
    baseline_accuracy_kept_margin: float | None = None
    #: per corpus: mean KL(dense || model) per token (nats) and top-1 agreement with the dense model (%)
    kl_divergence: dict[str, float] = {}
    baseline_kl_divergence: dict[str, float] = {}
    top1_agreement_percent: dict[str, float] = {}
    baseline_top1_agreement_percent: dict[str, float] = {}


class SignoffCheck(_Strict):
    name: Literal[
        "min_accuracy_kept",
        "max_perplexity_ratio",
        "min_speedup",
        "max_kl_divergence",
        "min_top1_agreement",
        "target_parity",
    ]
    threshold: float
    value: float | None
    passed: bool
    detail: str
    #: half-width of the value's 95 % confidence interval, where it has one (accuracy kept)
    margin: float | None = None
    #: the threshold lies inside that interval: the measurement cannot tell pass from fail
    inside_noise: bool = False


class Signoff(_Strict):
    checks: list[SignoffCheck]
    #: every check passed (True when the recipe sets none)
    passed: bool


class Execution(_Strict):
    """``execution.Placement.describe()``: where the weights and the stream cache lived."""

    device: str
    budget_bytes: int
    weights: Literal["resident", "streamed"]
    weights_bytes: int
    stream_cache: Literal["device", "host", "disk"]
    stream_cache_bytes: int
    working_bytes: int


class ParityCheck(_Strict):
    """One figure a deployment target's runtime measured against the fp32 layer-streamed reference
    of the written checkpoint (``targets/parity.py``): ``measured`` had to be ``comparison`` ``limit``
    (the largest or mean |log-prob difference| at most the dtype's tolerance, the continuations close
    in vLLM's top-k sense at least the prompts compared). ``passed`` is the check's verdict, which may
    also need what ``detail`` names (the prompt tokenized alike)."""

    name: str
    measured: float
    comparison: Literal["<=", ">="]
    limit: float
    unit: str
    passed: bool
    detail: str


class ParityDivergence(_Strict):
    """Where a runtime's greedy continuation first differed from the reference's pick."""

    prompt: str
    #: index of the new token
    position: int
    runtime_token: int
    reference_token: int
    #: the reference's log-probability of its pick minus of the runtime's token (nats)
    gap: float
    #: the gap is within the dtype's largest log-probability tolerance
    near_tie: bool
    #: each side's token in the other's top-k (vLLM's ``check_logprobs_close`` rule): the continuation is close
    close: bool


class TargetParity(_Strict):
    """A built target's proof that it computes what the checkpoint computes (``hf``, the checkpoint
    itself, has none here: the reload check in the manifest is its proof), or why it has none."""

    target: str
    #: every check passed (False for a target that could not be built or run)
    passed: bool
    #: the runtime, e.g. "vLLM 0.32.0", and the precision it was judged in
    runtime: str | None = None
    dtype: str | None = None
    reference: str | None = None
    #: prompt and generated tokens whose log-probabilities were compared
    tokens_compared: int | None = None
    checks: list[ParityCheck] = Field(default_factory=list)
    divergences: list[ParityDivergence] = Field(default_factory=list)
    #: why the target failed without a verdict (it could not be built or run)
    error: str | None = None

    @model_validator(mode="after")
    def _evidence(self) -> TargetParity:
        if not self.checks and self.error is None:
            raise ValueError("a target's parity needs its checks, or the error that stopped it")
        return self


class PlannedMachine(_Strict):
    device: str
    device_free_bytes: int | None
    host_available_bytes: int
    device_total_bytes: int | None


class PlannedStage(_Strict):
    """One stage of the memory plan: its planned peak on the device (None on CPU) and in host memory,
    beyond each process's own overhead, and how it gets there."""

    stage: str
    process: str
    device_bytes: int | None
    host_bytes: int
    how: str
    fits: bool
    #: accelerate's max_memory for a child that loads the checkpoint
    max_memory: dict[str, int] | None
    #: the imports of every process the stage runs at once, beside host_bytes (None: an older run)
    process_overhead_bytes: int | None = None


class MemoryPlanRecord(_Strict):
    """The memory plan the run was made with (``memory.py``), computed before any weight was read."""

    machine: PlannedMachine
    device_budget_bytes: int
    host_budget_bytes: int
    weights_bytes: int
    slice_bytes: int
    logits_chunk_tokens: int
    process_overhead_bytes: int
    stages: list[PlannedStage]


class RunResults(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        serialize_by_alias=True,
        validate_by_name=True,
        validate_by_alias=True,
        title="prunecomp-export results.json",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA},
    )

    # "schema" in the file (required there, so no default); ``schema_id`` here (``schema`` is a BaseModel attribute)
    schema_id: Literal["prunecomp-results/5"] = Field(alias="schema")
    created: str
    model: ModelInfo
    recipe: dict[str, Any]
    seeds: dict[str, int]
    trajectory: TrajectoryInfo
    protocol: dict[str, Any]
    measurements: list[MeasurementRow]
    summary: Summary
    bench: dict[str, Any] | None
    signoff: Signoff
    execution: Execution
    #: the memory plan of every stage; None in an output of an older prunecomp-export
    memory_plan: MemoryPlanRecord | None
    #: the deployment targets built (run or ``export``), each with its parity figures; empty when none
    targets: list[TargetParity]
    costs: list[StageCost]
    #: the CLI process's own peak RSS over the run (children not included)
    peak_rss_bytes: int
    packages: dict[str, str | None]
    machine: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The content of results.json (NaN and infinities stay floats, as ``json.dumps`` writes them)."""
        return self.model_dump(mode="json")


def deployed_targets(records: dict[str, dict]) -> list[TargetParity]:
    """The parity of each target built into an output, from its manifest records: the run and every
    command that rewrites results.json show what the output deploys."""
    from prunecomp_export.targets import target_parity

    return [TargetParity.model_validate(parity) for parity in target_parity(records)]


def read_results(path: Path) -> RunResults:
    """An output's results.json. One of an older schema reads as this one where this one only added
    fields an older output can lack: schema 4 added ``targets``, filled by whoever rewrites the file;
    schema 5 lists each stage's child processes (an older file's one child peak becomes one entry), the
    memory plan (none in an older file), the held-back compensation checks, the judged shortlists, the
    dense-relative divergence rows and the accuracy intervals (all optional)."""
    raw = json.loads(path.read_text())
    if isinstance(raw, dict) and raw.get("schema") in OLDER_SCHEMAS:
        raw = {**raw, "schema": SCHEMA, "targets": raw.get("targets", []), "memory_plan": raw.get("memory_plan")}
        raw["costs"] = [_older_cost(cost) for cost in raw.get("costs", [])]
    return RunResults.model_validate(raw)


def _older_cost(cost: Any) -> Any:
    if not isinstance(cost, dict) or cost.get("child_peak_rss_bytes") is None:
        return cost
    child = {"name": "child process", "wall_s": cost.get("wall_s", 0.0), "peak_rss_bytes": cost["child_peak_rss_bytes"]}
    return {**{k: v for k, v in cost.items() if k != "child_peak_rss_bytes"}, "children": [child]}


def schema_text() -> str:
    """The JSON schema of results.json, as committed in ``schemas/results.schema.json``."""
    return json.dumps(RunResults.model_json_schema(), indent=2) + "\n"


def write_schema(path: Path = SCHEMA_FILE) -> Path:
    path.write_text(schema_text())
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m prunecomp_export.report.results``: regenerate the schema file; ``--check``: exit 1 if it is stale."""
    args = sys.argv[1:] if argv is None else argv
    if "--check" in args:
        if SCHEMA_FILE.read_text() != schema_text():
            print(f"{SCHEMA_FILE} is stale: run python -m prunecomp_export.report.results", file=sys.stderr)
            return 1
        return 0
    print(f"wrote {write_schema()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
