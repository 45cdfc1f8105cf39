"""Write the pruned model as a plain Hugging Face checkpoint and prove it reloads identically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from prunecomp_export.errors import ValidationFailed


@contextmanager
def staged_directory(final: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; rename it to ``final`` only if the block succeeds,
    so a failed or interrupted run leaves nothing half-written."""
    final = final.resolve()
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists (set output.overwrite: true to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)


def save_checkpoint(model: nn.Module, tokenizer, directory: Path, max_shard_size: str = "5GB") -> None:
    """save_pretrained (safetensors only) + tokenizer, then make config.json readable the same way
    by transformers 4.x and 5.x."""
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(compatible_config(config), indent=2, sort_keys=True) + "\n")


def compatible_config(config: dict) -> dict:
    """transformers 5 keeps rope settings in ``rope_parameters`` and the dtype in ``dtype``;
    4.x reads ``rope_theta``/``rope_scaling`` and ``torch_dtype``. Write both spellings."""
    config = dict(config)
    config.pop("quantization_config", None)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        # Gemma-3 keeps one rope setting per attention type; 4.x reads the global one at top level
        # and the local base frequency as rope_local_base_freq.
        if isinstance(rope.get("sliding_attention"), dict) and "rope_theta" in rope["sliding_attention"]:
            config.setdefault("rope_local_base_freq", rope["sliding_attention"]["rope_theta"])
        rope = rope["full_attention"]
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    return config


def sha256_tree(directory: Path) -> dict[str, str]:
    """sha256 of every file below ``directory``, keyed by relative path."""
    hashes = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        hashes[path.relative_to(directory).as_posix()] = digest.hexdigest()
    return hashes


@torch.no_grad()
def verify_reload(model: nn.Module, directory: Path, sample: torch.Tensor, new_tokens: int = 8) -> dict:
    """Reload with AutoModelForCausalLM and check (1) logits equal the in-memory model's and (2)
    greedy generation gives the same tokens with and without the KV cache."""
    from transformers import AutoModelForCausalLM

    dtype = next(model.parameters()).dtype
    # The same attention kernel as in memory: some (Gemma-2's softcapping under sdpa) differ.
    attention = getattr(model.config, "_attn_implementation", None)
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attention).eval()
    expected = model(input_ids=sample, use_cache=False).logits.float()
    got = reloaded(input_ids=sample, use_cache=False).logits.float()
    max_diff = (expected - got).abs().max().item()
    prompt = sample[:1, : min(16, sample.shape[1])]
    common = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": reloaded.config.eos_token_id}
    with_cache = reloaded.generate(prompt, use_cache=True, **common)
    without_cache = reloaded.generate(prompt, use_cache=False, **common)
    result = {
        "reloaded_layers": reloaded.config.num_hidden_layers,
        "max_abs_logit_diff": max_diff,
        "generate_cache_equals_no_cache": bool(torch.equal(with_cache, without_cache)),
        "generated_tokens": with_cache[0, prompt.shape[1] :].tolist(),
    }
    if max_diff > 1e-4 * max(1.0, expected.abs().max().item()):
        raise ValidationFailed(f"the reloaded checkpoint's logits differ from the pruned model's by {max_diff:.3g}")
    if not result["generate_cache_equals_no_cache"]:
        raise ValidationFailed("greedy generation differs with and without the KV cache after reload")
    return result
