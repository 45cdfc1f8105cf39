"""Write a synthetic Hugging Face checkpoint with a real model's shape, without downloading it.

Benchmarks of memory and time need a model of realistic size (TinyLlama-1.1B's shape) on a machine
with no internet, and the generator itself must not distort what it is used to measure: it never
holds the model, or even a whole shard, in memory. Each tensor is generated in fixed-size chunks
and streamed into its safetensors shard (header first, then the data in the order the format's own
writer uses), so the peak is about one chunk plus one tensor's worth of bookkeeping on top of torch.

The weights are random but shaped like a trained model's: projections and embeddings normal(0, 0.02)
(residual writes of order 1 after RMSNorm, nothing near bf16's range limits) and RMSNorm gains
uniform(0.8, 1.2). Each tensor has its own generator, seeded with ``seed + its index``, so any tensor
can be regenerated on its own. Keys, shard names and the index are what transformers writes.

    python benchmarks/synthetic_checkpoint.py OUT_DIR --preset tinyllama-1.1b --dtype bfloat16 --shards 2

Presets: ``tinyllama-1.1b`` (Llama, untied), ``qwen2-0.5b`` (Qwen2.5-0.5B's shape: Qwen2 with q/k/v
biases, tied embeddings, a 151,936-token vocabulary), and the tiny ``tiny`` and ``tiny-151k-vocab``
for tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from prunecomp_export.output.safetensors_stream import DTYPE_NAMES, Entry, SafetensorsWriter

PRESETS: dict[str, dict] = {
    "tinyllama-1.1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    ),
    "qwen2-0.5b": dict(
        architecture="qwen2",
        tie_word_embeddings=True,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
    ),
    "tiny-151k-vocab": dict(
        architecture="qwen2",
        tie_word_embeddings=True,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    ),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
#: elements generated at a time (16 MB in fp32); part of what fixes the values, so do not change it lightly
CHUNK_ELEMENTS = 4 * 1024 * 1024
WEIGHT_STD = 0.02
NORM_GAIN_RANGE = (0.8, 1.2)
#: special tokens and their ids, as in Llama's tokenizer (plus a pad token)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "normal" or "norm"
    index: int  # position in the model's canonical order; the generator's seed is seed + index

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_specs(preset: dict) -> list[TensorSpec]:
    """Every tensor of the preset's causal LM (Llama, or Qwen2 with its q/k/v biases; lm_head unless
    the embeddings are tied), in the order the model defines them."""
    hidden, inter, vocab = preset["hidden_size"], preset["intermediate_size"], preset["vocab_size"]
    head_dim = hidden // preset["num_attention_heads"]
    kv = preset["num_key_value_heads"] * head_dim
    biases = preset.get("architecture") == "qwen2"
    rows: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (vocab, hidden), "normal")]
    for i in range(preset["num_hidden_layers"]):
        p = f"model.layers.{i}"
        rows += [
            (f"{p}.input_layernorm.weight", (hidden,), "norm"),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden), "normal"),
            *([(f"{p}.self_attn.q_proj.bias", (hidden,), "normal")] if biases else []),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden), "normal"),
            *([(f"{p}.self_attn.k_proj.bias", (kv,), "normal")] if biases else []),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden), "normal"),
            *([(f"{p}.self_attn.v_proj.bias", (kv,), "normal")] if biases else []),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden), "normal"),
            (f"{p}.post_attention_layernorm.weight", (hidden,), "norm"),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden), "normal"),
            (f"{p}.mlp.up_proj.weight", (inter, hidden), "normal"),
            (f"{p}.mlp.down_proj.weight", (hidden, inter), "normal"),
        ]
    rows.append(("model.norm.weight", (hidden,), "norm"))
    if not preset.get("tie_word_embeddings", False):
        rows.append(("lm_head.weight", (vocab, hidden), "normal"))
    return [TensorSpec(name, shape, kind, index) for index, (name, shape, kind) in enumerate(rows)]


def shard_layout(specs: list[TensorSpec], num_layers: int, shards: int) -> list[list[TensorSpec]]:
    """Layers split evenly across shards; embeddings in the first, the final norm and lm_head in the last."""
    if not 1 <= shards <= num_layers:
        raise ValueError(f"shards must be between 1 and the number of layers ({num_layers}), got {shards}")
    out: list[list[TensorSpec]] = [[] for _ in range(shards)]
    for spec in specs:
        if spec.name.startswith("model.layers."):
            layer = int(spec.name.split(".")[2])
            out[layer * shards // num_layers].append(spec)
        else:
            out[0 if spec.name.startswith("model.embed_tokens") else shards - 1].append(spec)
    return out


def tensor_chunks(spec: TensorSpec, dtype: torch.dtype, seed: int) -> Iterator[torch.Tensor]:
    """The tensor's values, flat, CHUNK_ELEMENTS at a time, already in ``dtype``."""
    generator = torch.Generator().manual_seed(seed + spec.index)
    for start in range(0, spec.numel, CHUNK_ELEMENTS):
        chunk = torch.empty(min(CHUNK_ELEMENTS, spec.numel - start), dtype=torch.float32)
        if spec.kind == "norm":
            chunk.uniform_(*NORM_GAIN_RANGE, generator=generator)
        else:
            chunk.normal_(0.0, WEIGHT_STD, generator=generator)
        yield chunk.to(dtype)


def make_tensor(spec: TensorSpec, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """One tensor, whole (for tests and the save_file writer)."""
    return torch.cat(list(tensor_chunks(spec, dtype, seed))).reshape(spec.shape)


def _data_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    # safetensors' own writer orders data by alignment (all equal here), then by name.
    return sorted(specs, key=lambda spec: spec.name)


def write_shard_streaming(path: Path, specs: list[TensorSpec], dtype: torch.dtype, seed: int) -> int:
    """Write one safetensors file, one chunk in memory at a time (the package's streaming writer,
    given save_file's data order, writes what save_file writes byte for byte); returns the data size."""
    ordered = _data_order(specs)
    entries = [Entry(spec.name, DTYPE_NAMES[dtype], tuple(spec.shape)) for spec in ordered]
    partial = path.with_name(path.name + ".partial")
    with SafetensorsWriter(partial, entries) as out:
        for spec in ordered:
            out.write_chunks(spec.name, tensor_chunks(spec, dtype, seed))
    partial.replace(path)
    return sum(entry.nbytes for entry in entries)


def write_shard_save_file(path: Path, specs: list[TensorSpec], dtype: torch.dtype, seed: int) -> int:
    """The same shard through safetensors' own writer, which needs the whole shard in memory."""
    from safetensors.torch import save_file

    tensors = {spec.name: make_tensor(spec, dtype, seed) for spec in specs}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _training_text() -> str:
    """The Wikipedia excerpt shipped in gensim's wheel, found without importing gensim (slow, heavy)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the tokenizer is trained on gensim's test data: install gensim")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / "lee_background.cor"
    return path.read_text(encoding="utf-8")


def write_tokenizer(out_dir: Path, vocab_size: int, max_length: int) -> None:
    """A byte-level BPE tokenizer trained offline, saved so that AutoTokenizer.from_pretrained loads it.

    Byte-level, so any text round-trips; its vocabulary is at most the model's. Adds <s> in front of
    every sequence as Llama's tokenizer does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text().splitlines(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID, PAD_ID]
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=max_length,
    )
    wrapped.save_pretrained(out_dir)
    # transformers 5 writes its own class name ("TokenizersBackend"), which 4.x cannot load; both load this one
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def write_config(out_dir: Path, preset: dict, dtype: torch.dtype) -> None:
    from transformers import LlamaConfig, Qwen2Config

    fields = {key: value for key, value in preset.items() if key not in ("architecture", "tie_word_embeddings")}
    qwen2 = preset.get("architecture") == "qwen2"
    config = (Qwen2Config if qwen2 else LlamaConfig)(
        **fields,  # rope_theta: transformers 5 moves it into rope_parameters itself
        tie_word_embeddings=preset.get("tie_word_embeddings", False),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        dtype=str(dtype).removeprefix("torch."),
        architectures=["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
    )
    config.save_pretrained(out_dir)


def write_synthetic_checkpoint(
    out_dir: Path,
    preset: str,
    dtype: str | torch.dtype = "bfloat16",
    shards: int = 2,
    seed: int = 0,
    writer: str = "stream",
    verbose: bool = False,
) -> Path:
    """Write weights, index, config and tokenizer into ``out_dir``; returns ``out_dir``.

    ``writer="stream"`` keeps one chunk in memory; ``"save_file"`` uses safetensors' writer and holds
    a whole shard (for small models and for checking the streaming writer against the library).
    ``verbose`` prints each shard's progress and the peak RSS reached by the weights alone to stderr.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    shape = PRESETS[preset]
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    write_shard = {"stream": write_shard_streaming, "save_file": write_shard_save_file}[writer]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("model-*-of-*.safetensors"):  # a previous run with another shard count
        stale.unlink()

    specs = tensor_specs(shape)
    layout = shard_layout(specs, shape["num_hidden_layers"], shards)
    weight_map: dict[str, str] = {}
    total_size = 0
    for number, shard_specs in enumerate(layout, start=1):
        filename = f"model-{number:05d}-of-{len(layout):05d}.safetensors"
        shard_start = time.perf_counter()
        size = write_shard(out_dir / filename, shard_specs, torch_dtype, seed)
        total_size += size
        weight_map.update({spec.name: filename for spec in shard_specs})
        if verbose:
            seconds = time.perf_counter() - shard_start
            print(f"wrote {filename}: {size / 1e6:.1f} MB in {seconds:.1f} s", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if verbose:
        print(f"peak RSS after the weights: {_peak_rss_mb():.0f} MB", file=sys.stderr, flush=True)

    # transformers costs ~350 MB of RSS to import: only after the weights, so the two peaks do not add up
    write_config(out_dir, shape, torch_dtype)
    write_tokenizer(out_dir, shape["vocab_size"], shape["max_position_embeddings"])
    return out_dir


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama-1.1b")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writer", choices=["stream", "save_file"], default="stream")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    out = write_synthetic_checkpoint(
        args.out_dir, args.preset, args.dtype, args.shards, args.seed, args.writer, verbose=True
    )
    wall_s = time.perf_counter() - start
    for path in sorted(out.iterdir()):
        print(f"{path.stat().st_size / 1e6:12.1f} MB  {path.name}")
    total = json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    print(f"weights: {total / 1e9:.3f} GB in {args.shards} shard(s); wall time {wall_s:.1f} s")
    print(f"generator peak RSS (ru_maxrss): {_peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
