"""The adapter interface, with the behaviour shared by every pre-norm decoder family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from prunecomp_export.errors import ModelError


class LayerTensorError(ModelError):
    """A layer's checkpoint tensor that is missing or cannot be used; ``key`` is relative to the layer,
    so the caller, who knows the layer, can name the full checkpoint key."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"tensor {key!r} {problem}")


#: the leaves of a linear writer that carry its output: scaling both scales what it writes
LINEAR_LEAVES = ("weight", "bias")


@torch.no_grad()
def scaled(tensor: torch.Tensor, factor: float, chunk: int = 1 << 22, *, inplace: bool = False) -> torch.Tensor:
    """``tensor * factor`` computed in fp32 and rounded once to the tensor's dtype, ``chunk`` elements
    at a time (an fp32 copy of a whole 128k-vocabulary embedding would double its memory); ``inplace``
    overwrites a contiguous ``tensor`` the caller owns instead of allocating the result."""
    source = tensor.detach().contiguous().reshape(-1)
    out = (
        tensor
        if inplace and tensor.is_contiguous()
        else torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    )
    flat = out.reshape(-1)
    for start in range(0, source.numel(), chunk):
        flat[start : start + chunk] = (source[start : start + chunk].float() * factor).to(tensor.dtype)
    return out


@torch.no_grad()
def mapped(tensor: torch.Tensor, t: torch.Tensor, bias: bool) -> torch.Tensor:
    """A writer's weight or bias with its output multiplied by the d x d map ``t``: for y = W x + b,
    y T = (T^T W) x + b T. Weights may carry leading dimensions (fused experts [E, d, inter]);
    computed in fp32, rounded once to the tensor's dtype."""
    t = t.to(device=tensor.device, dtype=torch.float32)
    out = tensor.float() @ t if bias else t.T @ tensor.float()
    return out.to(tensor.dtype)


@torch.no_grad()
def scale_parameter_(param: torch.Tensor, factor: float) -> None:
    """Multiply in fp32 and store back in the parameter's dtype (one rounding, not two)."""
    param.copy_(scaled(param, factor))


@dataclass(frozen=True)
class Adapter:
    """Describes one architecture family to the engine.

    The default methods fit pre-norm decoders laid out like Llama: ``model.model.layers``, an
    ``embed_tokens`` embedding, a final ``model.model.norm``, and residual writers ``o_proj`` (in
    ``self_attn``) and ``down_proj`` (in ``mlp``). Families that differ override methods.
    """

    model_type: str
    #: submodules of a decoder layer whose outputs are added to the residual stream
    writer_paths: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    notes: str = ""
    #: the MLP's residual writer, into which a linear compensation map is folded
    mlp_writer_path: ClassVar[str] = "mlp.down_proj"

    # -- checkpoint keys (as transformers' save_pretrained writes them) ----------------------------
    layer_prefix: ClassVar[str] = "model.layers."
    embedding_key: ClassVar[str] = "model.embed_tokens.weight"
    lm_head_key: ClassVar[str] = "lm_head.weight"
    final_norm_prefix: ClassVar[str] = "model.norm."
    final_norm_keys: ClassVar[tuple[str, ...]] = (f"{final_norm_prefix}weight",)

    def non_layer_keys(self) -> tuple[str, ...]:
        """Every checkpoint key outside the decoder layers (``lm_head_key`` is absent when tied)."""
        return (self.embedding_key, *self.final_norm_keys, self.lm_head_key)

    def split_layer_key(self, key: str) -> tuple[int, str] | None:
        """``model.layers.12.mlp.down_proj.weight`` -> ``(12, "mlp.down_proj.weight")``; None outside layers."""
        if not key.startswith(self.layer_prefix):
            return None
        index, _, rest = key[len(self.layer_prefix) :].partition(".")
        return (int(index), rest) if index.isdigit() and rest else None

    def layer_key(self, index: int, key: str) -> str:
        return f"{self.layer_prefix}{index}.{key}"

    def scale_writer_tensor(self, key: str, tensor: torch.Tensor, factor: float) -> torch.Tensor | None:
        """``tensor`` (checkpoint ``key``, relative to its layer) with its residual write scaled by
        ``factor`` (fp32, one rounding), or None when it is not a residual writer of this family.
        Same writers as ``scale_residual_writes``: a writer path's weight and bias."""
        path, _, leaf = key.rpartition(".")
        if path in self.writer_paths and leaf in LINEAR_LEAVES:
            return scaled(tensor, factor)
        return None

    def map_writer_tensor(self, key: str, tensor: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        """``tensor`` (checkpoint ``key``, relative to its layer) with the MLP's write multiplied by the
        d x d map ``t``, or None when it is not the MLP's residual writer."""
        path, _, leaf = key.rpartition(".")
        if path == self.mlp_writer_path and leaf in LINEAR_LEAVES:
            return mapped(tensor, t, bias=leaf == "bias")
        return None

    def output_map_refusal(self) -> str | None:
        """Why this family cannot take a linear compensation map, or None when it can."""
        return None

    def mlp_output_module(self, layer: nn.Module) -> nn.Module:
        """The module whose output is exactly what the MLP adds to the residual stream."""
        return layer.mlp

    def layer_module_tensors(
        self, tensors: dict[str, torch.Tensor], layer: nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """One layer's checkpoint tensors (keys relative to the layer) as the layer module's
        ``state_dict`` keys, for ``layer.load_state_dict(..., assign=True, strict=True)``. The
        checkpoint layout is the module's for every family but the MoE ones (see moe.py)."""
        return dict(tensors)

    # -- where things are ---------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def embedding(self, model: nn.Module) -> nn.Embedding:
        return self.decoder(model).embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.decoder(model).norm

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return model.lm_head

    def residual_writers(self, layer: nn.Module) -> list[nn.Linear]:
        """Modules whose outputs are added to the residual stream (scaling them scales the write)."""
        return [layer.get_submodule(path) for path in self.writer_paths]

    def embeddings_tied(self, model: nn.Module) -> bool:
        return self.embedding(model).weight is self.lm_head(model).weight

    # -- compensation -------------------------------------------------------------------------
    def scale_embedding(self, model: nn.Module, factor: float) -> None:
        """Scale the stream at its source. Exact for pre-norm layers: each reads it through a norm."""
        scale_parameter_(self.embedding(model).weight, factor)

    def scale_residual_writes(self, layer: nn.Module, factor: float) -> None:
        """Scale everything a layer adds to the stream: the writers' weights and biases."""
        for writer in self.residual_writers(layer):
            for leaf in LINEAR_LEAVES:
                if (tensor := getattr(writer, leaf, None)) is not None:
                    scale_parameter_(tensor, factor)

    # -- surgery ------------------------------------------------------------------------------
    def set_layer_index(self, layer: nn.Module, index: int) -> None:
        """KV caches are indexed by each attention's ``layer_idx``: it must follow the new order."""
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index

    def prune_config(self, config, keep: list[int]) -> None:
        """Make the config describe only the kept layers (original indices, in order)."""
        old = config.num_hidden_layers
        for name, value in list(vars(config).items()):
            if isinstance(value, (list, tuple)) and len(value) == old and not name.startswith("_"):
                setattr(config, name, type(value)(value[i] for i in keep))
        config.num_hidden_layers = len(keep)

    def untie_embeddings(self, model: nn.Module) -> None:
        """Give the LM head its own copy of the embedding so scaling one leaves the other."""
        head = self.lm_head(model)
        head.weight = nn.Parameter(self.embedding(model).weight.detach().clone())
        self.untie_config(model.config)

    def untie_config(self, config) -> None:
        """The config of a model whose LM head has its own weight (also in a text sub-config)."""
        config.tie_word_embeddings = False
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False
