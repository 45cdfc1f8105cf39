"""The decoder exported with ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), for
the families onnxruntime-genai's model builder does not cover and for the TensorRT engine.

It is the exporter that is right with transformers 5.x: the TorchScript tracer turns the masking
code's Python decisions ("no padding in the example, so skip the mask"; SDPA's ``is_causal``) into
constants of the graph, so a model traced on an unpadded example silently ignores padding later.
Under torch.export transformers keeps the mask computation in the graph. The exported module is a
small wrapper that takes and returns flat tensors (``past_key_values.{i}.key|value`` in,
``present.{i}.key|value`` out, the names onnxruntime-genai uses) and builds a ``DynamicCache`` inside
``forward``, so no cache object crosses the export boundary.

Every cache layer is a full (non-sliding) layer, also for sliding-window models: the sliding
window is then applied by the attention mask alone, which computes what transformers computes with
its cropped sliding caches (it drops only keys the mask hides) and keeps ``present`` length equal to
``past + seq`` for every layer, which a runtime can preallocate.

Weights always go to an external data file (``model.onnx.data``): required above protobuf's 2 GB
limit, and one layout for every model size. Host memory: the whole model in the export dtype, and
the exporter's traced copy and optimised graph beside it (the memory plan counts three fp32 copies).
``export`` runs in a child process of its own (``child.run_child``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from prunecomp_export.errors import ModelError, TargetUnavailable

ONNX_FILE = "model.onnx"
INSTALL_HINT = "pip install 'onnx>=1.23' 'onnxscript>=0.7' 'onnxruntime>=1.32'"
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def require_exporter() -> None:
    """Check what ``export`` needs (onnx, onnxscript), or say how to install it."""
    try:
        importlib.import_module("onnx")
        importlib.import_module("onnxscript")
    except ImportError as exc:
        raise TargetUnavailable(f"ONNX export needs onnx and onnxscript ({exc}): {INSTALL_HINT}") from exc


def load_hf_model(checkpoint: Path, dtype: str = "fp32"):
    """The checkpoint as an eval-mode transformers model, the export's source."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, TORCH_DTYPES[dtype]))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the checkpoint {checkpoint}: {exc}") from exc
    return model.eval()


def _make_wrapper(model):
    """A module with flat tensor inputs and outputs around a transformers causal LM."""
    import torch
    from transformers import DynamicCache

    num_layers = model.config.num_hidden_layers

    class FlatKVDecoder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, past):
            # No config: every layer a full DynamicLayer (see the module docstring on sliding windows).
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(num_layers)])
            out = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            flat = []
            for layer in out.past_key_values.layers:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return FlatKVDecoder(model).eval()


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the exported decoder (onnxruntime-genai's naming)."""
    kv = [f"{{}}.{i}.{part}" for i in range(num_layers) for part in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [n.format("past_key_values") for n in kv]
    outputs = ["logits"] + [n.format("present") for n in kv]
    return inputs, outputs


def kv_shape(config) -> tuple[int, int]:
    """(key/value heads, head dim) of the model's attention."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def export(checkpoint: str, onnx_dir: str, dtype: str = "fp32", opset: int = 20) -> dict[str, Any]:
    """Export the checkpoint to ``onnx_dir/model.onnx`` (+ ``model.onnx.data``) in ``dtype`` (fp16 and
    bf16 too: TensorRT takes precision from the graph); return what was written. Run in a child."""
    require_exporter()
    import torch

    started = time.perf_counter()
    checkpoint, onnx_dir = Path(checkpoint), Path(onnx_dir)
    model = load_hf_model(checkpoint, dtype)
    config = model.config
    num_layers = config.num_hidden_layers
    kv_heads, head_dim = kv_shape(config)
    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    wrapper = _make_wrapper(model)

    # Example sizes all different and > 1, so no dimension is specialised to 0/1 or tied to another.
    batch, seq, past_len = 2, 3, 5
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    attention_mask[1, :2] = 0
    position_ids = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = tuple(
        torch.randn(batch, kv_heads, past_len, head_dim, generator=generator).to(torch_dtype)
        for _ in range(2 * num_layers)
    )
    dynamic_shapes = (
        {0: "batch", 1: "seq"},
        {0: "batch", 1: "total"},
        {0: "batch", 1: "seq"},
        tuple({0: "batch", 2: "past"} for _ in range(2 * num_layers)),
    )
    input_names, output_names = io_names(num_layers)
    onnx_dir.mkdir(parents=True, exist_ok=True)
    path = onnx_dir / ONNX_FILE
    # The exporter prints its progress, logs that torchvision ops are skipped and warns that
    # same-constraint axes share a name: keep the CLI's output clean (errors still raise).
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", message=".*axis name", category=UserWarning)
            warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
            torch.onnx.export(
                wrapper,
                (input_ids, attention_mask, position_ids, past),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                external_data=True,
                optimize=True,
                verbose=False,
            )
    finally:
        registration_log.setLevel(level)
    _name_total_length(path, num_layers)
    files = sorted(p.name for p in onnx_dir.iterdir())
    return {
        "exporter": "torch.onnx.export(dynamo=True)",
        "torch": torch.__version__,
        "onnx": importlib.metadata.version("onnx"),
        "onnxscript": importlib.metadata.version("onnxscript"),
        "opset": opset,
        "dtype": dtype,
        "external_data": True,
        "files": files,
        "bytes": sum((onnx_dir / f).stat().st_size for f in files),
        "num_layers": num_layers,
        "inputs": [*input_names[:3], "past_key_values.{i}.key", "past_key_values.{i}.value"],
        "outputs": [*output_names[:1], "present.{i}.key", "present.{i}.value"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def _name_total_length(path: Path, num_layers: int) -> None:
    """Call the presents' length axis ``total`` (the exporter writes ``past + seq``/``seq + past``)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # initializers keep their external refs
    _, outputs = io_names(num_layers)
    for value in model.graph.output:
        if value.name in outputs[1:]:
            value.type.tensor_type.shape.dim[2].dim_param = "total"
    onnx.save(model, str(path))
