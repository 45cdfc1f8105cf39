"""What is particular to Phi-3, Gemma-2, Gemma-3 text and the MoE families (Mixtral, Qwen2-MoE,
Qwen3-MoE): which weights the fold writes, Gemma's 1+w gains and layer-type pattern, MoE experts and
dense layers. The tests every architecture shares (fold vs explicit stream scaling, cached streams,
checkpoint reload, per-layer config) run over these families too, through conftest's ``arch``."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3Config,
    LlamaConfig,
)

from prunecomp_export.adapters import adapter_for, supported_model_types
from prunecomp_export.adapters.gemma import norm_gain_offset, sliding_window_period
from prunecomp_export.adapters.moe import sparse_layers
from prunecomp_export.engine.compensation import fold
from prunecomp_export.engine.surgery import delete_layers
from prunecomp_export.errors import ModelError
from prunecomp_export.output.checkpoint import save_checkpoint
from tests.conftest import COMMON, FAMILIES, GEMMAS, make_config, make_model
from tests.test_checkpoint import pruned, tiny_tokenizer
from tests.test_fold import ALPHA, explicit_scaling_logits, folded_logits


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def test_every_family_is_registered():
    assert set(FAMILIES) <= set(supported_model_types())
    for arch in FAMILIES:
        assert adapter_for(make_config(arch)).model_type == arch


# -- the fold changes exactly the residual writers ----------------------------------------------------


WRITERS = {
    "phi3": [r"self_attn\.o_proj\.weight", r"mlp\.down_proj\.weight"],
    "gemma2": [r"post_attention_layernorm\.weight", r"post_feedforward_layernorm\.weight"],
    "gemma3_text": [r"post_attention_layernorm\.weight", r"post_feedforward_layernorm\.weight"],
    "mixtral": [r"self_attn\.o_proj\.weight", r"mlp\.experts\.down_proj"],
    "qwen3_moe": [r"self_attn\.o_proj\.weight", r"mlp\.experts\.down_proj", r"mlp\.down_proj\.weight"],
    "qwen2_moe": [
        r"self_attn\.o_proj\.weight",
        r"mlp\.experts\.down_proj",
        r"mlp\.shared_expert\.down_proj\.weight",
        r"mlp\.down_proj\.weight",
    ],
}


def test_pre_gap_fold_changes_exactly_the_residual_writers_before_the_gap(family):
    """Readers (fused qkv_proj/gate_up_proj, routers, shared-expert gates, input norms) stay as they were;
    every writer of every layer before the gap changes, and only by the factor."""
    model = make_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold(adapter_for(model.config), model, 3, 2.0, "pre_gap")
    writer = re.compile(r"model\.layers\.([0-2])\.(" + "|".join(WRITERS[family]) + r")$")
    expected = {k for k in before if writer.match(k)} | {"model.embed_tokens.weight"}
    if not model.config.tie_word_embeddings:
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == expected
    for key in expected - {"model.embed_tokens.weight"}:
        got = model.state_dict()[key].float()
        if family in GEMMAS:  # the gain 1 + w doubles
            torch.testing.assert_close(got + 1, 2 * (before[key].float() + 1))
        else:
            torch.testing.assert_close(got, 2 * before[key].float())


# -- the saved checkpoint ----------------------------------------------------------------------------


def test_gemma2_eager_checkpoint_reloads_with_eager_attention(batches, tmp_path):
    """With the attention softcap active (eager), the reloaded model must be run eager too: transformers'
    sdpa path ignores ``attn_logit_softcapping``."""
    model = pruned("gemma2", batches, [2], tied=True)
    save_checkpoint(model, tiny_tokenizer(), tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = model(input_ids=batches[0]).logits
        torch.testing.assert_close(reloaded(input_ids=batches[0]).logits, expected, rtol=1e-5, atol=1e-5)
        sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
        assert (sdpa(input_ids=batches[0]).logits - expected).abs().max() > 1e-3  # the softcap matters here


# -- Gemma ---------------------------------------------------------------------------------------------


def test_gemma_gain_is_scaled_as_one_plus_w_in_fp32_and_stored_in_model_dtype():
    model = make_model("gemma3_text").to(torch.bfloat16)
    norm = model.model.layers[0].post_feedforward_layernorm
    assert norm_gain_offset(norm) == 1.0
    weight = norm.weight.detach().clone()
    fold(adapter_for(model.config), model, 3, 1.1, "pre_gap")
    assert norm.weight.dtype == torch.bfloat16
    assert torch.equal(norm.weight, ((weight.float() + 1.0) * 1.1 - 1.0).to(torch.bfloat16))


def test_norm_gain_offset_tells_gemma_norms_from_llama_norms():
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "num_hidden_layers": 1}))
    assert norm_gain_offset(llama.model.layers[0].post_attention_layernorm) == 0.0
    gemma = make_model("gemma2", eps=1e-6)
    assert norm_gain_offset(gemma.model.layers[0].post_attention_layernorm) == 1.0


@pytest.mark.parametrize("arch", sorted(GEMMAS))
def test_gemma_fold_with_the_real_epsilon(arch, batches):
    """With Gemma's eps 1e-6 instead of the tests' 1e-12 the fold is exact only up to the epsilon: the
    measured relative logit difference stays far below bf16 resolution (about 1e-6 here)."""
    ids = batches[0]
    for form in ("pre_gap", "post_gap"):
        model = make_model(arch, eps=1e-6)
        expected = explicit_scaling_logits(model, 2, ALPHA, ids)
        got = folded_logits(model, 2, ALPHA, form, ids)
        relative = ((got - expected).abs().max() / expected.abs().max()).item()
        assert relative < 1e-5, (form, relative)


def test_gemma3_layer_types_and_sliding_window_pattern_after_pruning(batches, tmp_path):
    model = make_model("gemma3_text")
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    adapter = adapter_for(model.config)
    delete_layers(adapter, model, 1)  # kept 0 2 3 4 5: S F S S F -> no period
    assert "sliding_window_pattern" not in vars(model.config)
    assert "_sliding_window_pattern" not in vars(model.config)
    delete_layers(adapter, model, 3)  # kept 0 2 3 5: S F S F -> period 2
    assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
    assert model.config.sliding_window_pattern == 2
    save_checkpoint(model, tiny_tokenizer(), tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    p = raw["sliding_window_pattern"]
    assert raw.get("_sliding_window_pattern", p) == p
    # a reader that only knows the BC integer derives the same layer types
    assert ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(4)] == raw["layer_types"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert [layer.self_attn.is_sliding for layer in reloaded.model.layers] == [True, False, True, False]
    assert set(reloaded.model.rotary_emb.layer_types) == {"sliding_attention", "full_attention"}


def test_sliding_window_period():
    s, f = "sliding_attention", "full_attention"
    assert sliding_window_period([s, s, f, s, s, f], preferred=3) == 3
    assert sliding_window_period([s, s, s, s, s, f], preferred=6) == 6
    assert sliding_window_period([s, s, s, s]) == 5  # no global layer left: (i + 1) % 5 != 0 for i < 4
    assert sliding_window_period([f, f]) == 1
    assert sliding_window_period([s, f, s, s, f]) is None


def test_gemma3_multimodal_wrapper_is_refused_with_a_reason():
    with pytest.raises(ModelError, match=r"unsupported architecture 'gemma3'.*gemma3_text"):
        adapter_for(Gemma3Config())


# -- MoE -------------------------------------------------------------------------------------------


def test_qwen_moe_prune_config_remaps_dense_layer_indices():
    """mlp_only_layers holds indices: they follow the kept layers' new positions; decoder_sparse_step
    (here 2) cannot describe the kept layers, so every kept dense layer is listed and the step is 1."""
    config = make_config("qwen3_moe")
    assert sparse_layers(config) == [False, True, False, True, False, False]
    adapter = adapter_for(config)
    adapter.prune_config(config, [0, 1, 3, 5])
    assert config.mlp_only_layers == [0, 3]
    assert config.decoder_sparse_step == 1
    assert sparse_layers(config) == [False, True, True, False]
    # a list of indices as long as the layer count is still remapped, not filtered by position
    config = make_config("qwen3_moe")
    config.mlp_only_layers = [0, 1, 2, 3, 4, 5]
    adapter.prune_config(config, [1, 2, 4, 5])
    assert config.mlp_only_layers == [0, 1, 2, 3]


def test_moe_fold_scales_every_expert_and_the_shared_expert_not_the_router():
    model = make_model("qwen2_moe")
    mlp = model.model.layers[1].mlp
    experts, shared = mlp.experts.down_proj.detach().clone(), mlp.shared_expert.down_proj.weight.detach().clone()
    router, gate = mlp.gate.weight.detach().clone(), mlp.shared_expert_gate.weight.detach().clone()
    adapter_for(model.config).scale_residual_writes(model.model.layers[1], 0.5)
    assert experts.dim() == 3  # transformers 5 stores the experts fused
    torch.testing.assert_close(mlp.experts.down_proj.detach(), experts * 0.5)
    torch.testing.assert_close(mlp.shared_expert.down_proj.weight.detach(), shared * 0.5)
    assert torch.equal(mlp.gate.weight, router) and torch.equal(mlp.shared_expert_gate.weight, gate)
