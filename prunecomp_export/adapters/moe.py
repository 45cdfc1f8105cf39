"""Mixture-of-experts families: Mixtral (``mixtral``), Qwen3-MoE (``qwen3_moe``), Qwen2-MoE (``qwen2_moe``).

Layout (transformers 5.19): Llama's (``model.model.layers``, ``embed_tokens``, final ``norm``, pre-norm
RMSNorm blocks, attention writer ``self_attn.o_proj``); the MLP slot ``layer.mlp`` holds either
- a sparse MoE block: a router ``gate`` (a linear of the normalised input, then softmax/top-k) and
  ``experts``, whose weights transformers 5 stores fused as 3D parameters ``experts.gate_up_proj``
  [num_experts, 2 * inter, hidden] and ``experts.down_proj`` [num_experts, hidden, inter]; the block's
  output is sum over the chosen experts of routing_weight * expert(x). Qwen2-MoE adds a
  ``shared_expert`` (an MLP with its own ``down_proj``) gated by sigmoid(``shared_expert_gate``(x));
  Qwen3-MoE has no shared expert;
- or, for Qwen-MoE layers listed in ``mlp_only_layers`` / off the ``decoder_sparse_step`` grid, a dense
  MLP with ``down_proj``.
On save, transformers 5 splits the fused tensors back into the per-expert checkpoint layout
(``block_sparse_moe.experts.N.w2`` for Mixtral, ``mlp.experts.N.down_proj`` for Qwen), the layout that
transformers 4.x and vLLM read. Older in-memory layouts are handled too: per-expert ``nn.ModuleList``
experts with ``down_proj`` or Mixtral's ``w2``, and Mixtral's ``block_sparse_moe`` attribute (4.x).

Residual writers: ``o_proj``, and in the MLP slot every expert's down projection (the whole fused 3D
``experts.down_proj``, plus ``experts.down_proj_bias`` where a family has one), the shared expert's
``down_proj``, or the dense MLP's ``down_proj``. The router, the shared-expert gate and the gate/up
projections are readers and stay untouched.

Why the fold is exact (up to the RMSNorm epsilon): the router and the experts all read
``post_attention_layernorm``'s output, which ignores a uniform scale of the stream, so the same experts
are chosen with the same routing weights; the block's output is linear in every expert's down
projection (and the shared expert's, whose sigmoid gate also reads the normalised input), so scaling
all of them by f scales the block's write by f. The rest is the Llama argument. Routing is a
discontinuous top-k, so "exact" means: identical up to fp32 rounding of the normalised router input,
which can only flip a near-tie between experts (never seen in the tests). Measured in
tests/test_families.py against explicit scaling of the stream at the gap: logits agree to 9.4e-7 of
their largest value with the tests' epsilon 1e-12 (fp32 rounding), to 6e-5 with epsilon 1e-6 on these
random weights, whose stream is small (trained models' streams are far larger than epsilon).

Per-layer config (Qwen-MoE): whether layer i is sparse is
``i not in mlp_only_layers and num_experts > 0 and (i + 1) % decoder_sparse_step == 0``.
``mlp_only_layers`` holds layer INDICES, so it is remapped to the kept layers' new indices (not
filtered by position), and ``decoder_sparse_step`` cannot describe a grid with holes in it: after
pruning the kind of every kept layer is written explicitly, ``mlp_only_layers`` = the new indices of
the kept dense layers and ``decoder_sparse_step`` = 1, which transformers 4.x and 5.x read the same
way. Qwen2-MoE's ``layer_types`` is filtered and ``max_window_layers`` recounted as for Qwen2.
Mixtral has no per-layer fields (``sliding_window`` applies to every layer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from prunecomp_export.adapters.base import LINEAR_LEAVES, Adapter, LayerTensorError, mapped, scale_parameter_, scaled
from prunecomp_export.adapters.llama import QwenAdapter

# The names that say where an MoE layer writes to the stream, used by both the module-level fold
# (``scale_residual_writes``) and the checkpoint-key level (``scale_writer_tensor``).
#: the attribute holding the MLP slot: ``mlp`` (transformers 5, Qwen), ``block_sparse_moe`` (Mixtral files, 4.x)
MLP_SLOTS = ("mlp", "block_sparse_moe")
#: an expert's (gate, up, down) projections: Qwen's names, and Mixtral's per-expert w1, w3, w2. gate and
#: up read the stream (fused as ``gate_up_proj`` = cat([gate, up]) in transformers 5), down writes it
EXPERT_PROJECTIONS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
#: an expert's (or a dense MLP's) down projection
DOWN_PROJECTIONS = tuple(down for _, _, down in EXPERT_PROJECTIONS)
EXPERTS = "experts"
SHARED_EXPERT = "shared_expert"
#: the bias of fused experts' down projection, a bare parameter next to ``experts.down_proj``
FUSED_DOWN_BIAS = "down_proj_bias"
FUSED_GATE_UP = "gate_up_proj"


def _any(names) -> str:
    return "|".join(re.escape(name) for name in names)


#: checkpoint keys of writers in the MLP slot, relative to the layer: a dense MLP's, a per-expert or
#: the shared expert's down projection (weight, bias), or the fused experts' down projection and bias
MLP_WRITER_KEY = re.compile(
    rf"(?:{_any(MLP_SLOTS)})\.(?:(?:{EXPERTS}\.\d+|{SHARED_EXPERT})\.)?(?:{_any(DOWN_PROJECTIONS)})"
    rf"\.(?:{_any(LINEAR_LEAVES)})"
    rf"|(?:{_any(MLP_SLOTS)})\.{EXPERTS}\.(?:{_any((*DOWN_PROJECTIONS, FUSED_DOWN_BIAS))})"
)
#: a per-expert checkpoint key: slot, expert index, projection, leaf
PER_EXPERT_KEY = re.compile(rf"({_any(MLP_SLOTS)})\.{EXPERTS}\.(\d+)\.(\w+)\.(\w+)")


def _projection_tensors(module: nn.Module | torch.Tensor) -> list[torch.Tensor]:
    """A linear's weight and bias, or a bare (fused) parameter."""
    if isinstance(module, torch.Tensor):
        return [module]
    return [t for leaf in LINEAR_LEAVES if (t := getattr(module, leaf, None)) is not None]


def _down_projection(mlp: nn.Module) -> list[torch.Tensor]:
    for name in DOWN_PROJECTIONS:
        if (projection := getattr(mlp, name, None)) is not None:
            return _projection_tensors(projection)
    raise ValueError(f"{type(mlp).__name__} has no down projection ({' or '.join(DOWN_PROJECTIONS)})")


def mlp_output_tensors(mlp: nn.Module) -> list[torch.Tensor]:
    """Every tensor through which an MLP slot (dense or MoE) writes to the residual stream."""
    experts = getattr(mlp, EXPERTS, None)
    shared = getattr(mlp, SHARED_EXPERT, None)
    if experts is None and shared is None:
        return _down_projection(mlp)  # a dense MLP
    tensors: list[torch.Tensor] = []
    if isinstance(experts, nn.ModuleList):
        for expert in experts:
            tensors += _down_projection(expert)
    elif experts is not None:
        tensors += _down_projection(experts)  # fused [num_experts, hidden, inter] parameter
        if getattr(experts, FUSED_DOWN_BIAS, None) is not None:
            tensors.append(getattr(experts, FUSED_DOWN_BIAS))
    if shared is not None:
        tensors += _down_projection(shared)
    return tensors


@dataclass(frozen=True)
class MoeAdapter(Adapter):
    """Writers: ``o_proj`` and every expert's (and shared expert's) down projection."""

    writer_paths: tuple[str, ...] = ("self_attn.o_proj",)

    def mlp(self, layer: nn.Module) -> nn.Module:
        for name in MLP_SLOTS:
            if (module := getattr(layer, name, None)) is not None:
                return module
        raise ValueError(f"{type(layer).__name__} has no {' or '.join(MLP_SLOTS)}")

    def residual_write_tensors(self, layer: nn.Module) -> list[torch.Tensor]:
        tensors = [t for writer in self.residual_writers(layer) for t in _projection_tensors(writer)]
        return tensors + mlp_output_tensors(self.mlp(layer))

    def scale_residual_writes(self, layer: nn.Module, factor: float) -> None:
        for tensor in self.residual_write_tensors(layer):
            scale_parameter_(tensor, factor)

    def scale_writer_tensor(self, key: str, tensor: torch.Tensor, factor: float) -> torch.Tensor | None:
        if MLP_WRITER_KEY.fullmatch(key):
            return scaled(tensor, factor)
        return super().scale_writer_tensor(key, tensor, factor)

    def map_writer_tensor(self, key: str, tensor: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        """Every expert's and the shared expert's down projection: the block's output is linear in
        each of them (routing and the shared-expert gate read the normalised input)."""
        if not MLP_WRITER_KEY.fullmatch(key):
            return None
        leaf = key.rpartition(".")[2]
        return mapped(tensor, t, bias=leaf in ("bias", FUSED_DOWN_BIAS))

    def mlp_output_module(self, layer: nn.Module) -> nn.Module:
        return self.mlp(layer)

    def layer_module_tensors(
        self, tensors: dict[str, torch.Tensor], layer: nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """Checkpoint layout -> module layout. The MLP slot is renamed to the module's attribute
        (Mixtral's files say ``block_sparse_moe``, transformers 5's module ``mlp``); per-expert tensors
        are fused when the module holds fused experts (always in transformers 5; without ``layer``
        that is assumed), as transformers' own conversion_mapping does for mixtral and qwen2_moe:
        ``experts.gate_up_proj`` = stack_e(cat([gate_e, up_e], dim=0)) [E, 2 * inter, hidden] and
        ``experts.down_proj`` = stack_e(down_e) [E, hidden, inter]. Fused tensors pass through."""
        expected = set(layer.state_dict()) if layer is not None else None
        slot = next((s for s in MLP_SLOTS if expected is None or any(k.startswith(f"{s}.") for k in expected)), "mlp")
        fused = expected is None or f"{slot}.{EXPERTS}.{FUSED_GATE_UP}" in expected
        out: dict[str, torch.Tensor] = {}
        per_expert: dict[str, dict[int, torch.Tensor]] = {}
        source_slot = slot
        for key, tensor in tensors.items():
            match = PER_EXPERT_KEY.fullmatch(key)
            if fused and match:
                if match[4] != "weight":
                    raise LayerTensorError(key, "cannot be fused into the module's fused experts")
                source_slot = match[1]
                per_expert.setdefault(match[3], {})[int(match[2])] = tensor
                continue
            for name in MLP_SLOTS:
                if key.startswith(f"{name}."):
                    key = f"{slot}.{key[len(name) + 1 :]}"
                    break
            out[key] = tensor
        if per_expert:
            experts = f"{slot}.{EXPERTS}"
            count = layer.get_parameter(f"{experts}.{FUSED_GATE_UP}").shape[0] if layer is not None else None
            gates, ups, downs = _expert_lists(per_expert, f"{source_slot}.{EXPERTS}", count)
            gate_up = [torch.cat([g, u]) for g, u in zip(gates, ups, strict=True)]
            out[f"{experts}.{FUSED_GATE_UP}"] = torch.stack(gate_up)
            out[f"{experts}.{DOWN_PROJECTIONS[0]}"] = torch.stack(downs)
        return out


def _expert_lists(
    per_expert: dict[str, dict[int, torch.Tensor]], prefix: str, count: int | None
) -> list[list[torch.Tensor]]:
    """[gates, ups, downs], each over experts 0..count-1 (default: as many as found); a ModelError
    names the first missing or surplus checkpoint key (``prefix`` = the experts' key prefix)."""
    names = set(per_expert)
    layout = max(EXPERT_PROJECTIONS, key=lambda triple: len(names & set(triple)))
    if unknown := sorted(names - set(layout)):
        raise LayerTensorError(f"{prefix}.N.{unknown[0]}.weight", f"is unexpected next to {list(layout)}")
    if count is None:
        count = 1 + max(max(by_expert) for by_expert in per_expert.values())
    lists = []
    for name in layout:
        by_expert = per_expert.get(name, {})
        for e in range(count):
            if e not in by_expert:
                raise LayerTensorError(f"{prefix}.{e}.{name}.weight", "is missing from the checkpoint")
        if surplus := sorted(set(by_expert) - set(range(count))):
            raise LayerTensorError(
                f"{prefix}.{surplus[0]}.{name}.weight", f"is unexpected: the layer has {count} experts"
            )
        lists.append([by_expert[e] for e in range(count)])
    return lists


def sparse_layers(config) -> list[bool]:
    """Which layers hold a sparse MoE block, by transformers' Qwen-MoE rule."""
    mlp_only = set(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1) or 1
    experts = getattr(config, "num_experts", 0) or 0
    return [i not in mlp_only and experts > 0 and (i + 1) % step == 0 for i in range(config.num_hidden_layers)]


@dataclass(frozen=True)
class QwenMoeAdapter(MoeAdapter, QwenAdapter):
    """Qwen-MoE: the kind of each kept layer (sparse or dense) is written explicitly."""

    def prune_config(self, config, keep: list[int]) -> None:
        sparse = sparse_layers(config)
        super().prune_config(config, keep)
        config.mlp_only_layers = [new for new, old in enumerate(keep) if not sparse[old]]
        config.decoder_sparse_step = 1


MOE_FAMILY: tuple[Adapter, ...] = (
    MoeAdapter("mixtral", notes="every expert's down_proj (fused 3D in transformers 5) is a writer"),
    QwenMoeAdapter("qwen2_moe", notes="experts' and shared expert's down_proj are writers"),
    QwenMoeAdapter("qwen3_moe", notes="every expert's down_proj is a writer; dense layers' down_proj too"),
)
