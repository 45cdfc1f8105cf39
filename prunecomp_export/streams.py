"""The residual stream at every layer boundary for the calibration batches.

One full forward captures, for each batch, the input of every decoder layer and of the final
norm, plus the keyword arguments each layer was called with (masks, rotary embeddings). After a
layer is removed only the layers after the gap are run again: the stream before the gap is either
untouched (post-gap fold) or exactly alpha times the cached one (pre-gap fold, up to the RMSNorm
epsilon), so it is rescaled instead of recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prunecomp_export.adapters import Adapter
from prunecomp_export.progress import Reporter


def layer_output(result) -> torch.Tensor:
    """Decoder layers return a tensor from transformers ~4.54 on, a tuple before."""
    return result[0] if isinstance(result, (tuple, list)) else result


@dataclass
class ResidualStreams:
    model: nn.Module
    adapter: Adapter
    batches: list[torch.Tensor]
    #: states[b][k]: input of current layer k for batch b; states[b][-1] is the final norm's input
    states: list[list[torch.Tensor]] = field(default_factory=list)
    #: layer_kwargs[b][k]: the keyword arguments current layer k receives for batch b
    layer_kwargs: list[list[dict]] = field(default_factory=list)
    layer_forwards: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.adapter.layers(self.model))

    def full_forward_cost(self) -> int:
        """Layer-forwards of one full forward of the current model over all batches."""
        return self.num_layers * len(self.batches)

    @torch.no_grad()
    def capture(self, reporter: Reporter | None = None) -> None:
        """Run the model once over every batch, recording each layer's input and call kwargs."""
        self.states, self.layer_kwargs = [], []
        layers = list(self.adapter.layers(self.model))
        for input_ids in (reporter or Reporter()).track(self.batches, "calibration batches"):
            inputs: list[torch.Tensor | None] = [None] * (len(layers) + 1)
            kwargs: list[dict] = [{}] * len(layers)
            handles = []
            for k, layer in enumerate(layers):
                handles.append(layer.register_forward_pre_hook(self._recorder(k, inputs, kwargs), with_kwargs=True))
            handles.append(self.adapter.final_norm(self.model).register_forward_pre_hook(self._final_recorder(inputs)))
            try:
                self.adapter.decoder(self.model)(input_ids=input_ids, use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
            self.states.append(inputs)  # type: ignore[arg-type]
            self.layer_kwargs.append(kwargs)
            self.layer_forwards += len(layers)

    @staticmethod
    def _recorder(k: int, inputs: list, kwargs: list):
        def hook(_module, args, kw):
            hidden = args[0] if args else kw["hidden_states"]
            inputs[k] = hidden.detach()
            kwargs[k] = {name: value for name, value in kw.items() if name != "hidden_states"}

        return hook

    @staticmethod
    def _final_recorder(inputs: list):
        def hook(_module, args):
            inputs[-1] = args[0].detach()

        return hook

    def boundary(self, k: int) -> list[torch.Tensor]:
        """The stream entering current layer k (k == num_layers: entering the final norm), per batch."""
        return [states[k] for states in self.states]

    @torch.no_grad()
    def run_layers(self, batch: int, start: int, hidden: torch.Tensor, skip: int | None = None) -> torch.Tensor:
        """Run current layers start..end on ``hidden`` for one batch (optionally bypassing one)."""
        layers = self.adapter.layers(self.model)
        for k in range(start, len(layers)):
            if k == skip:
                continue
            hidden = layer_output(layers[k](hidden, **self.layer_kwargs[batch][k]))
            self.layer_forwards += 1
        return hidden

    @torch.no_grad()
    def after_removal(self, index: int, count: int = 1, scale_before: float = 1.0) -> None:
        """Update the cache after layers index..index+count-1 were deleted from the model.

        ``scale_before`` is alpha for the pre-gap fold (the stream before the gap grows by alpha),
        1 for the post-gap fold. Only the layers after the gap are recomputed.
        """
        for b, states in enumerate(self.states):
            del states[index + 1 : index + 1 + count]
            del self.layer_kwargs[b][index : index + count]
            if scale_before != 1.0:
                for k in range(index + 1):
                    states[k] = (states[k].float() * scale_before).to(states[k].dtype)
            hidden = states[index]
            layers = self.adapter.layers(self.model)
            for k in range(index, len(layers)):
                hidden = layer_output(layers[k](hidden, **self.layer_kwargs[b][k]))
                self.layer_forwards += 1
                states[k + 1] = hidden

    @torch.no_grad()
    def lm_loss(self, final_streams: list[torch.Tensor] | None = None) -> float:
        """Mean next-token NLL of the calibration tokens, from the streams entering the final norm."""
        finals = final_streams if final_streams is not None else self.boundary(self.num_layers)
        total, count = 0.0, 0
        for input_ids, hidden in zip(self.batches, finals, strict=True):
            total_b, count_b = token_nll(self.model, self.adapter, hidden, input_ids)
            total += total_b
            count += count_b
        return total / count


def token_nll(
    model: nn.Module, adapter: Adapter, final_stream: torch.Tensor, input_ids: torch.Tensor
) -> tuple[float, int]:
    """Sum of next-token NLL (fp32) and the token count, from the stream entering the final norm."""
    logits = adapter.lm_head(model)(adapter.final_norm(model)(final_stream)).float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="sum")
    return nll.item(), input_ids[:, 1:].numel()
