"""Phi-3 and Phi-3.5 (``model_type`` ``phi3``; Phi-3.5-MoE is ``phimoe`` and not covered here).

Layout (transformers 5.19 ``modeling_phi3``): ``model.model.layers``, ``embed_tokens``, final ``norm``;
each ``Phi3DecoderLayer`` is pre-norm (``input_layernorm`` before attention, ``post_attention_layernorm``
before the MLP, both plain RMSNorms that multiply by ``w``). Attention reads the normalised stream
through one fused ``self_attn.qkv_proj`` and writes through ``self_attn.o_proj``; the MLP reads
through a fused ``mlp.gate_up_proj`` and writes through ``mlp.down_proj``. The fused projections are
readers and stay untouched, so the residual writers are exactly Llama's, ``o_proj`` and ``down_proj``
(no biases in released checkpoints; a bias would be scaled too). ``resid_*_dropout`` is identity in eval.

Why the fold is exact (up to the RMSNorm epsilon): every read of the stream goes through an RMSNorm,
which ignores a uniform scale, and everything a layer adds to the stream passes through ``o_proj`` or
``down_proj``. Scaling those (and the embedding, pre-gap form) scales the stream entering the gap by
alpha; the post-gap form scales every later write by 1/alpha and the final norm removes the rest.
tests/test_families.py measures this against explicit scaling of the stream at the gap: the logits
agree to 8.8e-7 of their largest value with the tests' epsilon 1e-12 (fp32 rounding), to 7.6e-5 with
epsilon 1e-6 on these random weights, whose stream is small next to a trained model's.

Per-layer config: none. ``sliding_window`` (Phi-3-mini-4k: 2047) applies to every layer, and the
LongRoPE fields (``rope_parameters`` short/long factors, ``original_max_position_embeddings``) are
per model, so only ``num_hidden_layers`` changes.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunecomp_export.adapters.base import Adapter


@dataclass(frozen=True)
class Phi3Adapter(Adapter):
    """Llama's layout and writers; only the reader projections are fused (see the module docstring)."""


PHI3_FAMILY: tuple[Adapter, ...] = (
    Phi3Adapter("phi3", notes="fused qkv_proj/gate_up_proj are readers; writers o_proj, down_proj"),
)
