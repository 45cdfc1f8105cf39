"""The source model run one piece at a time: the embedding, one decoder layer, the final norm and
head, each materialised on the device from the source files when it runs and released after.

The model's skeleton is built on the meta device (no memory), so the decoder's own forward still
builds the masks and rotary embeddings each layer receives; the layers' forwards are swapped for a
recorder during that one pass (``layer_inputs``). With ``resident`` weights every tensor is read
once and kept on the device; otherwise each slice is read from the safetensors files when needed.
The factors of a ``Variant`` (the folded compensation) are applied as tensors are materialised,
with the same adapter function the checkpoint writer uses, so what runs is what gets written.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from prunecomp_export.adapters import Adapter
from prunecomp_export.adapters.base import scaled
from prunecomp_export.engine.variant import dense_variant
from prunecomp_export.errors import ModelError
from prunecomp_export.output.tensor_surgery import check_source
from prunecomp_export.source.weights import SafetensorsCheckpoint


def layer_output(result) -> torch.Tensor:
    """Decoder layers return a tensor from transformers ~4.54 on, a tuple before."""
    return result[0] if isinstance(result, (tuple, list)) else result


class _StopForward(Exception):
    pass


def _release(module: nn.Module) -> None:
    """Swap every parameter back to the meta device (buffers, e.g. rotary tables, stay)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
    trim_host_memory()


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """No NaN or inf, checked a chunk at a time (isfinite on bf16 makes fp32 and bool copies)."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def trim_host_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed blocks of the sizes a layer's tensors
    have in its heap after the first few, so without this the process's RSS grows with every layer read."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


class LayerwiseModel:
    def __init__(
        self,
        source: SafetensorsCheckpoint,
        config,
        adapter: Adapter,
        device: torch.device,
        dtype: torch.dtype,
        *,
        resident: bool,
        attn_implementation: str | None = None,
        logits_chunk: int = 256,
    ):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.source, self.config, self.adapter = source, config, adapter
        self.device, self.dtype, self.resident = device, dtype, resident
        #: tokens the head is applied to at a time (its output never exists for a whole batch)
        self.logits_chunk = logits_chunk
        with init_empty_weights(include_buffers=False):
            self.skeleton = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=attn_implementation
            ).eval()
        for module in self.skeleton.modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
        self.num_layers = len(adapter.layers(self.skeleton))
        self.tied = bool(getattr(config, "tie_word_embeddings", False)) and adapter.lm_head_key not in source
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self._resident: dict[str, torch.Tensor] = {}
        self._loaded: dict[int, tuple] = {}  # resident mode: layer -> the (scale, map) its writers carry
        # Every tensor the model needs is in the files with the shape the config implies, and nothing
        # else, before anything runs (headers only): a missing layer must never run as random weights.
        check_source(source, config, adapter, dense_variant(self.num_layers), self.tied)
        if resident:
            self._resident = self._read_files(self.source.keys())

    def release(self) -> None:
        """Give back every weight this process holds (resident tensors, materialised modules, CUDA's
        cached blocks), before a child process needs the memory; a later use reads them again."""
        self._resident, self._loaded = {}, {}
        _release(self.skeleton)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- reading --------------------------------------------------------------------------------
    def layer_keys(self, index: int) -> list[str]:
        prefix = f"{self.adapter.layer_prefix}{index}."
        return [k for k in self.source if k.startswith(prefix)]

    def _read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if self.resident:
            if not self._resident:  # released: read every tensor again
                self._resident = self._read_files(self.source.keys())
            return {k: self._resident[k] for k in keys}
        return self._read_files(keys)

    def _read_files(self, keys: list[str]) -> dict[str, torch.Tensor]:
        tensors = self.source.tensors(keys, self.device)
        out = {}
        for key, tensor in tensors.items():
            if tensor.is_floating_point() and tensor.dtype != self.dtype:
                tensor = tensor.to(self.dtype)
            if tensor.is_floating_point() and not _all_finite(tensor):
                raise ModelError(f"{self.source.directory}: tensor {key!r} has non-finite values (NaN or inf)")
            out[key] = tensor
        return out

    # -- slices ---------------------------------------------------------------------------------
    @contextmanager
    def layer(
        self,
        original: int,
        scale: float = 1.0,
        position: int | None = None,
        output_map: torch.Tensor | None = None,
    ) -> Iterator[nn.Module]:
        """Decoder layer ``original`` with its residual writes scaled by ``scale`` and its MLP output
        multiplied by ``output_map`` (linear compensation), on the device."""
        module = self.adapter.layers(self.skeleton)[original]
        state = (scale, None if output_map is None else id(output_map))
        if self._loaded.get(original) != state:
            prefix = f"{self.adapter.layer_prefix}{original}."
            raw = {k.removeprefix(prefix): v for k, v in self._read(self.layer_keys(original)).items()}
            for key, tensor in raw.items():
                mapped = None if output_map is None else self.adapter.map_writer_tensor(key, tensor, output_map)
                if mapped is not None:
                    raw[key] = tensor = mapped
                if scale != 1.0 and (scaled := self.adapter.scale_writer_tensor(key, tensor, scale)) is not None:
                    raw[key] = scaled
            try:
                module.load_state_dict(self.adapter.layer_module_tensors(raw, module), strict=True, assign=True)
            except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
                message = " ".join(str(exc).split())[:300]
                raise ModelError(
                    f"{self.source.directory}: layer {original} does not match the config: {message}"
                ) from None
            if self.resident:
                self._loaded[original] = state
        self.adapter.set_layer_index(module, original if position is None else position)
        try:
            yield module
        finally:
            if not self.resident:
                _release(module)

    def _load_embedding(self, scale: float) -> nn.Module:
        embedding = self.adapter.embedding(self.skeleton)
        weight = self._read([self.adapter.embedding_key])[self.adapter.embedding_key]
        weight = scaled(weight, scale) if scale != 1.0 else weight
        embedding.load_state_dict({"weight": weight}, strict=False, assign=True)
        return embedding

    @contextmanager
    def head(self, embedding_scale: float = 1.0, untie: bool = False) -> Iterator[nn.Module]:
        """Final norm and LM head as one callable: stream entering the final norm -> fp32 logits.
        A tied head is the embedding matrix, scaled with it unless the variant unties it."""
        norm = self.adapter.final_norm(self.skeleton)
        prefix = self.adapter.final_norm_prefix
        keys = [k for k in self.source if k.startswith(prefix)]
        norm.load_state_dict({k.removeprefix(prefix): v for k, v in self._read(keys).items()}, assign=True)
        head_key = self.adapter.embedding_key if self.tied else self.adapter.lm_head_key
        weight = self._read([head_key])[head_key]
        if self.tied and not untie:
            weight = scaled(weight, embedding_scale)
        softcap = self.softcap

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            out = F.linear(norm(hidden), weight).float()
            return torch.tanh(out / softcap) * softcap if softcap else out

        try:
            yield logits
        finally:
            if not self.resident:
                _release(norm)

    @torch.no_grad()
    def layer_inputs(self, input_ids: torch.Tensor, embedding_scale: float = 1.0) -> tuple[torch.Tensor, list[dict]]:
        """The embedded batch and, per original layer, the keyword arguments the decoder passes it
        (masks, rotary embeddings), from one pass of the decoder with every layer replaced by a recorder."""
        layers = self.adapter.layers(self.skeleton)
        recorded: list[dict] = [{} for _ in layers]
        first: list[torch.Tensor] = []

        def recorder(index: int):
            def forward(hidden_states, *args, **kwargs):
                if args:
                    raise TypeError("decoder layers are expected to receive everything but the stream by keyword")
                if index == 0:
                    first.append(hidden_states)
                recorded[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if index == len(layers) - 1:
                    raise _StopForward
                return hidden_states

            return forward

        embedding = self._load_embedding(embedding_scale)
        for index, layer in enumerate(layers):
            layer.forward = recorder(index)
        try:
            self.adapter.decoder(self.skeleton)(input_ids=input_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for layer in layers:
                del layer.forward
            if not self.resident:
                _release(embedding)
        return first[0], recorded
