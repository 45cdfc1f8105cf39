"""Write the pruned model as a plain Hugging Face checkpoint and prove it reloads identically."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from prunecomp_export.errors import ValidationFailed
from prunecomp_export.output.outputdir import safetensors_write_errors


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


def verify_reload(
    directory: Path, sample: torch.Tensor, expected_logits: torch.Tensor, *, dtype: torch.dtype,
    attn_implementation: str | None = None, device: str = "cpu", new_tokens: int = 8,
    max_memory: dict[str, int] | None = None, offload_folder: str | None = None,
) -> dict:  # fmt: skip
    """Reload the written checkpoint with AutoModelForCausalLM, as a user would, and check (1) its
    logits on ``sample`` equal ``expected_logits`` (what the engine computed for this variant from
    the source files) and are finite, and (2) decoding with the KV cache gives the logits of a full
    forward (a stale attention ``layer_idx`` reads another layer's cache). (2) feeds the tokens of
    an uncached greedy generation step by step; whether cached greedy generation picks the same
    tokens is recorded too, but in bf16 a near-tie may flip, so it is not a failure there.

    With ``max_memory`` (the memory plan's, per device) the model is placed by accelerate's big-model
    inference, what does not fit offloaded into ``offload_folder``: still transformers' own reload."""
    from transformers import AutoModelForCausalLM

    placed = {"device_map": device} if max_memory is None else accelerate_placement(max_memory, offload_folder)
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, attn_implementation=attn_implementation, **placed
        ).eval()
        got = reloaded(input_ids=sample.to(device), use_cache=False).logits.float().cpu()
        expected = expected_logits.float()
        if not torch.isfinite(got).all():
            raise ValidationFailed(f"the reloaded checkpoint in {directory} gives non-finite logits")
        max_diff = (expected - got).abs().max().item()
        prompt = sample[:1, : min(16, sample.shape[1])].to(device)
        common = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": reloaded.config.eos_token_id}
        without_cache = reloaded.generate(prompt, use_cache=False, **common)
        with_cache = reloaded.generate(prompt, use_cache=True, **common)
        cache_diff = _cached_decode_diff(reloaded, without_cache, prompt.shape[1])
    scale = max(1.0, expected.abs().max().item())
    tolerance = (1e-4 if dtype == torch.float32 else 2e-2) * scale
    result = {
        "reloaded_layers": reloaded.config.num_hidden_layers,
        "max_abs_logit_diff": max_diff,
        "cached_decode_max_abs_logit_diff": cache_diff,
        "generate_cache_equals_no_cache": bool(torch.equal(with_cache, without_cache)),
        "generated_tokens": without_cache[0, prompt.shape[1] :].tolist(),
        "tolerance": tolerance,
        "placement": placement_summary(reloaded),
    }
    if not max_diff <= tolerance:
        raise ValidationFailed(f"the reloaded checkpoint's logits differ from the pruned model's by {max_diff:.3g}")
    if not cache_diff <= tolerance:
        raise ValidationFailed(f"decoding with the KV cache differs from a full forward by {cache_diff:.3g} in logits")
    if dtype == torch.float32 and not result["generate_cache_equals_no_cache"]:
        raise ValidationFailed("greedy generation differs with and without the KV cache after reload")
    return result


def placement_summary(model) -> dict[str, int]:
    """How many of the model's modules accelerate put where ("cpu", "disk", a GPU's index); all of
    them on one device when the model was not dispatched."""
    device_map = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
    counts: dict[str, int] = {}
    for place in device_map.values():
        counts[str(place)] = counts.get(str(place), 0) + 1
    return counts


def _cached_decode_diff(model, tokens: torch.Tensor, prompt_len: int) -> float:
    """Largest logit difference between decoding ``tokens`` one at a time on the KV cache after the
    prompt and one full forward over them."""
    full = model(input_ids=tokens, use_cache=False).logits.float()
    out = model(input_ids=tokens[:, :prompt_len], use_cache=True)
    steps = [out.logits[:, -1].float()]
    for position in range(prompt_len, tokens.shape[1] - 1):
        out = model(input_ids=tokens[:, position : position + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits[:, -1].float())
    cached = torch.stack(steps, dim=1)
    return (cached - full[:, prompt_len - 1 : tokens.shape[1] - 1]).abs().max().item()


def write_verification_sample(path: Path, sample: torch.Tensor, expected_logits: torch.Tensor) -> None:
    """The reload check's input and the logits the checkpoint must give, in one small safetensors file:
    kept in the output (``manifest.VERIFICATION_FILE``), ``prunecomp-export verify`` repeats the check later
    without the source model."""
    from safetensors.torch import save_file

    with safetensors_write_errors(path):
        save_file({"sample": sample.contiguous(), "expected": expected_logits.contiguous()}, path)


def accelerate_placement(max_memory: dict[str, int], offload_folder: str | None) -> dict:
    """``from_pretrained`` arguments for accelerate's big-model inference within ``max_memory`` (keys as
    JSON has them: "0" for the first GPU, "cpu"); what does not fit goes to ``offload_folder``."""
    memory = {int(key) if key.isdigit() else key: value for key, value in max_memory.items()}
    return {"device_map": "auto", "max_memory": memory, "offload_folder": offload_folder}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (as ``verify_from_file`` and the manifest take it)."""
    return str(dtype).removeprefix("torch.")


def verify_from_file(
    directory: str, tensors: str, dtype: str, attn_implementation: str | None, device: str,
    max_memory: dict[str, int] | None = None, offload_folder: str | None = None,
) -> dict:  # fmt: skip
    from safetensors.torch import load_file

    loaded = load_file(tensors)
    return verify_reload(
        Path(directory), loaded["sample"], loaded["expected"], dtype=getattr(torch, dtype),
        attn_implementation=attn_implementation, device=device, max_memory=max_memory,
        offload_folder=offload_folder,
    )  # fmt: skip
