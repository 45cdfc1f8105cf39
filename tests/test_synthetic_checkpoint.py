"""The synthetic checkpoint generator writes what transformers writes, and what it writes loads and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import synthetic_checkpoints

synth = synthetic_checkpoints()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synth.write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", "bfloat16", shards=2, seed=0)


def test_tiny_checkpoint_loads_and_its_index_covers_the_state_dict(tiny):
    model, info = AutoModelForCausalLM.from_pretrained(tiny, output_loading_info=True)
    assert model.config.num_hidden_layers == 4 and not model.config.tie_word_embeddings
    assert not info["missing_keys"] and not info["unexpected_keys"]
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    shards = sorted(p.name for p in tiny.glob("model-*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["weight_map"]["model.embed_tokens.weight"] == shards[0]
    assert index["weight_map"]["model.layers.1.mlp.down_proj.weight"] == shards[0]
    assert index["weight_map"]["model.layers.2.mlp.down_proj.weight"] == shards[1]
    assert index["weight_map"]["model.norm.weight"] == index["weight_map"]["lm_head.weight"] == shards[1]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())

    # each tensor reproducible on its own from seed + its index; norm gains not trivially 1
    spec = next(s for s in synth.tensor_specs(synth.PRESETS["tiny"]) if s.name == "model.layers.3.mlp.up_proj.weight")
    assert torch.equal(model.state_dict()[spec.name], synth.make_tensor(spec, torch.bfloat16, 0))
    gains = model.state_dict()["model.layers.0.input_layernorm.weight"].float()
    assert 0.8 <= gains.min() < gains.max() <= 1.2


def test_tiny_tokenizer_round_trips_and_generation_runs(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert len(tokenizer) <= 1000
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    text = "The Prime Minister said on Tuesday: fires near Sydney, 42 homes lost. Café?"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text

    model = AutoModelForCausalLM.from_pretrained(tiny)
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.isfinite(logits.float()).all()
    assert out.shape[1] == inputs.input_ids.shape[1] + 5


def test_streaming_writer_matches_safetensors_save_file_byte_for_byte(tiny, tmp_path):
    reference = synth.write_synthetic_checkpoint(tmp_path, "tiny", "bfloat16", shards=2, seed=0, writer="save_file")
    for shard in sorted(tiny.glob("model-*.safetensors")):
        assert shard.read_bytes() == (reference / shard.name).read_bytes()
        with safe_open(shard, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_shard_layout_splits_layers_evenly():
    specs = synth.tensor_specs(synth.PRESETS["tinyllama-1.1b"])
    layout = synth.shard_layout(specs, 22, 4)
    layers = [
        sorted({int(s.name.split(".")[2]) for s in shard if s.name.startswith("model.layers.")}) for shard in layout
    ]
    assert sorted(len(x) for x in layers) == [5, 5, 6, 6]
    assert [layer for shard in layers for layer in shard] == list(range(22))  # contiguous, in order
    assert sum(s.numel for s in specs) == 1_100_048_384  # TinyLlama-1.1B's parameter count
    with pytest.raises(ValueError):
        synth.shard_layout(specs, 22, 23)
