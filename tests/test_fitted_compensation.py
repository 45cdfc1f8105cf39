"""Fitted compensation (a scalar chosen on calibration loss, a least-squares d x d map folded into the
last kept layer's down projection) and the compensation-aware metric, each checked against an
independent computation: torch's least squares, Hugging Face forwards with the map applied by a
runtime hook, and the in-memory fold's loss over a grid of scalars."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from prunecomp_export.adapters import adapter_for
from prunecomp_export.engine.compensation import fit_output_map, magnitude_gap
from prunecomp_export.engine.loop import Step, replay
from tests.conftest import GEMMAS, make_model, prune_streamed, variants_of
from tests.test_engine import plain_loss, plan_for, replayed

MAPPABLE = ["llama", "qwen2", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"]


def test_fit_output_map_is_the_least_squares_solution():
    generator = torch.Generator().manual_seed(0)
    m = [torch.randn(2, 40, 8, generator=generator, dtype=torch.float64) for _ in range(3)]
    true = torch.eye(8, dtype=torch.float64) + 0.1 * torch.randn(8, 8, generator=generator, dtype=torch.float64)
    y = [x @ true + 0.01 * torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in m]
    flat_m, flat_y = torch.cat([x.reshape(-1, 8) for x in m]), torch.cat([x.reshape(-1, 8) for x in y])

    got = fit_output_map(zip(m, y, strict=True), ridge=0.0)
    torch.testing.assert_close(got, torch.linalg.lstsq(flat_m, flat_y).solution)

    # the ridge pulls towards the identity: least squares on rows sqrt(lam) I appended to M and to Y
    lam = 0.5 * (flat_m * flat_m).sum(dim=0).mean()
    eye = lam.sqrt() * torch.eye(8, dtype=torch.float64)
    want = torch.linalg.lstsq(torch.cat([flat_m, eye]), torch.cat([flat_y, eye])).solution
    torch.testing.assert_close(fit_output_map(zip(m, y, strict=True), ridge=0.5), want)


def hooked(dense, removed: list[int], maps: dict[int, torch.Tensor]):
    """The dense model with each map applied to its layer's MLP output by a forward hook, at run time,
    and the removed layers deleted: what folding the maps into the weights must equal."""
    model = copy.deepcopy(dense)
    adapter = adapter_for(model.config)
    layers = adapter.layers(model)
    for original, t in maps.items():

        def times_t(_module, _inputs, output, t=t):
            if isinstance(output, tuple):
                return (output[0] @ t.to(output[0]), *output[1:])
            return output @ t.to(output)

        adapter.mlp_output_module(layers[original]).register_forward_hook(times_t)
    replay(model, adapter, [Step([i], 1.0) for i in removed], None, False)
    return model


@pytest.mark.parametrize("arch", MAPPABLE)
def test_linear_map_folds_exactly_and_is_the_least_squares_fit(arch, batches, tmp_path):
    dense = make_model(arch)
    plan = plan_for(dense, drop_layers=[3, 1], compensation="linear", ridge=1e-3, judge_batches=0)  # fit on all
    trajectory = prune_streamed(dense, batches, plan, tmp_path / "src")
    steps = trajectory.steps
    assert [s.output_map[0] for s in steps] == [2, 0], "each map goes on the last kept layer before the gap"

    # the first map: least squares from the dense model's own streams (hooks, output_hidden_states)
    captured = []
    mlp = adapter_for(dense.config).mlp_output_module(adapter_for(dense.config).layers(dense)[2])
    handle = mlp.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        states = [dense(input_ids=b, output_hidden_states=True).hidden_states for b in batches]
    handle.remove()
    m = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    # what layer 2's MLP must write so that the stream after it is the stream after layer 3
    y = torch.cat([(c + h[4] - h[3]).reshape(-1, m.shape[1]) for c, h in zip(captured, states, strict=True)]).double()
    lam = 1e-3 * (m * m).sum(dim=0).mean()
    eye = lam.sqrt() * torch.eye(m.shape[1], dtype=torch.float64)
    want = torch.linalg.lstsq(torch.cat([m, eye]), torch.cat([y, eye])).solution
    torch.testing.assert_close(steps[0].output_map[1].double(), want, rtol=1e-4, atol=1e-5)

    # the engine's loss after each round, and the written checkpoint, equal the hooked model's
    maps: dict[int, torch.Tensor] = {}
    for number, step in enumerate(steps):
        maps[step.output_map[0]] = step.output_map[1]
        reference = hooked(dense, trajectory.removed[: number + 1], maps)
        assert trajectory.rounds[number].calibration_loss == pytest.approx(plain_loss(reference, batches), rel=1e-5)
    variants = variants_of(dense, tmp_path / "src2", plan)
    variant = variants.prunecomp(trajectory, 2)
    variants.write(variant, tmp_path / "out")
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        got = written(input_ids=batches[0]).logits
        want_logits = reference(input_ids=batches[0]).logits
    torch.testing.assert_close(got, want_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(variants.logits(variant, batches[0]), want_logits, rtol=1e-4, atol=1e-4)
    assert all(r.calibration_loss < trajectory.dense_calibration_loss + 5 for r in trajectory.rounds)


def test_a_map_on_a_layer_that_already_has_one_composes(batches, tmp_path):
    """Removing 3 then 4 puts both maps on layer 2: its MLP output times T1 then T2."""
    dense = make_model("llama")
    plan = plan_for(dense, drop_layers=[3, 4], compensation="linear", judge_batches=0)
    trajectory = prune_streamed(dense, batches, plan, tmp_path / "src")
    (t1_layer, t1), (t2_layer, t2) = (s.output_map for s in trajectory.steps)
    assert t1_layer == t2_layer == 2
    reference = hooked(dense, [3, 4], {2: t1 @ t2})
    assert trajectory.rounds[-1].calibration_loss == pytest.approx(plain_loss(reference, batches), rel=1e-5)


def test_fitted_scalar_is_never_worse_than_none_or_the_paper_alpha(batches, tmp_path):
    dense = make_model("llama")
    # fitted on every batch, the batches it is compared on
    magnitude_plan = plan_for(dense, drop_layers=[2], fold="pre_gap", judge_batches=0)
    magnitude = prune_streamed(dense, batches, magnitude_plan, tmp_path / "a")
    plan = plan_for(dense, drop_layers=[2], fold="pre_gap", compensation="fitted", probe_batches=None, judge_batches=0)
    fitted = prune_streamed(dense, batches, plan, tmp_path / "b")
    (step,) = fitted.steps
    alpha = magnitude.steps[0].alpha
    assert step.paper_alpha == pytest.approx(alpha, rel=1e-6)

    def loss(scalar: float) -> float:  # independent: the fold in memory, a plain forward
        return plain_loss(replayed(dense, fitted, [Step([2], scalar)]), batches)

    grid = [1.0 + s * (alpha - 1.0) for s in torch.linspace(-0.5, 2.0, 26).tolist()]
    best = min(loss(c) for c in grid)
    chosen = loss(step.alpha)
    assert fitted.rounds[0].calibration_loss == pytest.approx(chosen, rel=1e-5)
    assert chosen <= loss(1.0) + 1e-6 and chosen <= loss(alpha) + 1e-6
    assert chosen - best <= 0.1 * (loss(1.0) - best) + 2e-5  # the parabola's vertex, not the grid's best


def test_compensated_loss_scores_each_removal_with_its_alpha(batches, tmp_path):
    dense = make_model("llama")
    plan = plan_for(dense, num_drop=1, metric="compensated_loss", fold="pre_gap", probe_batches=1)
    trajectory = prune_streamed(dense, batches, plan, tmp_path / "src")
    scores = trajectory.rounds[0].scores
    with torch.no_grad():
        states = dense(input_ids=batches[0], output_hidden_states=True).hidden_states
    num_layers = dense.config.num_hidden_layers
    for k in range(num_layers):
        alpha = magnitude_gap([states[k]], [states[k + 1]]) if k + 1 < num_layers else 1.0
        want = plain_loss(replayed(dense, trajectory, [Step([k], alpha)]), batches[:1])
        assert scores[k] == pytest.approx(want, rel=1e-5), k
    assert trajectory.removed == [min(range(num_layers), key=lambda k: scores[k])]


@pytest.mark.parametrize("arch", sorted(GEMMAS))
def test_linear_compensation_is_refused_before_loading_where_it_cannot_fold(arch, tmp_path):
    from prunecomp_export.cli import main
    from tests.test_checkpoint import tiny_tokenizer

    source = tmp_path / "model"
    make_model(arch).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({
        "model": {"source": str(source)},
        "calibration": {"source": "builtin", "corpus": "gensim-wiki", "num_samples": 2, "seq_len": 8},
        "prune": {"num_drop": 1, "compensation": "linear"},
        "output": {"dir": str(tmp_path / "out")},
    }))  # fmt: skip
    result = CliRunner().invoke(main, [str(recipe), "--dry-run"])
    assert result.exit_code == 2
    assert "prune.compensation" in result.output and "post_feedforward_layernorm" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("metric", "compensation"), [("compensated_loss", "linear"), ("block_influence", "fitted")])
def test_a_run_with_fitted_compensation_writes_a_verified_checkpoint(metric, compensation, tmp_path):
    """The CLI end to end: the reload check compares transformers' logits on the written checkpoint
    with the engine's; results.json records what was folded."""
    from prunecomp_export.cli import main
    from tests.test_recipe_errors import GOOD, write

    source = tmp_path / "model"
    make_model("llama").save_pretrained(source)
    from tests.test_checkpoint import tiny_tokenizer

    tiny_tokenizer().save_pretrained(source)
    prune = f"  num_drop: 2\n  metric: {metric}\n  compensation: {compensation}\n"
    recipe = write(tmp_path, GOOD.replace("  num_drop: 2\n", prune), source)
    result = CliRunner().invoke(main, [str(recipe)])
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    verification = json.loads((tmp_path / "out" / "prunecomp_manifest.json").read_text())["verification"]
    assert verification["max_abs_logit_diff"] <= verification["tolerance"]
    trajectory = results["trajectory"]
    assert trajectory["compensation"] == compensation and trajectory["metric"] == metric
    steps = [r["step"] for r in trajectory["rounds"]]
    if compensation == "linear":
        assert all(s["output_map_layer"] is not None and s["alpha"] == 1.0 for s in steps)
    else:
        assert all(s["paper_alpha"] is not None and s["output_map_layer"] is None for s in steps)
