"""Tiny random causal LMs saved as plain HF checkpoints with a byte-level tokenizer, for the targets'
tests, and a stand-in runtime (transformers, greedy, in a given dtype) for the parity check."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

EOS = 256
VOCAB = 260


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (one token per byte) plus an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_checkpoint(directory: Path, *, arch: str = "llama", layers: int = 2, seed: int = 0) -> Path:
    """A random causal LM saved as a plain HF checkpoint (with a tokenizer). Weights are large enough
    that greedy decoding does not collapse to one repeated token."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=EOS,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2-sliding":
        # Layer 1 attends to a 4-token window only; validation prompts are longer than that.
        config = Qwen2Config(**common, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3)
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def swapped_layers(checkpoint: Path, target: Path, a: int, b: int) -> Path:
    """A copy of ``checkpoint`` whose decoder layers ``a`` and ``b`` trade places (a wrong model): the
    parity benchmark's own, so that the tests and the measured tolerances judge the same wrong model."""
    from benchmarks.parity_tolerances import swap_layers

    swap_layers(checkpoint, target, a, b)
    return target


def transformers_run(
    checkpoint: Path,
    prompts: Sequence[str],
    *,
    dtype: str = "float32",
    max_new_tokens: int = 8,
    top_k: int = 5,
    stop_ids: Sequence[int] = (),
):
    """A stand-in runtime: transformers in ``dtype``, greedy, a full forward per new token, its
    log-probabilities from its own logits (``parity.RuntimeRun``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunecomp_export.targets.parity import Continuation, RuntimeRun

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype)).eval()
    continuations = []
    for prompt in prompts:
        ids = list(tokenizer(prompt)["input_ids"])
        with torch.no_grad():
            first = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            new, logprobs, tops = [], [], []
            for _ in range(max_new_tokens):
                last = torch.log_softmax(model(torch.tensor([ids + new])).logits[0, -1].float(), -1)
                values, indices = last.topk(top_k)
                token = int(indices[0])
                new.append(token)
                logprobs.append(float(last[token]))
                tops.append(dict(zip(indices.tolist(), values.tolist(), strict=True)))
                if token in stop_ids:
                    break
        continuations.append(
            Continuation(
                prompt_ids=ids,
                prompt_logprobs=[float(first[j, t]) for j, t in enumerate(ids[1:])],
                new_ids=new,
                new_logprobs=logprobs,
                new_top=tops,
            )
        )
    return RuntimeRun(runtime="transformers (stand-in)", dtype=dtype, continuations=continuations)
