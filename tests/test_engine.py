"""The iterative loop, the cached streams and the metrics, run layer by layer from the source files
(``LayerwiseModel``, ``StreamCache``, ``ResidualStreams``), checked against independent in-memory
computations: a plain Hugging Face forward of the dense model, or of the model the trajectory's
steps are folded into with ``engine.replay``."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from prunecomp_export.adapters import adapter_for
from prunecomp_export.engine.compensation import magnitude_gap
from prunecomp_export.engine.loop import Trajectory, _one_round, make_plan, prune, replay, variant_of
from prunecomp_export.engine.metrics import (
    MetricContext,
    block_influence,
    layer_bypass_loss,
    magnitude_plus,
    taylor_plus,
)
from prunecomp_export.engine.stream_cache import StreamCache
from prunecomp_export.engine.streams import ResidualStreams
from prunecomp_export.engine.surgery import delete_layers
from prunecomp_export.engine.variant import dense_variant
from prunecomp_export.errors import RecipeError
from prunecomp_export.recipe import PruneSpec
from tests.conftest import ARCHS, TIED, layerwise_of, make_model, prune_streamed, variants_of


def plan_for(model, **spec):
    adapter = adapter_for(model.config)
    return make_plan(PruneSpec(**spec), model.config.num_hidden_layers, adapter.embeddings_tied(model))


def open_streams(model, directory, batches, plan, place: str = "device", *, resident: bool = True) -> ResidualStreams:
    """The dense model's cached streams over ``batches``, not yet captured (close ``.cache`` after)."""
    layerwise = layerwise_of(model, directory / "src", resident=resident)
    cache = StreamCache.open(place, torch.device("cpu"), len(batches), directory)  # type: ignore[arg-type]
    return ResidualStreams(layerwise, batches, cache, replace(dense_variant(plan.num_layers), untie=plan.untie))


def replayed(dense, trajectory: Trajectory, steps=None):
    """A copy of the dense model with the trajectory's steps (default: all) folded in, in memory."""
    model = copy.deepcopy(dense)
    steps = trajectory.steps if steps is None else steps
    replay(model, adapter_for(model.config), steps, trajectory.fold_form, trajectory.untie)
    return model


@torch.no_grad()
def plain_loss(model, batches) -> float:
    """Mean next-token cross entropy over every calibration token, from a plain HF forward."""
    total, count = 0.0, 0
    for input_ids in batches:
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        total += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += input_ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def layer_inputs(model, batches) -> list[tuple[torch.Tensor, ...]]:
    """Per batch, the stream entering each layer (output_hidden_states entries 0..L-1; the last
    entry is after the final norm)."""
    return [model(input_ids=b, output_hidden_states=True).hidden_states for b in batches]


@pytest.mark.parametrize("place", ["device", "disk"])
def test_cached_streams_after_pruning_equal_a_fresh_forward(arch, batches, place, tmp_path):
    """A round recomputes only the layers after the gap and rescales the stream before it; the
    result must equal running the pruned model from scratch, and the in-memory pruned model."""
    model = make_model(arch)
    # every gap inside the model; every round folds (no held-back check that could drop a compensation)
    plan = plan_for(model, num_drop=3, fold="pre_gap", protected_layers=[0, 5], judge_batches=0)
    streams = open_streams(model, tmp_path, batches, plan, place)
    with streams.cache:
        streams.capture()
        trajectory = Trajectory("block_influence", "iterative", "magnitude", plan.fold_form, False, streams.lm_loss())
        for number in range(3):
            _one_round(streams, plan, trajectory, number)
        assert all(r.step.alpha != 1.0 for r in trajectory.rounds), "every round must rescale the cached streams"
        assert len(streams.cache) == 4  # 3 layers left: their inputs and the final norm's
        fresh_cache = StreamCache.open(place, torch.device("cpu"), len(batches), tmp_path)  # type: ignore[arg-type]
        with fresh_cache:
            fresh = ResidualStreams(streams.model, batches, fresh_cache, streams.variant)
            fresh.capture()
            for k in range(len(streams.cache)):
                for b in range(len(batches)):
                    torch.testing.assert_close(streams.cache.get(k, b), fresh_cache.get(k, b), rtol=1e-4, atol=1e-5)
            assert trajectory.rounds[-1].calibration_loss == pytest.approx(fresh.lm_loss(), rel=1e-5)
        # independent: the same steps folded into the model in memory, run by transformers
        reference = layer_inputs(replayed(model, trajectory), batches)
        for b, hidden in enumerate(reference):
            for k in range(3):
                torch.testing.assert_close(streams.cache.get(k, b), hidden[k], rtol=1e-4, atol=1e-5)
        if place == "disk":
            assert len(list(streams.cache.directory.iterdir())) == 4 * len(batches)  # one file per part
    if place == "disk":
        assert not streams.cache.directory.exists()


FOLDS = {
    "pre_gap": (False, dict(fold="pre_gap")),
    "post_gap": (False, dict(fold="post_gap")),
    "tied-post_gap": (True, dict(tied_embedding="post_gap")),
    "tied-scale_tied": (True, dict(tied_embedding="scale_tied")),
    "tied-untie": (True, dict(tied_embedding="untie", fold="pre_gap")),
}


#: how the layers are chosen: by the metric with every gap inside the model, or in an order whose
#: later rounds rerun layers that already carry an earlier round's factor (either fold form)
CHOICES = {"metric": dict(num_drop=3, protected_layers=[0, 5]), "drop_layers": dict(drop_layers=[4, 1, 3])}


@pytest.mark.parametrize("choice", list(CHOICES))
@pytest.mark.parametrize(
    ("arch", "fold"),
    # every architecture untied; tied embeddings on the architectures that ship them
    [(arch, fold) for arch in ARCHS for fold, (tied, _spec) in FOLDS.items() if not tied or arch in TIED],
)
def test_engine_calibration_loss_equals_the_replayed_models_loss(arch, fold, choice, batches, tmp_path):
    """The key exactness test of the streamed engine: after every round, the calibration loss it
    computed layer by layer from the files (with factors applied to tensors as read, and cached
    streams rescaled instead of recomputed) equals a plain HF forward of the dense model with the
    same steps folded in memory by ``engine.replay``."""
    tied, spec = FOLDS[fold]
    dense = make_model(arch, tied=tied)
    plan = plan_for(dense, **CHOICES[choice], **spec, judge_batches=0)  # every round folds: no held-back check
    assert plan.fold_form == ("post_gap" if fold.endswith("post_gap") else "pre_gap")
    trajectory = prune_streamed(dense, batches, plan, tmp_path)
    assert trajectory.dense_calibration_loss == pytest.approx(plain_loss(dense, batches), rel=1e-5)
    assert all(r.step.alpha != 1.0 for r in trajectory.rounds), "every round must fold"
    losses = []
    for number, round_ in enumerate(trajectory.rounds):
        expected = plain_loss(replayed(dense, trajectory, trajectory.steps[: number + 1]), batches)
        assert round_.calibration_loss == pytest.approx(expected, rel=1e-5), number
        losses.append(expected)
    dense_loss = trajectory.dense_calibration_loss
    assert max(abs(loss - dense_loss) for loss in losses) > 1e-3 * dense_loss, "pruning must change the loss"


def test_rounds_recompute_only_layers_after_the_gap(batches, tmp_path):
    model = make_model("llama")
    trajectory = prune_streamed(model, batches, plan_for(model, drop_layers=[4, 1], judge_batches=0), tmp_path)
    first, second = trajectory.rounds
    # round 1 removes original layer 4 of 6: layers 5 is rerun (1 layer x 2 batches), plus nothing else
    assert first.layer_forwards == 1 * len(batches)
    # round 2 removes original layer 1 of the remaining 5: the 3 layers after it are rerun
    assert second.layer_forwards == 3 * len(batches)
    assert first.full_forward_layer_forwards == 6 * len(batches)


def test_block_influence_matches_hidden_states_computation(arch, batches, tmp_path):
    """Independent: output_hidden_states gives each layer's input (entries 0..L-1)."""
    model = make_model(arch)
    streams = open_streams(model, tmp_path, batches, plan_for(model, num_drop=1))
    with streams.cache:
        streams.capture()
        scores = block_influence(MetricContext(streams, frozenset(range(6))))
    hidden = layer_inputs(model, batches)
    for layer in range(5):  # the last entry is after the final norm, so stop before it
        cos = torch.cat([F.cosine_similarity(h[layer], h[layer + 1], dim=-1).flatten() for h in hidden])
        assert scores[layer] == pytest.approx(1 - cos.mean().item(), abs=1e-5)


def test_layer_metrics_match_an_in_memory_computation(batches, tmp_path):
    """Mag+, SLEB's bypass loss and Taylor+ (backpropagated one layer at a time from the cached
    streams) against the same quantities from the whole model in memory."""
    model = make_model("llama", seed=3)
    adapter = adapter_for(model.config)
    streams = open_streams(model, tmp_path, batches, plan_for(model, num_drop=1))
    with streams.cache:
        streams.capture()
        everything = frozenset(range(6))
        magnitudes = magnitude_plus(MetricContext(streams, everything))
        bypass = layer_bypass_loss(MetricContext(streams, frozenset({1, 4})))
        taylor = taylor_plus(MetricContext(streams, everything))
    layers = adapter.layers(model)
    for k, layer in enumerate(layers):
        expected = sum(p.detach().abs().sum().item() for p in layer.parameters())
        assert magnitudes[k] == pytest.approx(expected, rel=1e-6), k
    assert math.isnan(bypass[0]) and math.isnan(bypass[5])  # only candidates are scored
    for k in (1, 4):
        without = copy.deepcopy(model)
        delete_layers(adapter, without, k)
        assert bypass[k] == pytest.approx(plain_loss(without, batches), rel=1e-5), k
    model.zero_grad(set_to_none=True)
    for input_ids in batches:  # each batch's mean loss, gradients accumulated over batches
        logits = model(input_ids=input_ids, use_cache=False).logits.float()
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1)).backward()
    for k, layer in enumerate(layers):
        expected = sum((p.detach() * p.grad).abs().sum().item() for p in layer.parameters() if p.grad is not None)
        assert expected > 0
        assert taylor[k] == pytest.approx(expected, rel=1e-4), k


@pytest.mark.parametrize("metric", ["block_influence", "ppl", "taylor_plus", "magnitude_plus"])
def test_every_metric_prunes_and_respects_protected_layers(metric, batches, tmp_path):
    model = make_model("llama", seed=3)
    plan = plan_for(model, metric=metric, num_drop=2, protected_layers=[2, 3])
    trajectory = prune_streamed(model, batches, plan, tmp_path)
    assert len(trajectory.removed) == 2
    assert not {2, 3} & set(trajectory.removed)
    assert all(r.scores is not None and len(r.scores) == len(r.scored_layers) for r in trajectory.rounds)
    for round_ in trajectory.rounds:  # protected layers were never candidates
        assert round_.step.removed[0] not in (2, 3)
        chosen = round_.scored_layers.index(round_.step.removed[0])
        candidates = [k for k, o in enumerate(round_.scored_layers) if o not in (2, 3)]
        assert round_.scores[chosen] == min(round_.scores[k] for k in candidates)
    pruned = replayed(model, trajectory)
    assert pruned.config.num_hidden_layers == 4 == len(pruned.model.layers)
    assert trajectory.rounds[-1].calibration_loss == pytest.approx(plain_loss(pruned, batches), rel=1e-5)


@pytest.mark.parametrize(("arch", "metric"), [("llama", "block_influence"), ("llama", "taylor_plus"),
                                              ("qwen2_moe", "ppl"), ("gemma2", "block_influence")])  # fmt: skip
def test_streamed_weights_give_the_same_trajectory_as_resident(arch, metric, batches, tmp_path):
    """``weights: streamed`` reads each layer from the files when it runs and releases it after; the
    run must be the same as with every weight resident."""
    model = make_model(arch, tied=arch in TIED)
    plan = plan_for(model, metric=metric, num_drop=3, protected_layers=[0])
    runs = []
    for resident in (True, False):
        layerwise = layerwise_of(model, tmp_path / f"src-{resident}", resident=resident)
        assert layerwise.resident is resident
        with StreamCache.open("device", torch.device("cpu"), len(batches), tmp_path) as cache:
            runs.append(prune(layerwise, batches, plan, "iterative", cache))
        if not resident:  # nothing stays materialised between slices
            assert all(p.device.type == "meta" for p in layerwise.skeleton.parameters())
    resident_run, streamed_run = runs
    assert streamed_run.removed == resident_run.removed
    for a, b in zip(resident_run.rounds, streamed_run.rounds, strict=True):
        assert b.step.alpha == pytest.approx(a.step.alpha, rel=1e-6)
        assert b.calibration_loss == pytest.approx(a.calibration_loss, rel=1e-6)
        assert b.scores == pytest.approx(a.scores, rel=1e-6, nan_ok=True)
        assert b.layer_forwards == a.layer_forwards
    assert streamed_run.dense_calibration_loss == pytest.approx(resident_run.dense_calibration_loss, rel=1e-6)


def test_metric_default_protection_taylor_keeps_first4_last2():
    from prunecomp_export.engine.metrics import METRICS

    assert METRICS.get("taylor_plus").default_protected(10) == {0, 1, 2, 3, 8, 9}
    assert METRICS.get("ppl").default_protected(10) == {0, 9}
    model = make_model("llama")
    with pytest.raises(RecipeError, match="0 are not protected"):
        plan_for(model, metric="taylor_plus", num_drop=1)  # 6 layers: first 4 + last 2 = all protected
    assert plan_for(model, metric="magnitude_plus", num_drop=1, protected_layers=[]).protected == frozenset()


def test_contiguous_cosine_removes_one_block_with_one_alpha(batches, tmp_path):
    model = make_model("llama")
    plan = plan_for(model, metric="contiguous_cosine", num_drop=2, schedule="one_shot")
    trajectory = prune_streamed(model, batches, plan, tmp_path, "one_shot")
    assert len(trajectory.rounds) == 1
    removed = trajectory.rounds[0].step.removed
    assert removed[1] == removed[0] + 1
    # the block is the one whose input and output are most alike (independent: output_hidden_states)
    hidden = layer_inputs(model, batches)
    distance = [
        1 - torch.cat([F.cosine_similarity(h[i], h[i + 2], dim=-1).flatten() for h in hidden]).mean().item()
        for i in range(4)  # blocks 0-1 .. 3-4 (the block 4-5 would end at the final norm's input)
    ]
    if removed[0] < 4:
        assert distance[removed[0]] == pytest.approx(min(distance), abs=1e-5)
    assert trajectory.rounds[0].calibration_loss == pytest.approx(
        plain_loss(replayed(model, trajectory), batches), rel=1e-5
    )
    with pytest.raises(RecipeError, match="one_shot"):
        plan_for(model, metric="contiguous_cosine", num_drop=2)


def test_removing_the_last_layer_needs_no_alpha(batches, tmp_path):
    model = make_model("llama")
    plan = plan_for(model, drop_layers=[5])
    trajectory = prune_streamed(model, batches, plan, tmp_path)
    assert trajectory.rounds[0].step.alpha == 1.0
    variant = variant_of("prunecomp", plan, trajectory.steps)
    assert variant.kept == (0, 1, 2, 3, 4)
    assert variant.writer_scale == (1.0,) * 5 and variant.embedding_scale == 1.0  # kept layers are untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = replayed(model, trajectory).state_dict()
    for key, value in after.items():
        assert torch.equal(value, before[key]), key  # kept layers 0..4 keep their names and weights


def test_removing_the_first_layer_pre_gap_scales_only_the_embedding(batches, tmp_path):
    model = make_model("llama")
    plan = plan_for(model, drop_layers=[0], judge_batches=0)  # alpha measured on every batch
    trajectory = prune_streamed(model, batches, plan, tmp_path)
    alpha = trajectory.rounds[0].step.alpha
    assert alpha != 1.0
    # independent: the magnitude gap across layer 0, from transformers' hidden states
    hidden = layer_inputs(model, batches)
    assert alpha == pytest.approx(magnitude_gap([h[0] for h in hidden], [h[1] for h in hidden]), rel=1e-5)
    variant = variant_of("prunecomp", plan, trajectory.steps)
    assert variant.embedding_scale == alpha and variant.writer_scale == (1.0,) * 5
    pruned = replayed(model, trajectory)
    torch.testing.assert_close(pruned.model.embed_tokens.weight.detach(), model.model.embed_tokens.weight * alpha)
    assert torch.equal(pruned.model.layers[0].self_attn.o_proj.weight, model.model.layers[1].self_attn.o_proj.weight)


def test_drop_layers_and_amount_errors():
    model = make_model("llama")
    with pytest.raises(RecipeError, match="protected"):
        plan_for(model, drop_layers=[0], protected_layers=[0])
    with pytest.raises(RecipeError, match="does not exist"):
        plan_for(model, drop_layers=[6])
    with pytest.raises(RecipeError, match="has 6"):
        plan_for(model, num_drop=6)
    assert plan_for(model, ratio=0.34).num_drop == 2
    assert plan_for(model, drop_layers=[-1]).drop_layers == (5,)


@pytest.mark.parametrize("schedule", ["iterative", "one_shot"])
def test_replay_rebuilds_the_same_model(arch, batches, schedule, tmp_path):
    """The model the engine ran (a variant of the source files, computed layer by layer) and the
    dense model with the recorded steps replayed in memory give the same logits."""
    dense = make_model(arch, tied=arch in TIED)
    plan = plan_for(dense, num_drop=3, tied_embedding="untie")
    trajectory = prune_streamed(dense, batches, plan, tmp_path / "run", schedule)
    rebuilt = replayed(dense, trajectory)
    variants = variants_of(dense, tmp_path / "src", plan)
    variant = variants.prunecomp(trajectory, 3)
    assert variant is not None
    with torch.no_grad():
        expected = rebuilt(input_ids=batches[0]).logits
        torch.testing.assert_close(variants.logits(variant, batches[0]), expected, rtol=1e-4, atol=1e-4)
        assert (dense(input_ids=batches[0]).logits - expected).abs().max() > 1e-2  # pruning changed the model
    assert trajectory.rounds[-1].calibration_loss == pytest.approx(plain_loss(rebuilt, batches), rel=1e-5)


def test_iterative_compensation_lowers_calibration_loss_against_plain_removal(batches, tmp_path):
    """On the calibration data, the same removals with alpha folded should not be worse than
    without (alpha is estimated on that data)."""
    dense = make_model("llama", seed=5)
    t1 = prune_streamed(dense, batches, plan_for(dense, drop_layers=[2, 3]), tmp_path / "a")
    t2 = prune_streamed(dense, batches, plan_for(dense, drop_layers=[2, 3], compensation="none"), tmp_path / "b")
    assert all(r.step.alpha == 1.0 for r in t2.rounds)
    assert t1.rounds[-1].calibration_loss != t2.rounds[-1].calibration_loss


def test_baseline_choice_from_first_round_equals_a_real_one_shot_run(batches, tmp_path):
    from prunecomp_export.engine.loop import baseline_layers

    dense = make_model("llama", seed=7)
    plan = plan_for(dense, num_drop=3, protected_layers=[0])
    iterative = prune_streamed(dense, batches, plan, tmp_path / "iterative", "iterative")
    one_shot = prune_streamed(dense, batches, plan, tmp_path / "one_shot", "one_shot")
    assert baseline_layers(plan, iterative) == sorted(one_shot.removed)
    assert baseline_layers(plan, one_shot) == sorted(one_shot.removed)
