"""Gemma-2 (``gemma2``) and Gemma-3 text (``gemma3_text``).

Layout (transformers 5.19 ``modeling_gemma2`` / ``modeling_gemma3``): ``model.model.layers``,
``embed_tokens`` (a scaled embedding: the looked-up rows are multiplied by sqrt(hidden_size) inside the
model), final ``norm``, ``lm_head`` tied to the embedding by default. Each decoder layer is a "sandwich":

    h = x + post_attention_layernorm(attn(input_layernorm(x)))
    y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

Where the compensation goes: a norm AFTER each sublayer cancels any scale put on ``o_proj`` or
``down_proj``, so the residual writers are the two post-sublayer norms, and their gains are scaled.
Gemma's RMSNorm multiplies by ``(1 + w)`` (weights stored as offsets from 1), so scaling the written
vector by f means ``w' = f * (1 + w) - 1``, computed in fp32 and stored in the model's dtype. Before
scaling, the offset is measured on the module itself (``norm_gain_offset``), so a norm that multiplies
by plain ``w`` would be scaled as ``f * w`` instead of silently wrongly.

Why the fold is exact (up to the RMSNorm epsilon):
- the stream is only ever read through ``input_layernorm``, ``pre_feedforward_layernorm`` and the final
  ``norm``, which ignore a uniform scale; everything added to it is a post-norm output, linear in the
  gain; so scaling both post-norm gains of every layer before the gap (and the embedding weight: the
  sqrt(hidden) factor is a constant applied after the lookup, it commutes) scales the stream entering
  the gap by alpha (pre-gap form), and scaling those gains by 1/alpha after the gap leaves a stream that
  is 1/alpha times the pre-gap form's, removed by the final norm (post-gap form);
- the post-sublayer norms read the sublayer output, which does not change under either form, so they
  add no epsilon error of their own;
- softcapping does not break it: ``attn_logit_softcapping`` acts on q.k scores computed from normalised
  inputs (Gemma-3 also normalises q and k), and ``final_logit_softcapping`` acts on logits computed
  from the final norm's output. Both see the same values as with explicit scaling of the stream. The
  only exception is the ``scale_tied`` option (pre-gap fold on the tied embedding), which scales the
  logits before the tanh cap and is approximate by design.
- measured in tests/test_families.py against explicit scaling of the stream at the gap, with final
  softcap 2 and attention softcap 5 so the tanh is far from linear: with the tests' epsilon 1e-12 the
  logits agree to 1.7e-6 of their largest value (fp32 rounding); with Gemma's real epsilon 1e-6, to
  2.1e-6 (the epsilon term eps / mean(x^2) is tiny next to a stream that starts at sqrt(hidden) times
  the embedding; Llama-style families with the same random weights and epsilon 1e-6: ~6e-5). In bf16
  the new offset w' is rounded once when stored, an error of at most 2^-9 |w'| on the gain (1 + w'),
  as for any bf16 weight.

Per-layer config: ``layer_types`` (sliding vs global attention) is filtered to the kept layers by the
base ``prune_config``; transformers 5.x builds the masks, the rotary embeddings (Gemma-3: one per
layer type) and the cache layers from it, so every kept layer keeps its own attention type and window
(tested after reload). The transformers 4.x releases this package supports (>= 4.56) also take an
explicit ``layer_types`` over any pattern (not tested here: only 5.19 is installed). Gemma-3 configs
also carry ``sliding_window_pattern``, the BC integer "layer i is global iff (i + 1) % p == 0", which
transformers 5 serialises back (with ``_sliding_window_pattern``) and some third-party readers use
instead of ``layer_types``. After pruning it is rewritten to a period that reproduces the kept
``layer_types`` when one exists (the original period preferred), and removed otherwise, so no stale
value describes the wrong layers; a reader that only knows the integer cannot describe such a
checkpoint. Runtimes with a hard-coded 5:1 pattern would need checking separately.

Not supported: the multimodal wrapper ``gemma3`` (``Gemma3ForConditionalGeneration``). Its decoder
sits in ``model.model.language_model`` and its layer fields in ``config.text_config``, while the
pipeline reads ``num_hidden_layers``/``tie_word_embeddings`` from the top-level config and reloads with
``AutoModelForCausalLM``; supporting it needs changes outside the adapter. See ``UNSUPPORTED_HINTS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prunecomp_export.adapters.base import Adapter, scaled


@torch.no_grad()
def norm_gain_offset(norm: nn.Module) -> float:
    """1.0 for a norm that multiplies by (1 + w) (Gemma), 0.0 for one that multiplies by w.

    Measured on the module: for a constant input the normalised vector is 1/sqrt(1 + eps) everywhere,
    so output * sqrt(1 + eps) - w is the offset."""
    weight = norm.weight
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)))
    probe = torch.ones(1, weight.shape[-1], dtype=torch.float32, device=weight.device)
    offset = (norm(probe).float()[0] * (1.0 + eps) ** 0.5 - weight.float()).mean().item()
    for candidate in (0.0, 1.0):
        if abs(offset - candidate) < 1e-3:
            return candidate
    raise ValueError(f"{type(norm).__name__} is neither an x*w nor an x*(1+w) RMSNorm (offset {offset:.4g})")


@torch.no_grad()
def scaled_gain(weight: torch.Tensor, factor: float, offset: float) -> torch.Tensor:
    """The stored weight of a gain (offset + w) scaled by ``factor``: factor * (offset + w) - offset,
    in fp32, rounded once to the weight's dtype."""
    return ((weight.float() + offset) * factor - offset).to(weight.dtype)


@torch.no_grad()
def scale_norm_gain_(norm: nn.Module, factor: float) -> None:
    """Scale a norm's output by ``factor``: gain (offset + w) -> factor * (offset + w), in fp32, stored
    once in the parameter's dtype. For Gemma's (1 + w): w' = factor * (1 + w) - 1."""
    norm.weight.copy_(scaled_gain(norm.weight, factor, norm_gain_offset(norm)))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_(scaled(norm.bias, factor))


@dataclass(frozen=True)
class GemmaAdapter(Adapter):
    """Gemma-2: the residual writers are the post-sublayer norms (see the module docstring)."""

    writer_paths: tuple[str, ...] = ("post_attention_layernorm", "post_feedforward_layernorm")
    #: The gain offset of the writer norms in checkpoint tensors, where no module can be probed:
    #: Gemma's RMSNorm computes x_hat * (1 + w) (transformers' Gemma2RMSNorm/Gemma3RMSNorm, and the
    #: original JAX code, store the gain as an offset from 1 so zero-initialised weights are identity),
    #: so the offset is 1 and w' = f * (1 + w) - 1. tests/test_tensor_surgery.py checks that it equals
    #: ``norm_gain_offset`` measured on the modules.
    gain_offset: ClassVar[float] = 1.0

    def output_map_refusal(self) -> str | None:
        return (
            f"{self.model_type}'s MLP output passes post_feedforward_layernorm before the residual add, "
            "so a linear map on it cannot be folded into the weights exactly; use compensation: fitted or magnitude"
        )

    def scale_residual_writes(self, layer: nn.Module, factor: float) -> None:
        for norm in self.residual_writers(layer):
            scale_norm_gain_(norm, factor)

    def scale_writer_tensor(self, key: str, tensor: torch.Tensor, factor: float) -> torch.Tensor | None:
        path, _, leaf = key.rpartition(".")
        if path not in self.writer_paths:
            return None
        if leaf == "weight":
            return scaled_gain(tensor, factor, self.gain_offset)
        return scaled(tensor, factor) if leaf == "bias" else None


LAYER_TYPE_PATTERN = {"sliding_attention": True, "full_attention": False}


def sliding_window_period(layer_types: list[str], preferred: int | None = None) -> int | None:
    """A p with layer i sliding iff (i + 1) % p != 0 for every i (transformers' BC rule), or None."""

    def fits(p: int) -> bool:
        return all(
            t in LAYER_TYPE_PATTERN and LAYER_TYPE_PATTERN[t] == bool((i + 1) % p) for i, t in enumerate(layer_types)
        )

    candidates = ([preferred] if isinstance(preferred, int) and preferred > 0 else []) + list(
        range(1, len(layer_types) + 2)
    )
    return next((p for p in candidates if fits(p)), None)


@dataclass(frozen=True)
class Gemma3TextAdapter(GemmaAdapter):
    """Gemma-3 text: Gemma-2's writers, plus a consistent ``sliding_window_pattern`` after pruning."""

    def prune_config(self, config, keep: list[int]) -> None:
        original = vars(config).get("sliding_window_pattern", vars(config).get("_sliding_window_pattern"))
        super().prune_config(config, keep)
        period = sliding_window_period(list(config.layer_types), original)
        for name in ("sliding_window_pattern", "_sliding_window_pattern"):
            if period is not None:
                setattr(config, name, period)
            elif name in vars(config):
                delattr(config, name)


GEMMA_FAMILY: tuple[Adapter, ...] = (
    GemmaAdapter("gemma2", notes="post-sublayer norms carry the compensation (gain 1+w)"),
    Gemma3TextAdapter("gemma3_text", notes="post-sublayer norms carry the compensation (gain 1+w)"),
)

#: known model types that are deliberately not supported, with the reason (shown in the error)
UNSUPPORTED_HINTS: dict[str, str] = {
    "gemma3": "'gemma3' is the multimodal Gemma3ForConditionalGeneration wrapper, whose decoder and layer fields "
    "sit one level down (language_model, text_config); prune a text-only Gemma-3 checkpoint "
    "(model_type 'gemma3_text', such as gemma-3-1b)",
}
