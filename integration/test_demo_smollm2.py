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
    alphas = [r.step.alpha for r in result.trajectory.rounds]
    assert all(a != 1.0 for a in alphas[:-1] if a)  # a gap before the last layer always gets an alpha
    accuracy = {m.dataset for m in final if m.kind == "accuracy" and m.variant == "prunecomp"}
    assert accuracy == {"gensim_analogy", "gensim_sentiment"}
    # the report's curves: every variant at 2, 4 and 6 removed layers, on every corpus and task
    for variant in ("prunecomp", "baseline"):
        points = {(m.layers_removed, m.dataset) for m in result.measurements if m.variant == variant}
        assert points == {(k, d) for k in (2, 4, 6) for d in (*corpora, *accuracy)}, variant
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
