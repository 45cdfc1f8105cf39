"""Tiny random models built from configs, one per supported architecture (no downloads); the shared
tests (fold, cached streams, checkpoint) run over all of them through the ``arch`` fixture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=1024,  # above the recipe default seq_len (512), which a longer one is refused
    # A tiny epsilon so "exact up to the RMSNorm epsilon" is exact to fp32 precision here.
    rms_norm_eps=1e-12,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


LLAMA_FAMILY = ["llama", "mistral", "qwen2", "qwen3"]
FAMILIES = ["phi3", "gemma2", "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe"]
ARCHS = LLAMA_FAMILY + FAMILIES
GEMMAS = {"gemma2", "gemma3_text"}
MOES = {"mixtral", "qwen2_moe", "qwen3_moe"}
#: the architectures whose shared tests also run with tied embeddings (Gemma ships tied)
TIED = {"llama", *GEMMAS}


def make_config(arch: str, tied: bool = False, eps: float = 1e-12):
    common = {**COMMON, "rms_norm_eps": eps, "tie_word_embeddings": tied}
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=16)
    if arch == "qwen2":
        # q/k/v biases, and sliding-window attention on layers >= max_window_layers
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=3)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16, use_sliding_window=True, sliding_window=8, max_window_layers=4)
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


def make_model(arch: str, tied: bool = False, seed: int = 0, eps: float = 1e-12, attn: str | None = None):
    """A random model whose residual writes are large enough that pruning changes its output.
    Gemma-2 runs eager attention by default here: sdpa silently ignores its attention softcap."""
    torch.manual_seed(seed)
    config = make_config(arch, tied, eps)
    config._attn_implementation = attn or ("eager" if arch == "gemma2" else "sdpa")
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
            elif "norm" in name:
                # Gemma stores the gain as 1 + w: gains 0.5..1.5 either way
                param.uniform_(-0.5, 0.5) if arch in GEMMAS else param.uniform_(0.5, 1.5)
            elif param.dim() >= 2:  # MoE experts are fused 3D tensors
                param.normal_(0, 0.08)
        if tied:
            model.tie_weights()
    return model


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run faster on one intra-op thread, and far faster when other jobs load the cores
    (MoE expert kernels slowed 40x with two contended threads)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return list(torch.randint(3, 128, (4, 24), generator=generator).split(2))


def layerwise_of(model, directory, *, resident: bool = True):
    """``model`` saved to ``directory`` and opened as the engine sees a source: a LayerwiseModel."""
    from prunecomp_export.adapters import adapter_for
    from prunecomp_export.engine.layerwise import LayerwiseModel
    from prunecomp_export.source.weights import SafetensorsCheckpoint

    model.save_pretrained(directory)
    dtype = next(model.parameters()).dtype
    return LayerwiseModel(
        SafetensorsCheckpoint(directory), model.config, adapter_for(model.config), torch.device("cpu"), dtype,
        resident=resident, attn_implementation=model.config._attn_implementation,
    )  # fmt: skip


def prune_streamed(model, batches, plan, directory, schedule: str = "iterative", cache: str = "device"):
    """Run the engine on ``model`` (saved to ``directory``) and return the trajectory; the model itself
    is untouched (``engine.replay`` folds the trajectory into it in memory, the tests' reference)."""
    from prunecomp_export.engine.loop import prune
    from prunecomp_export.engine.stream_cache import StreamCache

    layerwise = layerwise_of(model, directory)
    with StreamCache.open(cache, torch.device("cpu"), len(batches), directory) as streams:  # type: ignore[arg-type]
        return prune(layerwise, batches, plan, schedule, streams)


def variants_of(model, directory, plan, *, resident: bool = True):
    """``model`` saved to ``directory`` as a run's ModelVariants (its dense source and the variants a
    trajectory describes, each computed layer by layer from the files)."""
    from pathlib import Path

    from prunecomp_export.variants import ModelVariants

    layerwise = layerwise_of(model, directory, resident=resident)
    return ModelVariants(
        Path(directory),
        layerwise.source,
        model.config,
        layerwise.adapter,
        layerwise,
        plan,
        Path(directory) / ".scratch",
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama checkpoint on disk (config + safetensors + tokenizer), 6 layers."""
    from tests.test_checkpoint import tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny")
    make_model("llama").save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def synthetic_checkpoints():
    """``benchmarks/synthetic_checkpoint.py`` as a module (it lives beside the benchmarks, not in the package)."""
    import importlib.util
    import sys

    name = "synthetic_checkpoint"
    if name not in sys.modules:
        script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is created
        spec.loader.exec_module(module)
    return sys.modules[name]


#: the smallest recipe that runs on ``tiny_dir`` (format with model, text, out; Python-format braces
#: doubled); the test files that run the CLI add their sections to it
TINY_RECIPE = """
model:
  source: {model}
calibration:
  source: text
  files: [{text}]
  num_samples: 2
  seq_len: 16
prune:
  num_drop: 2
output:
  dir: {out}
"""
#: a bench section that times the tiny model once, on torch, in a second
TINY_BENCH = """
bench:
  runtimes: [torch]
  scenarios: [{{name: prefill-1x8, kind: prefill, prompt_len: 8}}]
  warmup: 1
  threads: 1
"""
