"""The demo recipe on the real SmolLM2-135M: Prune&Comp must beat one-shot pruning without
compensation on held-out text, and the output must be a complete, loadable checkpoint."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_prunecomp_beats_one_shot_without_compensation(smollm2_demo_run):
    result = smollm2_demo_run
    assert result.layers_before == 30 and result.layers_after == 24
    final = [m for m in result.measurements if m.layers_removed in (0, 6)]
    ppl = {(m.variant, m.dataset): m.value for m in final if m.kind == "perplexity"}
    corpora = {dataset for _variant, dataset in ppl}
    assert corpora == {"gensim-wiki-heldout", "gensim-news"}
    for corpus in corpora:
        assert ppl["prunecomp", corpus] < ppl["baseline", corpus], (corpus, ppl)
        assert ppl["dense", corpus] < ppl["prunecomp", corpus], (corpus, ppl)
    for step in result.trajectory.steps[:-1]:  # a gap before the last layer gets an alpha, checked on held-back text
        assert step.paper_alpha not in (None, 1.0) and step.check is not None
        assert (step.alpha == 1.0) == (step.check.kept == "none")
        kept_loss = {"full": step.check.loss_full, "half": step.check.loss_half, "none": step.check.loss_none}
        assert kept_loss[step.check.kept] <= step.check.loss_none
    accuracy = {m.dataset for m in final if m.kind == "accuracy" and m.variant == "prunecomp"}
    assert accuracy == {"gensim_analogy", "gensim_sentiment"}
    for m in final:  # QA rows carry lm-eval's standard error, pruned ones their paired difference to dense
        if m.kind == "accuracy":
            assert m.details["stderr"] > 0 and len(m.details["correct"]) == m.details["n"] == 100
            assert m.variant == "dense" or m.details["difference_to_dense"]["ci95"] > 0
    # every evaluated pruned model carries its divergence from the dense model, on every corpus
    for variant in ("prunecomp", "baseline"):
        for k in (2, 4, 6):
            for kind in ("kl_divergence", "top1_agreement"):
                got = {
                    m.dataset
                    for m in result.measurements
                    if (m.variant, m.layers_removed, m.kind) == (variant, k, kind)
                }
                assert got == corpora, (variant, k, kind)
    # the report's curves: every variant at 2, 4 and 6 removed layers, on every corpus and task
    for variant in ("prunecomp", "baseline"):
        points = {(m.layers_removed, m.dataset) for m in result.measurements if m.variant == variant}
        assert points == {(k, d) for k in (2, 4, 6) for d in (*corpora, *accuracy)}, variant
    kl = {m.dataset: m.value for m in final if m.kind == "kl_divergence"}
    assert all(value > 0 for value in kl.values())
    assert result.signoff_passed


def test_checkpoint_is_plain_and_described_by_its_manifest(smollm2_demo_run, smollm2_pruned_dir):
    manifest = json.loads((smollm2_demo_run.output / "prunecomp_manifest.json").read_text())
    assert [r["removed"][0] for r in manifest["removed"]] == smollm2_demo_run.trajectory.removed
    assert manifest["verification"]["max_abs_logit_diff"] < 1e-4
    assert manifest["verification"]["generate_cache_equals_no_cache"]
    assert (smollm2_demo_run.output / "recipe.resolved.yaml").is_file()
    config = json.loads((smollm2_pruned_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 24 and "quantization_config" not in config
    assert not list(smollm2_pruned_dir.glob("*.bin")) and not list(smollm2_pruned_dir.glob("*.gguf"))


def test_pruned_model_still_speaks(smollm2_pruned_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_pruned_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_pruned_dir).eval()
    assert tokenizer.chat_template, "the chat template travels with the tokenizer"
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert text.strip(), "the pruned model generates text"
