"""The adapter interface, with the behaviour shared by every pre-norm decoder family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@torch.no_grad()
def scale_parameter_(param: torch.Tensor, factor: float) -> None:
    """Multiply in fp32 and store back in the parameter's dtype (one rounding, not two)."""
    param.copy_((param.float() * factor).to(param.dtype))


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
            scale_parameter_(writer.weight, factor)
            if getattr(writer, "bias", None) is not None:
                scale_parameter_(writer.bias, factor)

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
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
