"""Tiny random models built from configs, one per supported architecture (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    # A tiny epsilon so "exact up to the RMSNorm epsilon" is exact to fp32 precision here.
    rms_norm_eps=1e-12,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def make_config(arch: str, tied: bool = False):
    if arch == "llama":
        return LlamaConfig(**COMMON, tie_word_embeddings=tied)
    if arch == "mistral":
        return MistralConfig(**COMMON, tie_word_embeddings=tied, sliding_window=16)
    if arch == "qwen2":
        # q/k/v biases, and sliding-window attention on layers >= max_window_layers
        return Qwen2Config(
            **COMMON, tie_word_embeddings=tied, use_sliding_window=True, sliding_window=8, max_window_layers=3
        )
    if arch == "qwen3":
        return Qwen3Config(
            **COMMON,
            head_dim=16,
            tie_word_embeddings=tied,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=4,
        )
    raise ValueError(arch)


def make_model(arch: str, tied: bool = False, seed: int = 0):
    """A random model whose residual writes are large enough that pruning changes its output."""
    torch.manual_seed(seed)
    config = make_config(arch, tied)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
            elif param.dim() == 2:
                param.normal_(0, 0.08)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
        if tied:
            model.tie_weights()
    return model


ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return list(torch.randint(3, 128, (4, 24), generator=generator).split(2))
