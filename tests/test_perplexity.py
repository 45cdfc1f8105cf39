"""Token perplexity, computed layer by layer from the source files (``ModelVariants.perplexity``),
against an independent computation: a plain per-token loop over a Hugging Face forward."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from prunecomp_export.adapters import adapter_for
from prunecomp_export.engine.loop import make_plan, replay
from prunecomp_export.recipe import PruneSpec
from tests.conftest import TIED, make_model, prune_streamed, variants_of


def plain_perplexity(model, windows: torch.Tensor) -> float:
    """exp of the mean next-token NLL, one window and one token at a time."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0]
            for t in range(window.numel() - 1):
                nll += F.cross_entropy(logits[t], window[t + 1]).item()
                count += 1
    return math.exp(nll / count)


def windows_for_test() -> torch.Tensor:
    return torch.randint(3, 128, (5, 20), generator=torch.Generator().manual_seed(0))


def test_perplexity_matches_a_plain_loop_over_windows(tmp_path):
    model = make_model("llama")
    windows = windows_for_test()
    expected = plain_perplexity(model, windows)
    plan = make_plan(PruneSpec(num_drop=1), 6, False)
    variants = variants_of(model, tmp_path, plan)
    # batch sizes that do and do not divide the number of windows
    for batch_size in (1, 2, 5):
        got = variants.perplexity(variants.dense, windows, batch_size)
        assert abs(got - expected) / expected < 1e-5, (batch_size, got, expected)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3_moe"])
@pytest.mark.parametrize("fold", ["pre_gap", "post_gap"])
def test_pruned_variant_perplexity_matches_the_replayed_model(arch, fold, batches, tmp_path):
    """A pruned variant's perplexity (layers left out, factors applied as tensors are read) equals the
    plain loop over the same steps folded into an in-memory model with ``engine.replay``."""
    tied = arch in TIED
    dense = make_model(arch, tied=tied)
    spec = PruneSpec(num_drop=2, fold=fold, tied_embedding="untie" if fold == "pre_gap" else "post_gap")
    plan = make_plan(spec, 6, adapter_for(dense.config).embeddings_tied(dense))
    trajectory = prune_streamed(dense, batches, plan, tmp_path / "run")
    rebuilt = copy.deepcopy(dense)
    replay(rebuilt, adapter_for(rebuilt.config), trajectory.steps, trajectory.fold_form, trajectory.untie)
    windows = windows_for_test()
    expected = plain_perplexity(rebuilt, windows)
    assert abs(expected - plain_perplexity(dense, windows)) / expected > 1e-3, "pruning must change the perplexity"
    variants = variants_of(dense, tmp_path / "src", plan)
    variant = variants.prunecomp(trajectory, 2)
    assert variant is not None and variant.removed == sorted(trajectory.removed)
    for batch_size in (2, 5):
        got = variants.perplexity(variant, windows, batch_size)
        assert abs(got - expected) / expected < 1e-5, (batch_size, got, expected)
