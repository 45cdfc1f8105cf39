"""Write a pruned checkpoint straight from the source's safetensors files, one shard at a time.

The model is never built: a 70B source does not fit in memory, and it need not. A ``Variant`` says
everything the pruned checkpoint is (which original layers stay, in which order, and the factor on
each kept layer's residual writes and on the embedding), so each output tensor is one source tensor,
renamed and perhaps multiplied once in fp32. Output shards are planned from the source headers and
streamed tensor by tensor (``safetensors_stream``): peak memory is one tensor and its scaled copy.

The result is what the in-memory route (``engine.replay`` then ``checkpoint.save_checkpoint``) writes,
up to rounding: that route rounds to the stored dtype after every step, this one once
(tests/test_tensor_surgery.py compares both, tensor by tensor and by logits).
"""

from __future__ import annotations

import copy
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from prunecomp_export.adapters import Adapter
from prunecomp_export.adapters.base import LayerTensorError, scaled
from prunecomp_export.engine.variant import Variant
from prunecomp_export.errors import ModelError
from prunecomp_export.output.checkpoint import compatible_config
from prunecomp_export.output.outputdir import safetensors_write_errors
from prunecomp_export.output.safetensors_stream import DTYPES, Entry, SafetensorsWriter
from prunecomp_export.recipe import parse_size
from prunecomp_export.source.weights import INDEX, SINGLE, SafetensorsCheckpoint

#: files copied from the source directory when present (tokenizer, chat template, generation defaults)
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def source_is_tied(config) -> bool:
    """Whether the source's LM head is the embedding (then save_pretrained wrote no lm_head)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def write_variant_checkpoint(
    source: SafetensorsCheckpoint,
    config,
    adapter: Adapter,
    variant: Variant,
    out_dir: Path,
    max_shard_size: int | str = "5GB",
) -> list[Path]:
    """Write ``variant`` of ``source`` (config: the source's transformers config) to ``out_dir`` as a
    plain transformers checkpoint: weights, config.json, and the source's tokenizer/generation files.
    Returns the weight files written. Everything is checked (a kept layer missing a tensor, a key the
    model does not have) before the first byte is written: such a checkpoint must never ship.

    Tied source (config.tie_word_embeddings, no lm_head in the files): with ``variant.untie`` the head
    is written as the UNSCALED embedding and the config untied; without it no head is written, so a
    scaled embedding scales the logits too (the ``scale_tied`` option). ``untie`` means nothing for an
    untied source. ``out_dir`` is written in place (stage it, e.g. ``checkpoint.staged_directory``)."""
    limit = parse_size(max_shard_size)
    out_dir = Path(out_dir)
    tied = source_is_tied(config)
    check_source(source, config, adapter, variant, tied)
    if out_dir.exists() and (list(out_dir.glob("*.safetensors")) or (out_dir / INDEX).exists()):
        raise FileExistsError(f"{out_dir} already holds safetensors weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan(source, adapter, variant, tied)
    shards = _split(plan, limit)
    names = (
        [SINGLE]
        if len(shards) == 1
        else [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    )
    tag = uuid.uuid4().hex[:8]
    written: list[Path] = []
    try:
        for number, shard in enumerate(shards):
            partial = out_dir / f".shard-{tag}-{number:05d}.tmp"
            written.append(partial)
            with safetensors_write_errors(partial), SafetensorsWriter(partial, [i.entry for i in shard]) as out:
                for item in shard:
                    out.write(item.entry.name, item.produce(source, adapter, variant))
        files = [path.replace(out_dir / name) for path, name in zip(written, names, strict=True)]
        written = files
        if len(shards) > 1:
            _write_index(out_dir, shards, names)
        _write_config(config, adapter, variant, tied, out_dir)
    except BaseException:
        for path in [*written, out_dir / INDEX]:
            path.unlink(missing_ok=True)
        raise
    for name in AUX_FILES:
        if (source.directory / name).is_file():
            shutil.copy2(source.directory / name, out_dir / name)
    return files


@dataclass(frozen=True)
class _Output:
    """One output tensor: the source tensor it comes from and what is done to it."""

    entry: Entry
    source_key: str
    layer_key: str | None = None  # the key inside the layer, for a kept layer's tensor
    position: int | None = None  # the kept layer's new index
    embedding_scale: float = 1.0

    def produce(self, source: SafetensorsCheckpoint, adapter: Adapter, variant: Variant) -> torch.Tensor:
        tensor = source.tensor(self.source_key)  # a copy: the shard's memory map is not kept alive
        if self.position is not None:
            output_map = variant.output_map_of(variant.kept[self.position])
            mapped = None if output_map is None else adapter.map_writer_tensor(self.layer_key, tensor, output_map)
            if mapped is not None:
                tensor = mapped
            factor = variant.writer_scale[self.position]
            if factor != 1.0 and (out := adapter.scale_writer_tensor(self.layer_key, tensor, factor)) is not None:
                return out
        elif self.embedding_scale != 1.0:
            return scaled(tensor, self.embedding_scale, inplace=True)  # the tensor is our own copy
        return tensor


def _plan(source: SafetensorsCheckpoint, adapter: Adapter, variant: Variant, tied: bool) -> list[_Output]:
    """Every output tensor in source order, with its dtype and shape from the source headers."""
    position = {original: new for new, original in enumerate(variant.kept)}
    headers = source.headers()
    plan = []
    for key, (dtype, shape) in headers.items():
        layer = adapter.split_layer_key(key)
        if layer is not None:
            if layer[0] in position:  # a removed layer's tensors are never read
                new = position[layer[0]]
                plan.append(_Output(Entry(adapter.layer_key(new, layer[1]), dtype, shape), key, layer[1], new))
        elif key == adapter.lm_head_key and tied:
            continue  # transformers ties it to the embedding on load; untie writes it below
        elif key == adapter.embedding_key:
            if tied and variant.untie:  # the head keeps the unscaled embedding
                plan.append(_Output(Entry(adapter.lm_head_key, dtype, shape), key))
            plan.append(_Output(Entry(key, dtype, shape), key, embedding_scale=variant.embedding_scale))
        else:
            plan.append(_Output(Entry(key, dtype, shape), key))
    return sorted(plan, key=lambda item: _natural(item.entry.name))


def _natural(name: str) -> tuple:
    """model.layers.2 before model.layers.10; the embedding first, the head last."""
    parts = name.replace("lm_head", "~lm_head").split(".")
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts)


def _split(plan: list[_Output], limit: int) -> list[list[_Output]]:
    """Shards of at most ``limit`` bytes, in order (a larger tensor gets a shard of its own)."""
    shards: list[list[_Output]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item.entry.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.entry.nbytes
    return shards


def _write_index(out_dir: Path, shards: list[list[_Output]], names: list[str]) -> None:
    entries = [item.entry for shard in shards for item in shard]
    parameters = sum(entry.nbytes // DTYPE_SIZES[entry.dtype] for entry in entries)
    index = {
        "metadata": {"total_parameters": parameters, "total_size": sum(entry.nbytes for entry in entries)},
        "weight_map": {item.entry.name: name for shard, name in zip(shards, names, strict=True) for item in shard},
    }
    (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def check_source(source: SafetensorsCheckpoint, config, adapter: Adapter, variant: Variant, tied: bool) -> None:
    """Every kept layer has exactly the tensors (names and shapes) its module expects, so do the
    embedding, final norm and head, and nothing else is in the files. The expectation is the
    model's own: a layer built on the meta device
    (no memory), loaded with ``adapter.layer_module_tensors`` of the checkpoint's header shapes."""
    from transformers import AutoModelForCausalLM

    where = source.directory
    if variant.num_layers != config.num_hidden_layers:
        raise ModelError(f"{where}: the variant has {variant.num_layers} layers, the config {config.num_hidden_layers}")
    if list(variant.kept) != sorted(set(variant.kept)) or not all(0 <= i < variant.num_layers for i in variant.kept):
        raise ModelError(f"variant {variant.name!r}: kept layers {list(variant.kept)} are not increasing and in range")
    shapes = {key: torch.Size(shape) for key, (_dtype, shape) in source.headers().items()}
    by_layer: dict[int, dict[str, torch.Size]] = {}
    for key, shape in shapes.items():
        layer = adapter.split_layer_key(key)
        if layer is None:
            if key not in adapter.non_layer_keys():
                raise ModelError(f"{where}: unexpected tensor {key!r} (not a layer, embedding, final norm or head)")
        elif layer[0] >= variant.num_layers:
            raise ModelError(f"{where}: unexpected tensor {key!r}: the config has {variant.num_layers} layers")
        else:
            by_layer.setdefault(layer[0], {})[layer[1]] = shape
    required = [adapter.embedding_key, *adapter.final_norm_keys] + ([] if tied else [adapter.lm_head_key])
    if missing := [key for key in required if key not in shapes]:
        raise ModelError(f"{where}: tensor {missing[0]!r} is missing from the checkpoint")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    expected_outside = meta.state_dict()
    for key in required:
        if key in expected_outside and shapes[key] != expected_outside[key].shape:
            raise ModelError(
                f"{where}: tensor {key!r} has shape {list(shapes[key])}, the model expects "
                f"{list(expected_outside[key].shape)}"
            )
    layers = adapter.layers(meta)
    for j in variant.kept:
        prefix = adapter.layer_prefix + str(j)
        found = {rel: torch.empty(shape, device="meta") for rel, shape in by_layer.get(j, {}).items()}
        try:
            converted = adapter.layer_module_tensors(found, layers[j])
        except LayerTensorError as exc:
            raise ModelError(f"{where}: tensor '{prefix}.{exc.key}' {exc.problem}") from None
        expected = layers[j].state_dict()
        if missing := sorted(set(expected) - set(converted)):
            raise ModelError(f"{where}: tensor '{prefix}.{missing[0]}' is missing from the checkpoint")
        if unexpected := sorted(set(converted) - set(expected)):
            raise ModelError(f"{where}: unexpected tensor '{prefix}.{unexpected[0]}' (the layer has no such weight)")
        for name, tensor in expected.items():
            if converted[name].shape != tensor.shape:
                raise ModelError(
                    f"{where}: tensor '{prefix}.{name}' has shape {list(converted[name].shape)}, "
                    f"the model expects {list(tensor.shape)}"
                )


def _write_config(config, adapter: Adapter, variant: Variant, tied: bool, out_dir: Path) -> None:
    """The source config describing the kept layers, written like ``checkpoint.save_checkpoint``."""
    config = copy.deepcopy(config)
    if not getattr(config, "architectures", None):
        # configs read from GGUF name no class; runtimes (vLLM, onnxruntime-genai) dispatch on it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    adapter.prune_config(config, list(variant.kept))
    if tied and variant.untie:
        adapter.untie_config(config)
    config.save_pretrained(out_dir)
    path = out_dir / "config.json"
    path.write_text(json.dumps(compatible_config(json.loads(path.read_text())), indent=2, sort_keys=True) + "\n")


DTYPE_SIZES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in DTYPES.items()}
