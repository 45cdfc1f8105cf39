"""Phi-3, Gemma-2, Gemma-3 text and the MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE) get the tests the
Llama family has: the fold equals explicit scaling of the stream at the gap, the saved checkpoint
reloads with the same logits and decodes with the KV cache, and per-layer config fields survive; plus
what is particular to each (Gemma's 1+w gains and layer-type pattern, MoE experts and dense layers)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3Config,
    Gemma3TextConfig,
    LlamaConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from prunecomp_export.adapters import adapter_for, supported_model_types
from prunecomp_export.adapters.gemma import norm_gain_offset, sliding_window_period
from prunecomp_export.adapters.moe import sparse_layers
from prunecomp_export.checkpoint import save_checkpoint, verify_reload
from prunecomp_export.compensation import fold
from prunecomp_export.engine import Trajectory, _one_round, make_plan, prune
from prunecomp_export.errors import ModelError
from prunecomp_export.recipe import PruneSpec
from prunecomp_export.streams import ResidualStreams
from prunecomp_export.surgery import delete_layers
from tests.conftest import COMMON
from tests.test_checkpoint import tiny_tokenizer
from tests.test_fold import ALPHA, explicit_scaling_logits, folded_logits

FAMILIES = ["phi3", "gemma2", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe"]
GEMMAS = {"gemma2", "gemma3_text"}
MOES = {"mixtral", "qwen2_moe", "qwen3_moe"}


def family_config(arch: str, tied: bool = False, eps: float = 1e-12):
    common = {**COMMON, "rms_norm_eps": eps, "tie_word_embeddings": tied}
    if arch == "phi3":
        return Phi3Config(**common, sliding_window=8)
    if arch == "gemma2":
        # strong softcaps so a wrong fold could not hide in the tanh's linear range
        return Gemma2Config(
            **common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
            final_logit_softcapping=2.0, attn_logit_softcapping=5.0,
        )  # fmt: skip
    if arch == "gemma3_text":
        # every 3rd layer global: sliding, sliding, full, sliding, sliding, full
        return Gemma3TextConfig(
            **common, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=3,
            final_logit_softcapping=2.0,
        )  # fmt: skip
    moe = {"num_experts_per_tok": 2}
    if arch == "mixtral":
        return MixtralConfig(**common, **moe, num_local_experts=4, sliding_window=16)
    if arch == "qwen3_moe":
        # sparse on odd layers (decoder_sparse_step 2) except layer 5: dense 0 2 4 5, sparse 1 3
        return Qwen3MoeConfig(
            **common, **moe, head_dim=16, num_experts=4, moe_intermediate_size=32, decoder_sparse_step=2,
            mlp_only_layers=[5], norm_topk_prob=True,
        )  # fmt: skip
    if arch == "qwen2_moe":
        # a shared expert; dense layers 0 and 3; sliding attention on even layers below 4
        return Qwen2MoeConfig(
            **common, **moe, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            mlp_only_layers=[0, 3], use_sliding_window=True, sliding_window=8, max_window_layers=4,
        )  # fmt: skip
    raise ValueError(arch)


def family_model(arch: str, tied: bool = False, seed: int = 0, eps: float = 1e-12, attn: str | None = None):
    """A random model whose writes are large enough that pruning changes its output (as conftest's).
    Gemma-2 runs eager attention by default here: sdpa silently ignores its attention softcap."""
    torch.manual_seed(seed)
    config = family_config(arch, tied, eps)
    config._attn_implementation = attn or ("eager" if arch == "gemma2" else "sdpa")
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
            elif "norm" in name:
                # Gemma stores the gain as 1 + w: gains 0.5..1.5 either way
                param.uniform_(-0.5, 0.5) if arch in GEMMAS else param.uniform_(0.5, 1.5)
            elif param.dim() >= 2:
                param.normal_(0, 0.08)
        if tied:
            model.tie_weights()
    return model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one intra-op thread, and far faster when other jobs load the cores
    (MoE expert kernels slowed 40x with two contended threads); restored for the other test files."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def mlp_kinds(model) -> list[str]:
    return [type(layer.mlp).__name__ for layer in model.model.layers]


def attention_windows(model) -> list:
    return [getattr(layer.self_attn, "sliding_window", None) for layer in model.model.layers]


def test_every_family_is_registered():
    assert set(FAMILIES) <= set(supported_model_types())
    for arch in FAMILIES:
        assert adapter_for(family_config(arch)).model_type == arch


# -- the fold equals explicit scaling of the stream at the gap ---------------------------------------


@pytest.mark.parametrize("form", ["pre_gap", "post_gap"])
@pytest.mark.parametrize("gap_layer", [0, 2, 4])
def test_fold_equals_explicit_stream_scaling_untied(family, form, gap_layer, batches):
    model = family_model(family)
    ids = batches[0]
    expected = explicit_scaling_logits(model, gap_layer, ALPHA, ids)
    got = folded_logits(model, gap_layer, ALPHA, form, ids)
    unscaled = explicit_scaling_logits(model, gap_layer, 1.0, ids)
    assert (expected - unscaled).abs().max() > 1e-2, "the test model must be sensitive to the scale"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gap_layer", [0, 3])
def test_post_gap_fold_is_exact_on_tied_embeddings(family, gap_layer, batches):
    model = family_model(family, tied=True)
    adapter = adapter_for(model.config)
    assert adapter.embeddings_tied(model)
    ids = batches[0]
    expected = explicit_scaling_logits(model, gap_layer, ALPHA, ids)
    torch.testing.assert_close(folded_logits(model, gap_layer, ALPHA, "post_gap", ids), expected, rtol=1e-4, atol=1e-4)


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
    model = family_model(family)
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


def pruned(arch: str, batches, drop: list[int], tied: bool = False, **kwargs):
    model = family_model(arch, tied=tied, **kwargs)
    adapter = adapter_for(model.config)
    plan = make_plan(PruneSpec(drop_layers=drop), 6, adapter.embeddings_tied(model))
    prune(model, adapter, batches, plan, "iterative")
    return model


def test_reloaded_checkpoint_reproduces_logits_and_generates_with_cache(family, batches, tmp_path):
    # sdpa for Gemma-2 too: verify_reload reloads with transformers' default attention (sdpa)
    model = pruned(family, batches, [1, 4], tied=family in GEMMAS, attn="sdpa")
    save_checkpoint(model, tiny_tokenizer(), tmp_path)
    result = verify_reload(model, tmp_path, batches[0])
    assert result["reloaded_layers"] == 4
    assert result["max_abs_logit_diff"] < 1e-5
    assert result["generate_cache_equals_no_cache"]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")} == {0, 1, 2, 3}
    if family in MOES:  # transformers 5 splits the fused experts back into the per-expert layout on save
        assert not [k for k in keys if k.endswith(("experts.down_proj", "experts.gate_up_proj"))]
        assert any(re.search(r"experts\.3\.(w2|down_proj)\.weight$", k) for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert mlp_kinds(reloaded) == mlp_kinds(model)
    ids = batches[0][:1, :20]  # longer than the sliding windows (8), so sliding caches roll over
    with torch.no_grad():
        full = reloaded(input_ids=ids).logits[0, -3:]
        prefix = reloaded(input_ids=ids[:, :-3], use_cache=True)
        cache, steps = prefix.past_key_values, []
        for t in range(ids.shape[1] - 3, ids.shape[1]):
            out = reloaded(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(steps), full, rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("drop", [[1, 4], [2, 5]])
def test_per_layer_config_fields_keep_the_kept_layers(family, drop, batches, tmp_path):
    model = family_model(family)
    kept = [i for i in range(6) if i not in drop]
    types = list(getattr(model.config, "layer_types", None) or [])
    windows, kinds = attention_windows(model), mlp_kinds(model)
    prune(model, adapter_for(model.config), batches, make_plan(PruneSpec(drop_layers=drop), 6, False), "iterative")
    save_checkpoint(model, tiny_tokenizer(), tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.num_hidden_layers == 4
    if types:
        assert list(config.layer_types) == [types[i] for i in kept]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert attention_windows(reloaded) == [windows[i] for i in kept]
    assert mlp_kinds(reloaded) == [kinds[i] for i in kept]
    if family in {"qwen2_moe", "qwen3_moe"}:
        assert sparse_layers(config) == [kinds[i].endswith("SparseMoeBlock") for i in kept]
        assert config.decoder_sparse_step == 1


# -- Gemma ---------------------------------------------------------------------------------------------


def test_gemma_gain_is_scaled_as_one_plus_w_in_fp32_and_stored_in_model_dtype():
    model = family_model("gemma3_text").to(torch.bfloat16)
    norm = model.model.layers[0].post_feedforward_layernorm
    assert norm_gain_offset(norm) == 1.0
    weight = norm.weight.detach().clone()
    fold(adapter_for(model.config), model, 3, 1.1, "pre_gap")
    assert norm.weight.dtype == torch.bfloat16
    assert torch.equal(norm.weight, ((weight.float() + 1.0) * 1.1 - 1.0).to(torch.bfloat16))


def test_norm_gain_offset_tells_gemma_norms_from_llama_norms():
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**{**COMMON, "num_hidden_layers": 1}))
    assert norm_gain_offset(llama.model.layers[0].post_attention_layernorm) == 0.0
    gemma = family_model("gemma2", eps=1e-6)
    assert norm_gain_offset(gemma.model.layers[0].post_attention_layernorm) == 1.0


@pytest.mark.parametrize("arch", sorted(GEMMAS))
def test_gemma_fold_with_the_real_epsilon(arch, batches):
    """With Gemma's eps 1e-6 instead of the tests' 1e-12 the fold is exact only up to the epsilon: the
    measured relative logit difference stays far below bf16 resolution (about 1e-6 here)."""
    ids = batches[0]
    for form in ("pre_gap", "post_gap"):
        model = family_model(arch, eps=1e-6)
        expected = explicit_scaling_logits(model, 2, ALPHA, ids)
        got = folded_logits(model, 2, ALPHA, form, ids)
        relative = ((got - expected).abs().max() / expected.abs().max()).item()
        assert relative < 1e-5, (form, relative)


def test_gemma3_layer_types_and_sliding_window_pattern_after_pruning(batches, tmp_path):
    model = family_model("gemma3_text")
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
    config = family_config("qwen3_moe")
    assert sparse_layers(config) == [False, True, False, True, False, False]
    adapter = adapter_for(config)
    adapter.prune_config(config, [0, 1, 3, 5])
    assert config.mlp_only_layers == [0, 3]
    assert config.decoder_sparse_step == 1
    assert sparse_layers(config) == [False, True, True, False]
    # a list of indices as long as the layer count is still remapped, not filtered by position
    config = family_config("qwen3_moe")
    config.mlp_only_layers = [0, 1, 2, 3, 4, 5]
    adapter.prune_config(config, [1, 2, 4, 5])
    assert config.mlp_only_layers == [0, 1, 2, 3]


def test_moe_fold_scales_every_expert_and_the_shared_expert_not_the_router():
    model = family_model("qwen2_moe")
    mlp = model.model.layers[1].mlp
    experts, shared = mlp.experts.down_proj.detach().clone(), mlp.shared_expert.down_proj.weight.detach().clone()
    router, gate = mlp.gate.weight.detach().clone(), mlp.shared_expert_gate.weight.detach().clone()
    adapter_for(model.config).scale_residual_writes(model.model.layers[1], 0.5)
    assert experts.dim() == 3  # transformers 5 stores the experts fused
    torch.testing.assert_close(mlp.experts.down_proj.detach(), experts * 0.5)
    torch.testing.assert_close(mlp.shared_expert.down_proj.weight.detach(), shared * 0.5)
    assert torch.equal(mlp.gate.weight, router) and torch.equal(mlp.shared_expert_gate.weight, gate)


def test_cached_streams_after_pruning_equal_a_fresh_forward(family, batches):
    """The engine's cached per-layer kwargs (masks and, for Gemma-3, per-type rotary embeddings) must
    stay attached to the right layers through the rounds."""
    model = family_model(family)
    adapter = adapter_for(model.config)
    plan = make_plan(PruneSpec(num_drop=3, fold="pre_gap"), 6, False)
    streams = ResidualStreams(model, adapter, batches)
    streams.capture()
    trajectory = Trajectory("block_influence", "iterative", plan.fold_form, False, streams.lm_loss())
    original = list(range(6))
    for number in range(3):
        _one_round(streams, plan, original, trajectory, number)
    fresh = ResidualStreams(model, adapter, batches)
    fresh.capture()
    for cached_states, fresh_states in zip(streams.states, fresh.states, strict=True):
        for cached, recomputed in zip(cached_states, fresh_states, strict=True):
            torch.testing.assert_close(cached, recomputed, rtol=1e-4, atol=1e-5)
    assert trajectory.rounds[-1].calibration_loss == pytest.approx(fresh.lm_loss(), rel=1e-5)


def test_replay_rebuilds_the_same_model(family, batches):
    from prunecomp_export.engine import replay

    dense = family_model(family, tied=family in GEMMAS)
    model = copy.deepcopy(dense)
    adapter = adapter_for(model.config)
    trajectory = prune(model, adapter, batches, make_plan(PruneSpec(num_drop=2), 6, family in GEMMAS), "iterative")
    rebuilt = copy.deepcopy(dense)
    replay(rebuilt, adapter, trajectory.steps, trajectory.fold_form, trajectory.untie)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids=batches[0]).logits, model(input_ids=batches[0]).logits)
