"""Dense-relative quality (KL(dense || model) per token, its percentiles, top-1 agreement), computed
layer by layer from the source files with the head run over chunks of positions, against an
independent computation: Hugging Face forwards of the dense and the pruned model (folded in memory
with ``engine.replay``) and ``torch.nn.functional.kl_div`` on their full logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from prunecomp_export.adapters import adapter_for
from prunecomp_export.engine.loop import make_plan, replay
from prunecomp_export.engine.streams import Divergence, token_divergence
from prunecomp_export.recipe import PruneSpec
from tests.conftest import make_model, prune_streamed, variants_of
from tests.test_perplexity import windows_for_test


@torch.no_grad()
def full_logit_divergence(dense, model, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per next-token position of every window: KL(dense || model) from the whole logits at once, and
    whether the two argmax tokens agree."""
    dense_logits = dense(input_ids=windows).logits[:, :-1].float()
    logits = model(input_ids=windows).logits[:, :-1].float()
    log_p, log_q = dense_logits.log_softmax(-1), logits.log_softmax(-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return kl.flatten(), (dense_logits.argmax(-1) == logits.argmax(-1)).flatten()


def test_the_dense_model_against_itself_is_zero_and_full_agreement(tmp_path):
    dense = make_model("llama")
    variants = variants_of(dense, tmp_path, make_plan(PruneSpec(num_drop=1), 6, False))
    windows = windows_for_test()
    reference = variants.window_figures(variants.dense, windows, 2)
    figures = variants.window_figures(variants.dense, windows, 2, reference.finals)
    assert figures.divergence == Divergence(0.0, 0.0, 0.0, 1.0, windows[:, 1:].numel())
    assert figures.perplexity == reference.perplexity


@pytest.mark.parametrize(("tied", "tied_embedding"), [(False, "post_gap"), (True, "scale_tied"), (True, "untie")])
def test_divergence_of_a_pruned_variant_equals_kl_div_on_full_logits(tied, tied_embedding, batches, tmp_path):
    """scale_tied: the pruned variant's tied head is scaled, so the dense head is a second one."""
    dense = make_model("llama", tied=tied)
    # gaps inside the model, every alpha folded (no held-back check that could drop one)
    spec = PruneSpec(drop_layers=[2, 3], fold="pre_gap", tied_embedding=tied_embedding, judge_batches=0)
    plan = make_plan(spec, 6, tied)
    trajectory = prune_streamed(dense, batches, plan, tmp_path / "run")
    pruned = copy.deepcopy(dense)
    replay(pruned, adapter_for(pruned.config), trajectory.steps, trajectory.fold_form, trajectory.untie)
    windows = windows_for_test()
    kl, agree = full_logit_divergence(dense, pruned, windows)
    assert kl.mean() > 1e-3 and not agree.all(), "pruning must move the distributions"

    variants = variants_of(dense, tmp_path / "src", plan)
    variant = variants.prunecomp(trajectory, 2)
    if tied_embedding == "scale_tied":
        assert variant.embedding_scale != 1.0
    reference = variants.window_figures(variants.dense, windows, 2).finals
    got = variants.window_figures(variant, windows, 2, reference).divergence
    assert got.tokens == kl.numel()
    assert got.mean_kl == pytest.approx(kl.mean().item(), rel=1e-4, abs=1e-7)
    p90, p99 = torch.quantile(kl.double(), torch.tensor([0.9, 0.99], dtype=torch.float64)).tolist()
    assert got.p90_kl == pytest.approx(p90, rel=1e-4, abs=1e-7)
    assert got.p99_kl == pytest.approx(p99, rel=1e-4, abs=1e-7)
    assert got.top1_agreement == pytest.approx(agree.double().mean().item())


def test_chunks_of_positions_give_the_same_tokens_as_one_chunk():
    generator = torch.Generator().manual_seed(0)
    head = torch.randn(16, 50, generator=generator)
    dense_hidden, hidden = torch.randn(2, 3, 11, 16, generator=generator).unbind(0)

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        return h @ head

    whole = token_divergence(logits_of, logits_of, dense_hidden, hidden, chunk=10**6)
    for chunk in (1, 7, 20):
        kl, agree = token_divergence(logits_of, logits_of, dense_hidden, hidden, chunk=chunk)
        torch.testing.assert_close(kl, whole[0])
        assert torch.equal(agree, whole[1])
    assert whole[0].shape == (3 * 10,)  # the last position of each row has no next token


def test_a_corpus_of_chunks_does_not_grow_the_process_by_more_than_a_few_chunks():
    """Each step makes a few tensors of the head's output for half a chunk and frees them; the process
    must stay within a few such tensors of where it started, however many steps there were. Keeping a
    small result tensor alive between two steps' allocations made glibc's heap grow by about a step
    per step: 1.1 GB in a run of the 151k-vocabulary test, in about a third of fresh processes on one
    corpus, in every process over the six chunk sizes below (0.4-0.6 GB on 512 tokens here; 47 MB at most without it).
    Run in a fresh interpreter, whose heap is not this test session's."""
    import subprocess
    import sys

    code = """
import psutil, torch
from prunecomp_export.engine.streams import token_divergence
head = torch.randn(151936, 16) * 0.05
dense = torch.randn(2, 257, 16)
pruned = dense + 0.1 * torch.randn_like(dense)
before, grown = psutil.Process().memory_info().rss, 0
for chunk in range(20, 32, 2):
    token_divergence(lambda h: h @ head.T, lambda h: h @ head.T, dense, pruned, chunk)
    grown = max(grown, psutil.Process().memory_info().rss - before)
print(grown)
"""
    grown = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    largest_step = 15 * 151936 * 4  # log-probabilities of half of the largest chunk (30 tokens), fp32
    assert grown < 16 * largest_step, f"grew {grown / 2**20:.0f} MB; one step's tensor is {largest_step / 2**20:.1f} MB"
