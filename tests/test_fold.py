"""Folding alpha into the weights equals scaling the residual stream by alpha at the gap.

The reference never touches the weights: it deletes the layer and multiplies the stream entering
the layer after the gap by alpha with a forward pre-hook, which is what compensation means.
"""

from __future__ import annotations

import copy

import pytest
import torch

from prunecomp_export.adapters import adapter_for
from prunecomp_export.engine.compensation import fold, magnitude_gap
from prunecomp_export.engine.surgery import delete_layers
from tests.conftest import make_model

ALPHA = 1.37


def explicit_scaling_logits(model, gap_layer: int, alpha: float, input_ids: torch.Tensor) -> torch.Tensor:
    """Delete layer ``gap_layer`` and scale the stream entering the next one by alpha."""
    reference = copy.deepcopy(model)
    adapter = adapter_for(reference.config)
    delete_layers(adapter, reference, gap_layer)
    layers = adapter.layers(reference)

    def scale(_module, args, kwargs):
        if args:
            return (args[0] * alpha, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * alpha}

    handle = layers[gap_layer].register_forward_pre_hook(scale, with_kwargs=True) if gap_layer < len(layers) else None
    with torch.no_grad():
        logits = reference(input_ids=input_ids).logits
    if handle:
        handle.remove()
    return logits


def folded_logits(model, gap_layer: int, alpha: float, form: str, input_ids: torch.Tensor) -> torch.Tensor:
    pruned = copy.deepcopy(model)
    adapter = adapter_for(pruned.config)
    delete_layers(adapter, pruned, gap_layer)
    fold(adapter, pruned, gap_layer, alpha, form)
    with torch.no_grad():
        return pruned(input_ids=input_ids).logits


@pytest.mark.parametrize("form", ["pre_gap", "post_gap"])
@pytest.mark.parametrize("gap_layer", [0, 2, 4])
def test_fold_equals_explicit_stream_scaling_untied(arch, form, gap_layer, batches):
    model = make_model(arch, tied=False)
    ids = batches[0]
    expected = explicit_scaling_logits(model, gap_layer, ALPHA, ids)
    got = folded_logits(model, gap_layer, ALPHA, form, ids)
    unscaled = explicit_scaling_logits(model, gap_layer, 1.0, ids)
    assert (expected - unscaled).abs().max() > 1e-2, "the test model must be sensitive to the scale"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gap_layer", [0, 3])
def test_post_gap_fold_is_exact_on_tied_embeddings(arch, gap_layer, batches):
    model = make_model(arch, tied=True)
    adapter = adapter_for(model.config)
    assert adapter.embeddings_tied(model)
    ids = batches[0]
    expected = explicit_scaling_logits(model, gap_layer, ALPHA, ids)
    torch.testing.assert_close(folded_logits(model, gap_layer, ALPHA, "post_gap", ids), expected, rtol=1e-4, atol=1e-4)


def test_pre_gap_fold_on_tied_embeddings_scales_the_logits(batches):
    """The authors' form on a tied embedding also scales the LM head: the logits grow by alpha.
    That is why post_gap is the default for tied models."""
    model = make_model("llama", tied=True)
    ids = batches[0]
    expected = explicit_scaling_logits(model, 2, ALPHA, ids)
    got = folded_logits(model, 2, ALPHA, "pre_gap", ids)
    torch.testing.assert_close(got, expected * ALPHA, rtol=1e-4, atol=1e-4)


def test_untie_then_pre_gap_fold_is_exact(batches):
    model = make_model("llama", tied=True)
    ids = batches[0]
    expected = explicit_scaling_logits(model, 2, ALPHA, ids)
    untied = copy.deepcopy(model)
    adapter = adapter_for(untied.config)
    adapter.untie_embeddings(untied)
    assert not adapter.embeddings_tied(untied)
    delete_layers(adapter, untied, 2)
    fold(adapter, untied, 2, ALPHA, "pre_gap")
    with torch.no_grad():
        torch.testing.assert_close(untied(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_fold_scales_biases_of_residual_writers():
    model = make_model("qwen2")
    model.model.layers[0].self_attn.o_proj.bias = torch.nn.Parameter(torch.randn(64))
    before = model.model.layers[0].self_attn.o_proj.bias.detach().clone()
    adapter = adapter_for(model.config)
    fold(adapter, model, 2, 2.0, "pre_gap")
    torch.testing.assert_close(model.model.layers[0].self_attn.o_proj.bias.detach(), before * 2.0)


def test_fold_happens_in_fp32_and_stores_model_dtype():
    model = make_model("llama").to(torch.bfloat16)
    adapter = adapter_for(model.config)
    weight = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    fold(adapter, model, 3, 1.1, "pre_gap")
    got = model.model.layers[0].mlp.down_proj.weight
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (weight.float() * 1.1).to(torch.bfloat16))


def test_magnitude_gap_matches_an_independent_numpy_computation():
    generator = torch.Generator().manual_seed(0)
    before = [torch.randn(3, 7, 5, generator=generator) for _ in range(2)]
    after = [x * 1.2 + 0.3 * torch.randn(x.shape, generator=generator) for x in before]
    b = torch.cat(before).numpy()
    a = torch.cat(after).numpy()
    ratios = [[abs(a[s, :, c]).mean() / abs(b[s, :, c]).mean() for c in range(b.shape[2])] for s in range(b.shape[0])]
    import numpy as np

    expected = float(np.mean(np.mean(np.array(ratios), axis=0)))
    assert magnitude_gap(before, after) == pytest.approx(expected, rel=1e-6)
