"""The iterative loop, the cached streams, metrics and layer surgery on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from prunecomp_export.adapters import adapter_for
from prunecomp_export.engine import make_plan, prune, replay
from prunecomp_export.errors import RecipeError
from prunecomp_export.metrics import MetricContext, block_influence
from prunecomp_export.recipe import PruneSpec
from prunecomp_export.streams import ResidualStreams
from tests.conftest import TIED, make_model


def plan_for(model, **spec):
    adapter = adapter_for(model.config)
    return make_plan(PruneSpec(**spec), model.config.num_hidden_layers, adapter.embeddings_tied(model))


def test_cached_streams_after_pruning_equal_a_fresh_forward(arch, batches):
    """A round recomputes only the layers after the gap and rescales the stream before it; the
    result must equal running the pruned model from scratch."""
    model = make_model(arch)
    adapter = adapter_for(model.config)
    plan = plan_for(model, num_drop=3, fold="pre_gap")
    streams = ResidualStreams(model, adapter, batches)
    streams.capture()
    from prunecomp_export.engine import Trajectory, _one_round

    trajectory = Trajectory("block_influence", "iterative", plan.fold_form, False, streams.lm_loss())
    original = list(range(6))
    for number in range(3):
        _one_round(streams, plan, original, trajectory, number)
    fresh = ResidualStreams(model, adapter, batches)
    fresh.capture()
    for cached_states, fresh_states in zip(streams.states, fresh.states, strict=True):
        assert len(cached_states) == len(fresh_states) == 4
        for cached, recomputed in zip(cached_states, fresh_states, strict=True):
            torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-5)
    assert trajectory.rounds[-1].calibration_loss == pytest.approx(fresh.lm_loss(), rel=1e-5)


def test_rounds_recompute_only_layers_after_the_gap(batches):
    model = make_model("llama")
    adapter = adapter_for(model.config)
    trajectory = prune(model, adapter, batches, plan_for(model, drop_layers=[4, 1]), "iterative")
    first, second = trajectory.rounds
    # round 1 removes original layer 4 of 6: layers 5 is rerun (1 layer x 2 batches), plus nothing else
    assert first.layer_forwards == 1 * len(batches)
    # round 2 removes original layer 1 of the remaining 5: the 3 layers after it are rerun
    assert second.layer_forwards == 3 * len(batches)
    assert first.full_forward_layer_forwards == 6 * len(batches)


def test_block_influence_matches_hidden_states_computation(arch, batches):
    """Independent: output_hidden_states gives each layer's input (entries 0..L-1)."""
    model = make_model(arch)
    adapter = adapter_for(model.config)
    streams = ResidualStreams(model, adapter, batches)
    streams.capture()
    scores = block_influence(MetricContext(streams, frozenset(range(6))))
    hidden = [model(input_ids=b, output_hidden_states=True).hidden_states for b in batches]
    for layer in range(5):  # the last entry is after the final norm, so stop before it
        cos = torch.cat([F.cosine_similarity(h[layer], h[layer + 1], dim=-1).flatten() for h in hidden])
        assert scores[layer] == pytest.approx(1 - cos.mean().item(), abs=1e-5)


@pytest.mark.parametrize("metric", ["block_influence", "ppl", "taylor_plus", "magnitude_plus"])
def test_every_metric_prunes_and_respects_protected_layers(metric, batches):
    model = make_model("llama", seed=3)
    adapter = adapter_for(model.config)
    plan = plan_for(model, metric=metric, num_drop=2, protected_layers=[2, 3])
    trajectory = prune(model, adapter, batches, plan, "iterative")
    assert len(trajectory.removed) == 2
    assert not {2, 3} & set(trajectory.removed)
    assert model.config.num_hidden_layers == 4 == len(model.model.layers)
    assert all(r.scores is not None and len(r.scores) == len(r.scored_layers) for r in trajectory.rounds)


def test_metric_default_protection_taylor_keeps_first4_last2():
    from prunecomp_export.metrics import METRICS

    assert METRICS.get("taylor_plus").default_protected(10) == {0, 1, 2, 3, 8, 9}
    assert METRICS.get("ppl").default_protected(10) == {0, 9}
    model = make_model("llama")
    with pytest.raises(RecipeError, match="0 are not protected"):
        plan_for(model, metric="taylor_plus", num_drop=1)  # 6 layers: first 4 + last 2 = all protected
    assert plan_for(model, metric="magnitude_plus", num_drop=1, protected_layers=[]).protected == frozenset()


def test_contiguous_cosine_removes_one_block_with_one_alpha(batches):
    model = make_model("llama")
    adapter = adapter_for(model.config)
    trajectory = prune(
        model,
        adapter,
        batches,
        plan_for(model, metric="contiguous_cosine", num_drop=2, schedule="one_shot"),
        "one_shot",
    )
    assert len(trajectory.rounds) == 1
    removed = trajectory.rounds[0].step.removed
    assert removed[1] == removed[0] + 1
    with pytest.raises(RecipeError, match="one_shot"):
        plan_for(model, metric="contiguous_cosine", num_drop=2)


def test_removing_the_last_layer_needs_no_alpha(batches):
    model = make_model("llama")
    adapter = adapter_for(model.config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trajectory = prune(model, adapter, batches, plan_for(model, drop_layers=[5]), "iterative")
    assert trajectory.rounds[0].step.alpha == 1.0
    after = model.state_dict()
    for key, value in after.items():
        assert torch.equal(value, before[key]), key  # kept layers 0..4 keep their names and weights


def test_removing_the_first_layer_pre_gap_scales_only_the_embedding(batches):
    model = make_model("llama")
    adapter = adapter_for(model.config)
    embedding = model.model.embed_tokens.weight.detach().clone()
    writers = model.model.layers[1].self_attn.o_proj.weight.detach().clone()
    trajectory = prune(model, adapter, batches, plan_for(model, drop_layers=[0]), "iterative")
    alpha = trajectory.rounds[0].step.alpha
    assert alpha != 1.0
    torch.testing.assert_close(model.model.embed_tokens.weight.detach(), embedding * alpha)
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, writers)


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
def test_replay_rebuilds_the_same_model(arch, batches, schedule):
    dense = make_model(arch, tied=arch in TIED)
    model = copy.deepcopy(dense)
    adapter = adapter_for(model.config)
    plan = plan_for(model, num_drop=3, tied_embedding="untie")
    trajectory = prune(model, adapter, batches, plan, schedule)
    rebuilt = copy.deepcopy(dense)
    replay(rebuilt, adapter, trajectory.steps, trajectory.fold_form, trajectory.untie)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=batches[0]).logits, model(input_ids=batches[0]).logits)


def test_iterative_compensation_lowers_calibration_loss_against_plain_removal(batches):
    """On the calibration data, the same removals with alpha folded should not be worse than
    without (alpha is estimated on that data)."""
    dense = make_model("llama", seed=5)
    compensated, plain = copy.deepcopy(dense), copy.deepcopy(dense)
    adapter = adapter_for(dense.config)
    t1 = prune(compensated, adapter, batches, plan_for(dense, drop_layers=[2, 3]), "iterative")
    t2 = prune(plain, adapter, batches, plan_for(dense, drop_layers=[2, 3], compensation="none"), "iterative")
    assert all(r.step.alpha == 1.0 for r in t2.rounds)
    assert t1.rounds[-1].calibration_loss != t2.rounds[-1].calibration_loss


def test_baseline_choice_from_first_round_equals_a_real_one_shot_run(batches):
    from prunecomp_export.engine import baseline_layers

    dense = make_model("llama", seed=7)
    plan = plan_for(dense, num_drop=3, protected_layers=[0])
    adapter = adapter_for(dense.config)
    iterative = prune(copy.deepcopy(dense), adapter, batches, plan, "iterative")
    one_shot = prune(copy.deepcopy(dense), adapter, batches, plan, "one_shot")
    assert baseline_layers(plan, iterative) == sorted(one_shot.removed)
    assert baseline_layers(plan, one_shot) == sorted(one_shot.removed)
