"""The Prune&Comp loop: score, pick, measure the gap, delete, fold; one layer per round.

The result is a trajectory of steps (which original layers went, with which alpha) that can be
replayed on the dense model to rebuild the checkpoint at any number of removed layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import torch
from torch import nn

from prunecomp_export.adapters import Adapter
from prunecomp_export.engine.compensation import (
    FoldForm,
    fit_output_map,
    fold,
    magnitude_gap,
    refine_minimum,
    scalar_candidates,
)
from prunecomp_export.engine.layerwise import LayerwiseModel
from prunecomp_export.engine.metrics import METRICS, Metric, MetricContext, RemovalProbe, contiguous_cosine_blocks
from prunecomp_export.engine.stream_cache import StreamCache
from prunecomp_export.engine.streams import ResidualStreams
from prunecomp_export.engine.surgery import delete_layers
from prunecomp_export.engine.variant import OutputMap, Variant, dense_variant, variant_after
from prunecomp_export.errors import RecipeError
from prunecomp_export.progress import Reporter
from prunecomp_export.recipe import PruneSpec
from prunecomp_export.registry import UnknownName


@dataclass(frozen=True)
class Plan:
    """What the recipe asks, checked against the model before any weights are touched."""

    metric: Metric
    num_layers: int
    num_drop: int
    protected: frozenset[int]
    drop_layers: tuple[int, ...] | None
    fold_form: FoldForm | None  # where a scalar goes; None: no scalar compensation
    untie: bool
    #: none | magnitude (the paper's alpha) | fitted (a scalar chosen on calibration loss) | linear (a map)
    compensation: str = "magnitude"
    #: ridge of the linear map's least squares, relative to the mean diagonal of M^T M
    ridge: float = 0.0
    #: how many calibration batches fit the scalar and score candidate removals (None: all)
    probe_batches: int | None = None
    #: the metric's best candidates judged each round by the held-back loss with their compensation
    shortlist: int = 1
    #: calibration batches held back from the compensation's fit (None: a quarter, see ``judge_count``)
    judge_batches: int | None = 0


def judge_count(plan: Plan, num_batches: int) -> int:
    """How many of ``num_batches`` calibration batches judge and check (the last ones): the recipe's
    number, or a quarter of them (at least one, none when there is a single batch)."""
    if plan.judge_batches is not None:
        return plan.judge_batches
    return 0 if num_batches < 2 else max(1, num_batches // 4)


def check_judge_batches(plan: Plan, num_batches: int) -> None:
    """At least one batch must remain to measure the compensation on."""
    if plan.judge_batches is not None and plan.judge_batches >= num_batches:
        raise RecipeError(
            f"holds back {plan.judge_batches} of the {num_batches} calibration batches: at least one must remain "
            "to measure the compensation on (more calibration.num_samples, a smaller calibration.batch_size, or 0)",
            key="prune.judge_batches",
        )


@dataclass(frozen=True)
class CompensationCheck:
    """One removal's calibration loss on the judge batches (held back from the fit) with the compensation
    as measured on the other batches, with it shrunk half-way to none, and with none. ``kept`` is what
    was folded: the lowest of the three (``full``, ``half`` or ``none``)."""

    kept: Literal["full", "half", "none"]
    loss_full: float
    loss_none: float
    loss_half: float | None = None


@dataclass
class Step:
    """One removal: contiguous original layer indices, the scalar folded for them (``alpha``), the
    paper's magnitude gap measured for them (recorded beside a fitted scalar), the linear map
    folded into the MLP of the last kept layer before the gap, if any, and the held-back check that
    kept, shrank or dropped the compensation."""

    removed: list[int]
    alpha: float
    paper_alpha: float | None = None
    output_map: OutputMap | None = field(default=None, repr=False, compare=False)
    check: CompensationCheck | None = None

    def as_fold(self) -> tuple[list[int], float, OutputMap | None]:
        return self.removed, self.alpha, self.output_map

    @property
    def compensated(self) -> bool:
        return self.alpha != 1.0 or self.output_map is not None

    def to_json(self) -> dict:
        return {
            "removed": self.removed,
            "alpha": self.alpha,
            "paper_alpha": self.paper_alpha,
            "output_map_layer": None if self.output_map is None else self.output_map[0],
            "check": None if self.check is None else asdict(self.check),
        }


@dataclass
class Round:
    round: int
    step: Step
    #: original indices of the layers that were scored this round, and their scores
    scored_layers: list[int] | None
    scores: list[float] | None
    calibration_loss: float
    layer_forwards: int
    full_forward_layer_forwards: int
    #: the shortlist judged this round (original indices) and each one's loss on the judge batches
    judged_layers: list[int] | None = None
    judged_losses: list[float] | None = None

    def to_json(self) -> dict:
        data = asdict(replace(self, step=None))
        data["step"] = self.step.to_json()
        data["scores"] = None if self.scores is None else [None if math.isnan(s) else s for s in self.scores]
        return data


@dataclass
class Trajectory:
    metric: str
    schedule: str
    compensation: str
    fold_form: FoldForm | None
    untie: bool
    dense_calibration_loss: float
    rounds: list[Round] = field(default_factory=list)
    #: candidates judged per round, and the calibration batches held back to judge and check
    shortlist: int = 1
    judge_batches: int = 0

    @property
    def steps(self) -> list[Step]:
        return [r.step for r in self.rounds]

    @property
    def removed(self) -> list[int]:
        return [i for step in self.steps for i in step.removed]

    def to_json(self) -> dict:
        return {
            "metric": self.metric,
            "schedule": self.schedule,
            "compensation": self.compensation,
            "fold_form": self.fold_form,
            "untie": self.untie,
            "shortlist": self.shortlist,
            "judge_batches": self.judge_batches,
            "dense_calibration_loss": self.dense_calibration_loss,
            "removed_in_order": self.removed,
            "rounds": [r.to_json() for r in self.rounds],
        }


def make_plan(spec: PruneSpec, num_layers: int, tied: bool, num_batches: int | None = None) -> Plan:
    """Validate the prune section against the model's layer count and, when given, the number of
    calibration batches (used by --dry-run too)."""
    try:
        metric = METRICS.get(spec.metric)
    except UnknownName as exc:
        raise RecipeError(str(exc), key="prune.metric") from None
    if spec.protected_layers is None:
        protected = metric.default_protected(num_layers)
    else:
        protected = {_normalise(i, num_layers, "prune.protected_layers") for i in spec.protected_layers}
    drop_layers = None
    if spec.drop_layers is not None:
        drop_layers = tuple(_normalise(i, num_layers, "prune.drop_layers") for i in spec.drop_layers)
        if len(set(drop_layers)) != len(drop_layers):
            twice = next(i for i in drop_layers if drop_layers.count(i) > 1)
            given = [g for g, i in zip(spec.drop_layers, drop_layers, strict=True) if i == twice]
            raise RecipeError(
                f"{' and '.join(map(str, given))} both name layer {twice} of {num_layers}", key="prune.drop_layers"
            )
        if clash := sorted(set(drop_layers) & protected):
            raise RecipeError(f"layers {clash} are protected", key="prune.drop_layers")
        num_drop = len(drop_layers)
    elif spec.num_drop is not None:
        num_drop = spec.num_drop
    else:
        num_drop = max(1, round(spec.ratio * num_layers))
    removable = num_layers - len(protected)
    if num_drop >= num_layers or num_drop > removable:
        key = "prune.num_drop" if spec.num_drop is not None else ("prune.ratio" if spec.ratio else "prune.drop_layers")
        raise RecipeError(
            f"asks to remove {num_drop} layers but the model has {num_layers}, of which {removable} are not "
            "protected (at least one layer must stay)",
            key=key,
        )
    if metric.block and spec.schedule != "one_shot" and drop_layers is None:
        raise RecipeError(
            "contiguous_cosine removes one contiguous block at once: set prune.schedule: one_shot", key="prune.schedule"
        )
    if spec.shortlist > 1 and spec.judge_batches == 0:
        raise RecipeError(
            "judging a shortlist needs held-back batches: prune.judge_batches >= 1", key="prune.shortlist"
        )
    untie = tied and spec.tied_embedding == "untie"
    if spec.compensation in ("none", "linear"):
        fold_form = None
    elif tied and spec.tied_embedding == "post_gap":
        fold_form = "post_gap"
    elif tied and spec.tied_embedding == "scale_tied":
        fold_form = "pre_gap"
    else:
        fold_form = spec.fold
    plan = Plan(
        metric,
        num_layers,
        num_drop,
        frozenset(protected),
        drop_layers,
        fold_form,
        untie,
        spec.compensation,
        spec.ridge,
        spec.probe_batches,
        spec.shortlist,
        spec.judge_batches,
    )
    if num_batches is not None:
        check_judge_batches(plan, num_batches)
    return plan


def check_points(points: list[int] | str, plan: Plan, *, key: str, final_included: bool) -> None:
    """Refuse numbers of removed layers this plan never reaches: past its final number (or at it, where
    ``final_included`` is false: the final model is always evaluated). The recipe refuses repeated and
    non-positive points; this needs the plan, so ``--dry-run`` refuses them too."""
    if points == "all":
        return
    for index, point in enumerate(points):
        if point > plan.num_drop or (point == plan.num_drop and not final_included):
            bound = f"at most {plan.num_drop}" if final_included else f"below {plan.num_drop}"
            raise RecipeError(
                f"{point} removed layers never exist: the run removes {plan.num_drop}, so points must be {bound}",
                key=f"{key}.{index}",
            )


def _normalise(index: int, num_layers: int, key: str) -> int:
    if not -num_layers <= index < num_layers:
        raise RecipeError(f"layer {index} does not exist: the model has {num_layers} layers", key=key)
    return index % num_layers


def prune(
    model: LayerwiseModel,
    batches: list[torch.Tensor],
    plan: Plan,
    schedule: str,
    cache: StreamCache,
    reporter: Reporter | None = None,
) -> Trajectory:
    """Choose and remove ``plan.num_drop`` layers of the source model; the model is run layer by
    layer over cached calibration streams and never changed: the result is the trajectory."""
    reporter = reporter or Reporter()
    check_judge_batches(plan, len(batches))
    plan = replace(plan, judge_batches=judge_count(plan, len(batches)))
    if plan.shortlist > 1 and plan.judge_batches == 0:
        reporter.log("a single calibration batch: none can be held back to judge a shortlist; the metric decides")
        plan = replace(plan, shortlist=1)
    dense = replace(dense_variant(plan.num_layers), untie=plan.untie)
    streams = ResidualStreams(model, batches, cache, dense)
    streams.capture(reporter)
    trajectory = Trajectory(
        plan.metric.name, schedule, plan.compensation, plan.fold_form, plan.untie, streams.lm_loss(),
        shortlist=plan.shortlist, judge_batches=plan.judge_batches,
    )  # fmt: skip
    if schedule == "one_shot":
        _one_shot(streams, plan, trajectory)
    else:
        for number in range(plan.num_drop):
            _one_round(streams, plan, trajectory, number)
            last = trajectory.rounds[-1]
            reporter.log(
                f"round {number + 1}/{plan.num_drop}: removed layer {last.step.removed[0]} ({_describe(last.step)}), "
                f"calibration loss {last.calibration_loss:.4f}, "
                f"{last.layer_forwards / last.full_forward_layer_forwards:.2f}x a full forward"
            )
    return trajectory


def _describe(step: Step) -> str:
    if step.check is not None and step.check.kept == "none":
        return "none of its compensation: it raised the held-back loss"
    if step.check is not None and step.check.kept == "half":
        return f"half of its compensation{'' if step.output_map else f', {step.alpha:.4f}'}: the lowest held-back loss"
    if step.output_map is not None:
        return f"linear map on layer {step.output_map[0]}"
    if step.paper_alpha is not None and step.paper_alpha != step.alpha:
        return f"scalar {step.alpha:.4f}, paper alpha {step.paper_alpha:.4f}"
    return f"alpha {step.alpha:.4f}"


def _candidates(plan: Plan, original: tuple[int, ...]) -> frozenset[int]:
    return frozenset(k for k, o in enumerate(original) if o not in plan.protected)


def _one_round(streams: ResidualStreams, plan: Plan, trajectory: Trajectory, number: int) -> None:
    start = streams.layer_forwards
    scored = list(streams.variant.kept)
    candidates = _candidates(plan, streams.variant.kept)
    scores = plan.metric.score(MetricContext(streams, candidates, _removal_probe(streams, plan)))
    judged: dict[int, float] = {}
    if plan.drop_layers is not None:
        index = scored.index(plan.drop_layers[number])
        step = _checked(streams, plan, index, 1, _compensate(streams, plan, index, 1))
    else:
        shortlist = sorted(candidates, key=lambda k: scores[k])[: plan.shortlist]
        if len(shortlist) > 1:
            index, step, judged = _judged_choice(streams, plan, shortlist)
        else:
            index = shortlist[0]
            step = _checked(streams, plan, index, 1, _compensate(streams, plan, index, 1))
    _remove(streams, plan, trajectory, index, step)
    trajectory.rounds.append(
        Round(
            number + 1,
            step,
            scored,
            scores,
            streams.lm_loss(),
            streams.layer_forwards - start,
            len(scored) * len(streams.batches),
            [scored[k] for k in judged] or None,
            list(judged.values()) or None,
        )
    )


def _judge_ids(streams: ResidualStreams, plan: Plan) -> list[int]:
    """The calibration batches held back from the compensation's fit: the last ones."""
    count = len(streams.batches)
    return list(range(count - judge_count(plan, count), count))


def _fit_ids(streams: ResidualStreams, plan: Plan) -> list[int]:
    """The calibration batches the compensation is measured or fitted on."""
    count = len(streams.batches)
    return list(range(count - judge_count(plan, count)))


def _probe_batches(streams: ResidualStreams, plan: Plan) -> list[int]:
    return _fit_ids(streams, plan)[: plan.probe_batches]


def _judged_choice(streams: ResidualStreams, plan: Plan, shortlist: list[int]) -> tuple[int, Step, dict[int, float]]:
    """The shortlisted layer whose removal, with its compensation measured on the fit batches, leaves
    the lowest loss on the judge batches. All candidates run from their gap through the rest of the
    model together (each layer read once): about one layer-forward per candidate and later layer on
    the judge batches. A fitted scalar is judged with the paper's alpha, then fitted for the chosen
    layer only (fitting one per candidate would multiply the cost by the scalars tried)."""
    judge = _judge_ids(streams, plan)
    steps = {k: _judging_step(streams, plan, k) for k in shortlist}
    losses = streams.probe_losses([_entering(streams, k, 1, steps[k], judge) for k in shortlist], judge)
    judged = dict(zip(shortlist, losses, strict=True))
    index = min(shortlist, key=judged.__getitem__)
    if plan.compensation == "fitted":
        return index, _checked(streams, plan, index, 1, _compensate(streams, plan, index, 1)), judged
    return index, _checked(streams, plan, index, 1, steps[index], judged[index]), judged


def _judging_step(streams: ResidualStreams, plan: Plan, index: int) -> Step:
    if plan.compensation == "fitted":
        alpha = _alpha(streams, plan, index, 1, _fit_ids(streams, plan))
        return Step(list(streams.variant.kept[index : index + 1]), alpha, alpha)
    return _compensate(streams, plan, index, 1)


def _entering(
    streams: ResidualStreams, index: int, count: int, step: Step, batch_ids: list[int]
) -> tuple[int, list[torch.Tensor]]:
    """A probe of the step removing current layers index..index+count-1: the streams entering the
    next layer, with the step's compensation, on ``batch_ids``. A scalar scales the stream entering
    the gap, which is what either fold form does (up to the norm's epsilon); a map T on the MLP
    write M of the layer before the gap adds M (T - I) to it."""
    entering = [streams.cache.get(index, b) for b in batch_ids]
    if step.output_map is None:
        return index + count, [step.alpha * h for h in entering]
    _layer, t = step.output_map
    correction = t - torch.eye(t.shape[0], dtype=t.dtype)
    writes = streams.mlp_writes(index - 1, batch_ids)
    return index + count, [h + m @ correction.to(m) for h, (m, _out) in zip(entering, writes, strict=True)]


def _checked(
    streams: ResidualStreams, plan: Plan, index: int, count: int, step: Step, loss_full: float | None = None
) -> Step:
    """The step as measured on the fit batches, half of it or none: whichever leaves the judge batches'
    loss lowest (``step.check`` says which, with the three losses). So a folded compensation never
    raises that loss above no compensation at the same layers, and one that overshoots is shrunk.
    ``loss_full``: the step's judge loss, when a shortlist already measured it."""
    judge = _judge_ids(streams, plan)
    if not judge or not step.compensated:
        return step
    none, half = replace(step, alpha=1.0, output_map=None), _half(step)
    tried = [none, half] if loss_full is not None else [none, half, step]
    losses = streams.probe_losses([_entering(streams, index, count, s, judge) for s in tried], judge)
    loss_none, loss_half = losses[:2]
    loss_full = losses[2] if loss_full is None else loss_full
    check = {"full": loss_full, "half": loss_half, "none": loss_none}
    kept = min(check, key=check.__getitem__)  # a tie keeps the more compensation
    chosen = {"full": step, "half": half, "none": none}[kept]
    return replace(chosen, check=CompensationCheck(kept, loss_full, loss_none, loss_half))


def _half(step: Step) -> Step:
    """The compensation shrunk half-way to none: the scalar 1 + (alpha - 1) / 2, the map (I + T) / 2."""
    if step.output_map is None:
        return replace(step, alpha=1.0 + (step.alpha - 1.0) / 2)
    layer, t = step.output_map
    return replace(step, output_map=(layer, (t + torch.eye(t.shape[0], dtype=t.dtype)) / 2))


def _compensate(streams: ResidualStreams, plan: Plan, index: int, count: int) -> Step:
    """The step removing current layers index..index+count-1, with the plan's compensation measured
    or fitted on the fit batches (the judge batches are held back)."""
    removed = list(streams.variant.kept[index : index + count])
    fit = _fit_ids(streams, plan)
    if plan.compensation == "linear":
        return Step(removed, 1.0, None, _output_map(streams, plan, index, count, fit))
    alpha = _alpha(streams, plan, index, count, fit)
    if plan.compensation == "fitted" and alpha != 1.0:
        return Step(removed, _fitted_scalar(streams, index, count, alpha, _probe_batches(streams, plan)), alpha)
    return Step(removed, alpha, alpha if plan.fold_form is not None else None)


def _alpha(streams: ResidualStreams, plan: Plan, index: int, count: int, batch_ids: list[int]) -> float:
    """The gap across current layers index..index+count-1 on ``batch_ids``; none needed before the
    final norm. The streams are read one batch at a time."""
    if plan.fold_form is None or index + count >= streams.num_layers:
        return 1.0
    cache = streams.cache
    return magnitude_gap((cache.get(index, b) for b in batch_ids), (cache.get(index + count, b) for b in batch_ids))


def _fitted_scalar(streams: ResidualStreams, index: int, count: int, alpha: float, batch_ids: list[int]) -> float:
    """The scalar with the lowest calibration loss (on ``batch_ids``) after the removal, among none,
    the paper's alpha and points around them, refined by a parabola through the best three. The
    stream entering the gap is scaled, which is what either fold form does (up to the norm's epsilon)."""
    first = index + count
    entering = [streams.cache.get(index, b) for b in batch_ids]

    def losses(scalars: list[float]) -> list[float]:
        return streams.probe_losses([(first, [c * h for h in entering]) for c in scalars], batch_ids)

    scalars = scalar_candidates(alpha)
    tried = list(zip(scalars, losses(scalars), strict=True))
    vertex = refine_minimum(tried)
    if vertex is not None and min(abs(vertex - c) for c in scalars) > 1e-4 * abs(alpha - 1.0):
        tried += list(zip([vertex], losses([vertex]), strict=True))
    return min(tried, key=lambda point: point[1])[0]


def _output_map(streams: ResidualStreams, plan: Plan, index: int, count: int, batch_ids: list[int]) -> OutputMap | None:
    """The map T for the MLP of the last kept layer before the gap (current layer index-1): with M
    its MLP's write and r the stream M is added to, M T best reproduces h_after - r, h_after being the
    stream after the removed layer(s). None when no layer precedes the gap."""
    if index == 0:
        return None
    return _fit_output_map(streams, plan, index, count, batch_ids, streams.mlp_writes(index - 1, batch_ids))


def _fit_output_map(streams, plan: Plan, index: int, count: int, batch_ids: list[int], writes) -> OutputMap:
    """The map from the MLP writes ``(M, layer output)`` of current layer index-1, per batch."""
    after = [streams.cache.get(index + count, b) for b in batch_ids]
    pairs = ((m, m + h_after - out) for (m, out), h_after in zip(writes, after, strict=True))
    return streams.variant.kept[index - 1], fit_output_map(pairs, plan.ridge).float().cpu()


def _removal_probe(streams: ResidualStreams, plan: Plan) -> RemovalProbe:
    """How a compensation-aware metric sees removing current layer k: the stream entering layer k+1
    with the plan's compensation, on the probe batches. A fitted scalar is scored with the paper's
    alpha (fitting one per candidate would multiply the cost by the number of scalars tried)."""
    batch_ids = _probe_batches(streams, plan)

    def start(k: int) -> tuple[int, list[torch.Tensor]]:
        entering = [streams.cache.get(k, b) for b in batch_ids]
        if plan.compensation == "linear" and k > 0:
            writes = list(streams.mlp_writes(k - 1, batch_ids))  # one layer run serves the fit and the probe
            _layer, t = _fit_output_map(streams, plan, k, 1, batch_ids, writes)
            correction = t - torch.eye(t.shape[0])  # M T = M + M (T - I)
            return k + 1, [h + m @ correction.to(m) for h, (m, _out) in zip(entering, writes, strict=True)]
        alpha = _alpha(streams, plan, k, 1, batch_ids)
        return k + 1, [alpha * h for h in entering]

    return RemovalProbe(start, batch_ids)


def variant_of(name: str, plan: Plan, steps: list[Step]) -> Variant:
    return variant_after(name, plan.num_layers, [s.as_fold() for s in steps], plan.fold_form, plan.untie)


def _remove(streams: ResidualStreams, plan: Plan, trajectory: Trajectory, index: int, step: Step) -> None:
    variant = variant_of("prunecomp", plan, [*trajectory.steps, step])
    gap_inside = index < len(variant.kept)
    scale = step.alpha if plan.fold_form == "pre_gap" and gap_inside else 1.0
    changed_before = step.output_map is not None
    streams.after_removal(index, len(step.removed), variant, scale_before=scale, changed_before=changed_before)


def one_shot_choice(plan: Plan, scores: list[float], candidates: frozenset[int], count: int | None = None) -> list[int]:
    """The ``count`` layers (default: the plan's) a one-shot run removes, from scores on the dense
    model: the first of the given drop_layers, or the lowest-scoring candidates."""
    count = plan.num_drop if count is None else count
    if plan.drop_layers is not None:
        return sorted(plan.drop_layers[:count])
    return sorted(sorted(candidates, key=lambda k: scores[k])[:count])


def baseline_layers(plan: Plan, trajectory: Trajectory, count: int | None = None) -> list[int]:
    """What the same metric removes in one shot (``count`` layers, default all): the first round's
    scores were taken on the dense model, so the one-shot choice needs no extra forward pass."""
    if trajectory.schedule == "one_shot":
        return sorted(trajectory.removed)
    first = trajectory.rounds[0]
    candidates = frozenset(k for k, o in enumerate(first.scored_layers) if o not in plan.protected)
    return one_shot_choice(plan, first.scores, candidates, count)


def steps_for(trajectory: Trajectory, layers_removed: int) -> list[Step] | None:
    """The prefix of the run's steps that removes exactly ``layers_removed`` layers, if there is one."""
    steps, removed = [], 0
    for step in trajectory.steps:
        if removed == layers_removed:
            break
        steps.append(step)
        removed += len(step.removed)
    return steps if removed == layers_removed else None


def _one_shot(streams: ResidualStreams, plan: Plan, trajectory: Trajectory) -> None:
    """All layers chosen from the dense model's scores; one alpha per contiguous run, measured on
    the dense model (the paper's one-shot rows and the LLM-Streamline block). The streams are
    captured again once at the end, for the calibration loss."""
    start = streams.layer_forwards
    scored = list(streams.variant.kept)
    candidates = _candidates(plan, streams.variant.kept)
    scores = plan.metric.score(MetricContext(streams, candidates, _removal_probe(streams, plan)))
    if plan.metric.block and plan.drop_layers is None:
        blocks = contiguous_cosine_blocks(streams, plan.num_drop)
        allowed = [i for i in range(len(blocks)) if all(k in candidates for k in range(i, i + plan.num_drop))]
        first = min(allowed, key=lambda i: blocks[i])
        chosen = list(range(first, first + plan.num_drop))
    else:
        chosen = one_shot_choice(plan, scores, candidates)
    steps = [
        _checked(streams, plan, run[0], len(run), _compensate(streams, plan, run[0], len(run)))
        for run in _contiguous_runs(chosen)
    ]
    streams.variant = variant_of("prunecomp", plan, steps)
    streams.capture()
    for number, step in enumerate(steps):
        first_round = number == 0
        trajectory.rounds.append(
            Round(
                number + 1,
                step,
                scored if first_round else None,
                scores if first_round else None,
                math.nan,
                0,
                len(scored) * len(streams.batches),
            )
        )
    trajectory.rounds[-1].calibration_loss = streams.lm_loss()
    trajectory.rounds[-1].layer_forwards = streams.layer_forwards - start


def _contiguous_runs(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def apply_steps(model: nn.Module, adapter: Adapter, steps: list[Step], fold_form: FoldForm | None) -> None:
    """Delete each step's original layers and fold its alpha at the gap, in order (scalar steps only:
    the tests check a linear map against a runtime hook instead)."""
    original = list(range(len(adapter.layers(model))))
    for step in steps:
        if step.output_map is not None:
            raise ValueError("the in-memory fold replays scalar compensation only")
        index = original.index(step.removed[0])
        delete_layers(adapter, model, index, len(step.removed))
        del original[index : index + len(step.removed)]
        if fold_form is not None:
            fold(adapter, model, index, step.alpha, fold_form)


def replay(model: nn.Module, adapter: Adapter, steps: list[Step], fold_form: FoldForm | None, untie: bool) -> None:
    """Apply recorded steps to a dense model: rebuilds the checkpoint after any prefix of a run."""
    if untie:
        adapter.untie_embeddings(model)
    apply_steps(model, adapter, steps, fold_form)
