"""Selection that sees the compensation (a shortlist judged on held-back calibration batches) and the
held-back check of each removal's compensation, against independent computations: Hugging Face
forwards of the dense model with the steps folded in memory (``engine.replay``), on the batches the
engine held back, and the magnitude gap from transformers' hidden states on the batches it fitted on."""

from __future__ import annotations

import copy

import pytest
import torch

from prunecomp_export.adapters import adapter_for
from prunecomp_export.engine.compensation import magnitude_gap
from prunecomp_export.engine.loop import Step, judge_count, make_plan, replay
from prunecomp_export.errors import RecipeError
from prunecomp_export.recipe import PruneSpec
from tests.conftest import make_model, prune_streamed
from tests.test_engine import layer_inputs, plain_loss, plan_for

SIGNAL_CHANNEL, TARGET = 0, 5


def alpha_harmful_model():
    """A tiny Llama on which the paper's alpha for layer 2 clearly hurts. The calibration text repeats
    one token, whose logit is read from a single channel of the final norm's input (the LM head's only
    non-zero weight). The embedding and layers 0-2 write (almost) nothing into that channel, layers 3-5
    do: the prediction lives in the later writes. Layer 2 writes loudly into every other channel, so the
    magnitude gap across it is large (about 29); scaling the stream that enters the gap by it drowns the
    later writes' share of that channel, where removing layer 2 without compensation keeps it."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, SIGNAL_CHANNEL] = 0.01
        for k in (0, 1, 2):
            layer = model.model.layers[k]
            for weight in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
                weight[SIGNAL_CHANNEL] = 0.0
                if k == 2:
                    weight.mul_(20.0)
        pruned = copy.deepcopy(model)
        replay(pruned, adapter_for(pruned.config), [Step([2], 1.0)], None, False)
        final_input = []
        handle = pruned.model.norm.register_forward_hook(lambda _m, inputs, _o: final_input.append(inputs[0]))
        pruned(input_ids=torch.full((1, 24), TARGET))
        handle.remove()
        sign = final_input[0][..., SIGNAL_CHANNEL].mean().sign()
        model.lm_head.weight.zero_()
        model.lm_head.weight[TARGET, SIGNAL_CHANNEL] = 30.0 * sign
    return model


def one_token_batches() -> list[torch.Tensor]:
    return list(torch.full((4, 24), TARGET).split(2))


def removed_with(dense, steps: list[Step]):
    model = copy.deepcopy(dense)
    replay(model, adapter_for(model.config), steps, "pre_gap", False)
    return model


def test_the_paper_alpha_that_hurts_held_back_batches_falls_back_to_none(tmp_path):
    dense = alpha_harmful_model()
    batches = one_token_batches()
    fit, judge = batches[:1], batches[1:]
    with torch.no_grad():
        hidden = layer_inputs(dense, fit)
    alpha = magnitude_gap([h[2] for h in hidden], [h[3] for h in hidden])
    loss_none = plain_loss(removed_with(dense, [Step([2], 1.0)]), judge)
    loss_alpha = plain_loss(removed_with(dense, [Step([2], alpha)]), judge)
    loss_half = plain_loss(removed_with(dense, [Step([2], 1 + (alpha - 1) / 2)]), judge)
    assert alpha > 10 and loss_alpha > 1.3 * loss_none, "the construction: the paper's alpha clearly hurts"

    plan = plan_for(dense, drop_layers=[2], judge_batches=1)
    (step,) = prune_streamed(dense, batches, plan, tmp_path).steps
    assert step.paper_alpha == pytest.approx(alpha, rel=1e-5)  # measured on the fit batch only
    assert step.check is not None and step.check.kept == "none" and step.alpha == 1.0
    assert step.check.loss_full == pytest.approx(loss_alpha, rel=1e-5)
    assert step.check.loss_none == pytest.approx(loss_none, rel=1e-5)
    assert step.check.loss_half == pytest.approx(loss_half, rel=1e-5)
    losses = {k: getattr(step.check, k) for k in ("loss_full", "loss_none", "loss_half")}
    assert step.to_json()["check"] == {"kept": "none", **losses}

    # without the check the paper's alpha is folded, and the held-back loss is the harmful one
    unchecked = prune_streamed(dense, batches, plan_for(dense, drop_layers=[2], judge_batches=0), tmp_path / "b")
    assert unchecked.steps[0].check is None and unchecked.steps[0].alpha > 10


def test_a_compensation_that_overshoots_is_halved_where_half_is_lower_than_full_and_none(tmp_path):
    """A random Llama whose layer 2 writes 8x louder: its paper alpha (about 6.9) helps the held-back
    batch, half of it helps more, so half is folded, though the full one beat none (by hand: the three
    losses from Hugging Face forwards)."""
    dense = make_model("llama", seed=0)
    with torch.no_grad():
        for weight in (dense.model.layers[2].self_attn.o_proj.weight, dense.model.layers[2].mlp.down_proj.weight):
            weight.mul_(8.0)
    batches = list(torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(1)).split(2))
    fit, judge = batches[:-1], batches[-1:]
    with torch.no_grad():
        hidden = layer_inputs(dense, fit)
    alpha = magnitude_gap([h[2] for h in hidden], [h[3] for h in hidden])
    full, half, none = (plain_loss(removed_with(dense, [Step([2], a)]), judge) for a in (alpha, 1 + (alpha - 1) / 2, 1))
    assert half < full < none, "the construction: the paper's alpha helps, half of it helps more"

    (step,) = prune_streamed(dense, batches, plan_for(dense, drop_layers=[2], judge_batches=1), tmp_path).steps
    assert step.check is not None and step.check.kept == "half"
    assert step.alpha == pytest.approx(1 + (alpha - 1) / 2, rel=1e-5)
    recorded = (step.check.loss_full, step.check.loss_half, step.check.loss_none)
    assert recorded == pytest.approx((full, half, none), rel=1e-5)


def test_every_checked_removal_folds_the_lowest_held_back_loss_of_full_half_and_none(tmp_path):
    """On a random model (where the paper's alpha often does not help), every removal folds whichever of
    its full compensation, half of it and none leaves the held-back batch's loss lowest, after the
    earlier ones: so never worse than none; the recorded losses are the plain forwards'."""
    dense = make_model("llama", seed=4)
    batches = list(torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(1)).split(2))
    plan = plan_for(dense, num_drop=3, judge_batches=1, protected_layers=[0])
    trajectory = prune_streamed(dense, batches, plan, tmp_path)
    kept = [step.check.kept for step in trajectory.steps if step.check is not None]
    assert kept, "random models: every removal inside the model is checked"
    for number, step in enumerate(trajectory.steps):
        if step.check is None:
            continue
        # independent: the folded compensation's loss on the held-back batch, after the earlier steps
        before = trajectory.steps[:number]
        folded = plain_loss(removed_with(dense, [*before, step]), batches[1:])
        none = plain_loss(removed_with(dense, [*before, Step(step.removed, 1.0)]), batches[1:])
        alpha = step.paper_alpha
        full = plain_loss(removed_with(dense, [*before, Step(step.removed, alpha)]), batches[1:])
        half = plain_loss(removed_with(dense, [*before, Step(step.removed, 1 + (alpha - 1) / 2)]), batches[1:])
        assert folded <= none * (1 + 1e-6), number
        assert folded == pytest.approx(min(full, half, none), rel=1e-5), number
        recorded = {"full": step.check.loss_full, "half": step.check.loss_half, "none": step.check.loss_none}
        assert recorded == pytest.approx({"full": full, "half": half, "none": none}, rel=1e-5), number
        assert recorded[step.check.kept] == pytest.approx(folded, rel=1e-5)
        assert step.alpha == pytest.approx({"full": alpha, "half": 1 + (alpha - 1) / 2, "none": 1.0}[step.check.kept])


def test_a_shortlist_is_judged_by_the_held_back_loss_with_its_compensation(batches, tmp_path):
    dense = make_model("llama", seed=3)
    plan = plan_for(dense, num_drop=2, shortlist=3, judge_batches=1, protected_layers=[0])
    trajectory = prune_streamed(dense, batches, plan, tmp_path)
    assert trajectory.shortlist == 3 and trajectory.judge_batches == 1
    fit, judge = batches[:1], batches[1:]
    for number, round_ in enumerate(trajectory.rounds):
        before = trajectory.steps[:number]
        current = removed_with(dense, before)
        kept = round_.scored_layers
        candidates = [k for k, original in enumerate(kept) if original != 0]
        shortlist = sorted(candidates, key=lambda k: round_.scores[k])[:3]
        assert round_.judged_layers == [kept[k] for k in shortlist]
        hidden = layer_inputs(current, fit)
        for k, loss in zip(shortlist, round_.judged_losses, strict=True):
            last = k + 1 == len(kept)
            alpha = 1.0 if last else magnitude_gap([h[k] for h in hidden], [h[k + 1] for h in hidden])
            want = plain_loss(removed_with(dense, [*before, Step([kept[k]], alpha)]), judge)
            assert loss == pytest.approx(want, rel=1e-5), (number, k)
        best = min(range(3), key=lambda i: round_.judged_losses[i])
        assert round_.step.removed == [round_.judged_layers[best]]
        # the cost: each candidate runs from its gap on the judge batch; the check adds the removal
        # uncompensated and half compensated; then the layers after the gap are rerun on every batch
        index = kept.index(round_.step.removed[0])
        after = len(kept) - 1 - index
        check = 0 if round_.step.check is None else 2
        judged = sum(len(kept) - 1 - k for k in shortlist)
        assert round_.layer_forwards == len(judge) * (judged + check * after) + len(batches) * after


def test_judge_batches_default_and_limits():
    spec = PruneSpec(num_drop=1)
    assert spec.shortlist >= 1 and spec.judge_batches is None
    plan = make_plan(spec, 6, False)
    assert [judge_count(plan, n) for n in (1, 2, 4, 8, 32)] == [0, 1, 1, 2, 8]
    with pytest.raises(RecipeError, match="at least one must remain") as error:
        make_plan(PruneSpec(num_drop=1, judge_batches=4), 6, False, num_batches=4)
    assert error.value.key == "prune.judge_batches"
    with pytest.raises(RecipeError) as error:
        make_plan(PruneSpec(num_drop=1, shortlist=2, judge_batches=0), 6, False)
    assert error.value.key == "prune.shortlist"
