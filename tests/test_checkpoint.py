"""The saved checkpoint is a plain HF model: reloads with identical logits, generates with the KV
cache, and keeps per-layer config fields of the kept layers."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from prunecomp_export.adapters import adapter_for
from prunecomp_export.adapters.moe import sparse_layers
from prunecomp_export.engine.loop import make_plan, replay
from prunecomp_export.errors import ValidationFailed
from prunecomp_export.output.checkpoint import save_checkpoint, verify_reload
from prunecomp_export.recipe import PruneSpec
from tests.conftest import MOES, TIED, make_model, prune_streamed


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(128)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", eos_token="t2", pad_token="t0")


def prune_in_memory(model, batches, plan) -> None:
    """Run the streamed engine on ``model``'s saved files, then fold its trajectory into ``model``
    in memory with ``engine.replay`` (the independent, in-memory fold)."""
    with tempfile.TemporaryDirectory(prefix="prunecomp-test-src-") as source:
        trajectory = prune_streamed(model, batches, plan, Path(source))
    replay(model, adapter_for(model.config), trajectory.steps, trajectory.fold_form, trajectory.untie)


def pruned(arch: str, batches, drop: list[int], tied: bool = False, **kwargs):
    model = make_model(arch, tied=tied, **kwargs)
    adapter = adapter_for(model.config)
    plan = make_plan(PruneSpec(drop_layers=drop), 6, adapter.embeddings_tied(model))
    prune_in_memory(model, batches, plan)
    return model


@torch.no_grad()
def reload_check(model, directory, sample) -> dict:
    """``verify_reload`` against the in-memory pruned model's own logits."""
    expected = model(input_ids=sample, use_cache=False).logits.float()
    return verify_reload(
        directory, sample, expected, dtype=next(model.parameters()).dtype,
        attn_implementation=model.config._attn_implementation,
    )  # fmt: skip


def mlp_kinds(model) -> list[str]:
    return [type(layer.mlp).__name__ for layer in model.model.layers]


def attention_windows(model) -> list:
    return [getattr(layer.self_attn, "sliding_window", None) for layer in model.model.layers]


def test_reloaded_checkpoint_reproduces_logits_and_generates_with_cache(arch, batches, tmp_path):
    # sdpa for Gemma-2 too, so the independent check below (transformers' default attention) compares alike
    model = pruned(arch, batches, [1, 4], tied=arch in TIED, attn="sdpa")
    save_checkpoint(model, tiny_tokenizer(), tmp_path)
    result = reload_check(model, tmp_path, batches[0])
    assert result["reloaded_layers"] == 4
    assert result["max_abs_logit_diff"] < 1e-5
    assert result["generate_cache_equals_no_cache"]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")} == {0, 1, 2, 3}
    assert not list(tmp_path.glob("*.bin"))
    if arch in MOES:  # transformers 5 splits the fused experts back into the per-expert layout on save
        assert not [k for k in keys if k.endswith(("experts.down_proj", "experts.gate_up_proj"))]
        assert any(re.search(r"experts\.3\.(w2|down_proj)\.weight$", k) for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert mlp_kinds(reloaded) == mlp_kinds(model)
    # independent of verify_reload: incremental decoding with the cache equals a full forward, over a
    # sequence longer than the sliding windows (8), so sliding caches roll over
    ids = batches[0][:1, :20]
    with torch.no_grad():
        full = reloaded(input_ids=ids).logits[0, -3:]
        prefix = reloaded(input_ids=ids[:, :-3], use_cache=True)
        cache, steps = prefix.past_key_values, []
        for t in range(ids.shape[1] - 3, ids.shape[1]):
            out = reloaded(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits[0, -1])
    torch.testing.assert_close(torch.stack(steps), full, rtol=1e-4, atol=1e-4)


def test_the_reload_check_within_a_memory_plan_offloads_and_still_reproduces_the_logits(batches, tmp_path):
    """With the plan's max_memory below the model, accelerate keeps part of it in memory and offloads
    the rest to disk; the reloaded checkpoint computes the same logits."""
    model = pruned("llama", batches, [1, 4])
    save_checkpoint(model, tiny_tokenizer(), tmp_path / "ckpt")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    expected = model(input_ids=batches[0], use_cache=False).logits.float().detach()
    whole = verify_reload(tmp_path / "ckpt", batches[0], expected, dtype=torch.float32)
    assert whole["placement"] == {"cpu": 1}
    result = verify_reload(
        tmp_path / "ckpt", batches[0], expected, dtype=torch.float32,
        max_memory={"cpu": size // 3}, offload_folder=str(tmp_path / "offload"),
    )  # fmt: skip
    assert result["placement"].get("disk", 0) > 0 and result["placement"].get("cpu", 0) > 0
    assert result["max_abs_logit_diff"] < 1e-5 and result["generate_cache_equals_no_cache"]


def test_weight_keys_are_renumbered_and_attention_indices_follow(batches, tmp_path):
    model = pruned("llama", batches, [0, 3])
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    save_checkpoint(model, tiny_tokenizer(), tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        layer_ids = {int(k.split(".")[2]) for k in f.keys() if k.startswith("model.layers.")}  # noqa: SIM118
    assert layer_ids == {0, 1, 2, 3}
    assert not list(tmp_path.glob("*.bin"))


@pytest.mark.parametrize("drop", [[1, 4], [2, 5]])
def test_per_layer_config_fields_keep_the_kept_layers(arch, drop, batches, tmp_path):
    model = make_model(arch)
    kept = [i for i in range(6) if i not in drop]
    types = list(getattr(model.config, "layer_types", None) or [])
    windows, kinds = attention_windows(model), mlp_kinds(model)
    prune_in_memory(model, batches, make_plan(PruneSpec(drop_layers=drop), 6, False))
    save_checkpoint(model, tiny_tokenizer(), tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.num_hidden_layers == 4
    if types:
        assert list(config.layer_types) == [types[i] for i in kept]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert attention_windows(reloaded) == [windows[i] for i in kept]
    assert mlp_kinds(reloaded) == [kinds[i] for i in kept]
    if arch in {"qwen2_moe", "qwen3_moe"}:
        assert sparse_layers(config) == [kinds[i].endswith("SparseMoeBlock") for i in kept]
        assert config.decoder_sparse_step == 1
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in raw
    if "rope_theta" in raw.get("rope_parameters", {}):  # transformers 4.x reads the top-level field
        assert raw["rope_theta"] == raw["rope_parameters"]["rope_theta"]


def test_qwen2_max_window_layers_counts_kept_full_attention_layers(batches):
    model = make_model("qwen2")  # max_window_layers=3: layers 0,1,2 full, 3,4,5 sliding
    assert model.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    prune_in_memory(model, batches, make_plan(PruneSpec(drop_layers=[1, 4]), 6, False))
    assert model.config.max_window_layers == 2
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2


def test_untied_checkpoint_saves_its_own_lm_head(batches, tmp_path):
    model = make_model("llama", tied=True)
    plan = make_plan(PruneSpec(drop_layers=[2], tied_embedding="untie"), 6, True)
    prune_in_memory(model, batches, plan)
    save_checkpoint(model, tiny_tokenizer(), tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.tie_word_embeddings is False
    assert not torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)
    assert reload_check(model, tmp_path, batches[0])["max_abs_logit_diff"] < 1e-5


def test_verify_reload_fails_when_the_checkpoint_differs(batches, tmp_path):
    model = pruned("llama", batches, [2])
    save_checkpoint(model, tiny_tokenizer(), tmp_path)
    weight = model.model.layers[0].mlp.down_proj.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.mul_(1.5)
    with pytest.raises(ValidationFailed, match="differ"):
        reload_check(model, tmp_path, batches[0])
    with torch.no_grad():
        weight.copy_(saved)
    assert reload_check(model, tmp_path, batches[0])["max_abs_logit_diff"] < 1e-5  # and passes when it matches


def test_verify_reload_refuses_non_finite_logits(batches, tmp_path):
    model = pruned("llama", batches, [2])
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    save_checkpoint(model, tiny_tokenizer(), tmp_path)
    expected = torch.zeros(*batches[0].shape, model.config.vocab_size)
    with pytest.raises(ValidationFailed, match="non-finite"):
        verify_reload(tmp_path, batches[0], expected, dtype=torch.float32)
