"""The ``onnx`` target: an ONNX decoder with KV cache, proven in ONNX Runtime against the checkpoint.

Export path: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript). It is the one
that is right with transformers 5.x: the TorchScript tracer turns the masking code's Python
decisions ("no padding in the example, so skip the mask"; SDPA's ``is_causal``) into constants of
the graph, so a model traced on an unpadded example silently ignores padding later. Under
torch.export transformers keeps the mask computation in the graph. The exported module is a small
wrapper that takes and returns flat tensors (``past_key_values.{i}.key|value`` in,
``present.{i}.key|value`` out, the names onnxruntime-genai uses) and builds a ``DynamicCache``
inside ``forward``, so no cache object crosses the export boundary.

Every cache layer is a full (non-sliding) layer, also for sliding-window models: the sliding
window is then applied by the attention mask alone, which computes what transformers computes with
its cropped sliding caches (it drops only keys the mask hides) and keeps ``present`` length equal to
``past + seq`` for every layer, which a runtime can preallocate.

Weights always go to an external data file (``model.onnx.data``): required above protobuf's 2 GB
limit, and one layout for every model size.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prunecomp_export.errors import ModelError, TargetUnavailable, ValidationFailed
from prunecomp_export.validation import FiniteFloat

ONNX_FILE = "model.onnx"
INSTALL_HINT = "pip install 'onnx>=1.23' 'onnxscript>=0.7' 'onnxruntime>=1.32'"
GENAI_INSTALL_HINT = "pip install 'onnxruntime-genai>=0.18'"
# Max abs logit difference allowed against the fp32 transformers model, per exported dtype. fp32
# differs from torch only by kernel summation order (SmolLM2-135M: < 1e-4 on logits of magnitude ~20;
# deeper, wider models accumulate more); fp16 weights and activations cost about three decimal digits.
DEFAULT_TOLERANCE = {"fp32": 5e-3, "fp16": 0.5, "bf16": 2.0}
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
NUMPY_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class ParityOptions(BaseModel):
    """Options of the parity check an exported decoder must pass against the checkpoint (the ``onnx``
    and ``tensorrt`` targets run the same check)."""

    model_config = ConfigDict(extra="forbid")

    opset: int = Field(20, ge=18, le=23, description="ONNX opset of the exported graph (dynamo exporter: 18+).")
    tolerance: FiniteFloat | None = Field(
        None, gt=0, description="Max abs logit difference vs the fp32 HF model; default per precision."
    )
    prompts: list[str] = Field(
        default_factory=lambda: [
            "The capital of France is",
            "Pruning whole decoder layers makes a language model smaller and faster, and",
        ],
        min_length=2,
        description="Validation prompts; the first two (different lengths) form the left-padded batch.",
    )
    max_prompt_tokens: int = Field(64, ge=2, description="Validation prompts are cut to this many tokens.")
    decode_steps: int = Field(2, ge=1, description="Cached decode steps checked after the prefill.")


class Options(ParityOptions):
    """Recipe options of the ``onnx`` target."""

    dtype: Literal["fp32", "fp16"] = Field("fp32", description="Precision of the exported weights and I/O.")
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="ONNX Runtime execution provider; auto = CUDA when available and a GPU is present.",
    )
    genai: bool = Field(True, description="Also build and check an onnxruntime-genai package in genai/.")
    genai_max_new_tokens: int = Field(16, ge=1, description="Greedy tokens compared between genai and HF.")

    @model_validator(mode="after")
    def _fp16_genai_needs_cuda(self) -> Options:
        if self.genai and self.dtype == "fp16" and self.provider == "cpu":
            raise ValueError("onnxruntime-genai's model builder has no FP16 CPU model: use genai: false or fp32")
        return self

    def resolved_tolerance(self) -> float:
        return self.tolerance if self.tolerance is not None else DEFAULT_TOLERANCE[self.dtype]


# --------------------------------------------------------------------------------------------
# runtime imports


def require_exporter() -> None:
    """Check what ``export_onnx`` needs (onnx, onnxscript), or say how to install it."""
    try:
        importlib.import_module("onnx")
        importlib.import_module("onnxscript")
    except ImportError as exc:
        raise TargetUnavailable(f"ONNX export needs onnx and onnxscript ({exc}): {INSTALL_HINT}") from exc


def require_onnx_runtime() -> tuple[Any, Any]:
    """Import onnx and onnxruntime, or say how to install them."""
    require_exporter()
    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise TargetUnavailable(f"the onnx target needs onnxruntime ({exc}): {INSTALL_HINT}") from exc
    return importlib.import_module("onnx"), ort


def require_genai() -> Any:
    """Import onnxruntime_genai, or say how to install it."""
    try:
        return importlib.import_module("onnxruntime_genai")
    except ImportError as exc:
        raise TargetUnavailable(
            f"onnx genai: onnxruntime-genai is missing ({exc}): {GENAI_INSTALL_HINT}, or set genai: false"
        ) from exc


def resolve_providers(requested: str) -> list[str]:
    """ONNX Runtime providers for ``requested`` (auto|cpu|cuda), CPU always last as the fallback."""
    _, ort = require_onnx_runtime()
    has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
    if requested == "cpu":
        return ["CPUExecutionProvider"]
    gpu = _gpu_present()
    if requested == "cuda" and not (has_cuda_ep and gpu):
        why = "no NVIDIA GPU is visible" if not gpu else "this onnxruntime build has no CUDAExecutionProvider"
        raise TargetUnavailable(
            f"onnx provider cuda: {why} (on a CUDA machine: pip uninstall onnxruntime && pip install onnxruntime-gpu)"
        )
    if has_cuda_ep and gpu:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _gpu_present() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# --------------------------------------------------------------------------------------------
# export


def load_hf_model(checkpoint: Path, dtype: str = "fp32", device: str = "cpu"):
    """The checkpoint as an eval-mode transformers model (the reference and the export source)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, TORCH_DTYPES[dtype]))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the checkpoint {checkpoint}: {exc}") from exc
    return model.to(device).eval()


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


def export_onnx(
    checkpoint: Path, onnx_dir: Path, *, dtype: str = "fp32", opset: int = 20, model=None
) -> dict[str, Any]:
    """Export the checkpoint to ``onnx_dir/model.onnx`` (+ ``model.onnx.data``); return what was written.

    ``model`` may be a model already loaded in ``dtype`` (saves a load); TensorRT reuses this with
    fp16/bf16 since TensorRT 11 takes precision from the graph, not from builder flags.
    """
    require_exporter()
    import torch

    started = time.perf_counter()
    if model is None:
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


# --------------------------------------------------------------------------------------------
# running the exported decoder


class OrtDecoder:
    """The exported decoder in an ONNX Runtime session, called with numpy arrays."""

    def __init__(self, onnx_path: Path, providers: list[str]):
        _, ort = require_onnx_runtime()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        inputs = self.session.get_inputs()
        self.past_names = [i.name for i in inputs if i.name.startswith("past_key_values.")]
        first = next(i for i in inputs if i.name in self.past_names)
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = NUMPY_DTYPES[first.type]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def __call__(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (float32) and the present key/values; ``past=None`` means an empty cache."""
        batch = input_ids.shape[0]
        if past is None:
            empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
            past = [empty] * len(self.past_names)
        feed = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
            "position_ids": position_ids.astype(np.int64),
            **dict(zip(self.past_names, past, strict=True)),
        }
        logits, *presents = self.session.run(self.output_names, feed)
        return logits.astype(np.float32), presents


# --------------------------------------------------------------------------------------------
# validation


def max_abs_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    """Max abs difference; inf when either side has a NaN/inf, so a broken runtime cannot pass."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValidationFailed(f"logits shape {actual.shape} differs from the reference's {expected.shape}")
    if actual.size == 0:
        raise ValidationFailed("no logits to compare")
    if not (np.isfinite(actual).all() and np.isfinite(expected).all()):
        return math.inf
    return float(np.abs(actual - expected).max())


def tokenize_prompts(checkpoint: Path, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids of the validation prompts with the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as exc:
        raise ModelError(f"the checkpoint {checkpoint} has no tokenizer for the validation prompts: {exc}") from exc
    ids = [tokenizer(p)["input_ids"][:max_tokens] for p in prompts]
    if any(len(i) == 0 for i in ids):
        raise ModelError("a validation prompt tokenizes to no tokens")
    return ids


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded ids, mask and position ids (pads at position 1, as transformers' generate does)."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
    return ids, mask, positions


def hf_logits(model, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Logits of the transformers model on the full sequence, no cache (the independent reference)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids, device=device),
            attention_mask=torch.as_tensor(mask, device=device),
            position_ids=torch.as_tensor(positions, device=device),
            use_cache=False,
        )
    return out.logits.float().cpu().numpy()


def check_parity(
    run: OrtDecoder,
    model,
    prompts: list[list[int]],
    *,
    tolerance: float,
    decode_steps: int = 1,
    pad_id: int = 0,
) -> dict[str, dict[str, Any]]:
    """Compare the runtime's logits with the transformers model's on the same inputs.

    Checks: prefill of the first prompt; ``decode_steps`` cached decode steps fed the runtime's own
    present tensors; a left-padded batch of the first two prompts (prefill at non-pad positions,
    then one cached decode step). The reference for cached steps is a cache-free forward pass over
    the whole sequence, so the runtime's cache handling is checked, not assumed. The next tokens
    are the reference's argmax, so both sides always see the same inputs.
    """
    checks: dict[str, dict[str, Any]] = {}

    def record(name: str, diff: float, tokens: int) -> None:
        checks[name] = {"max_abs_diff": diff, "tokens": tokens, "passed": bool(diff <= tolerance)}

    # (a) prefill, (b) cached decode
    prompt = np.asarray([prompts[0]], dtype=np.int64)
    length = prompt.shape[1]
    sequence = prompt
    positions = np.arange(length)[None]
    logits, presents = run(sequence, np.ones_like(sequence), positions)
    decode_logits = []
    # Reference logits for the whole sequence, extended as tokens are appended.
    for step in range(decode_steps):
        reference = hf_logits(model, sequence, np.ones_like(sequence), np.arange(sequence.shape[1])[None])
        if step == 0:
            record("prefill", max_abs_diff(logits, reference), length)
        next_token = reference[:, -1].argmax(-1)[:, None]
        sequence = np.concatenate([sequence, next_token], axis=1)
        total = sequence.shape[1]
        step_logits, presents = run(next_token, np.ones((1, total), np.int64), np.array([[total - 1]]), presents)
        decode_logits.append(step_logits[:, -1])
    reference = hf_logits(model, sequence, np.ones_like(sequence), np.arange(sequence.shape[1])[None])
    record("decode", max_abs_diff(np.stack(decode_logits, 1), reference[:, length:]), decode_steps)

    # (c) left-padded batch of two prompts of different lengths, then one cached decode step
    first, second = prompts[0], prompts[1]
    if len(first) == len(second):
        second = second[: len(second) - 1] if len(second) > 1 else second + second
    ids, mask, positions = left_pad([first, second], pad_id)
    logits, presents = run(ids, mask, positions)
    reference = hf_logits(model, ids, mask, positions)
    real = mask.astype(bool)
    prefill_diff = max_abs_diff(logits[real], reference[real])
    next_tokens = reference[:, -1].argmax(-1)[:, None]
    mask2 = np.concatenate([mask, np.ones_like(next_tokens)], axis=1)
    positions2 = positions[:, -1:] + 1
    step_logits, _ = run(next_tokens, mask2, positions2, presents)
    ids2 = np.concatenate([ids, next_tokens], axis=1)
    full_positions = np.concatenate([positions, positions2], axis=1)
    reference2 = hf_logits(model, ids2, mask2, full_positions)
    decode_diff = max_abs_diff(step_logits[:, -1], reference2[:, -1])
    record("padded_batch", max(prefill_diff, decode_diff), int(real.sum()) + 2)
    checks["padded_batch"].update(
        prefill_max_abs_diff=prefill_diff, decode_max_abs_diff=decode_diff, lengths=[len(first), len(second)]
    )
    return checks


def validate_onnx(
    checkpoint: Path,
    onnx_path: Path,
    options: Options,
    *,
    providers: list[str] | None = None,
    model=None,
) -> dict[str, Any]:
    """Run the parity checks of ``check_parity``; raise ``ValidationFailed`` if one exceeds the tolerance."""
    started = time.perf_counter()
    providers = providers or resolve_providers(options.provider)
    device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
    if model is None:
        model = load_hf_model(checkpoint, "fp32", device)
    _no_tf32()
    prompts = tokenize_prompts(checkpoint, options.prompts, options.max_prompt_tokens)
    run = OrtDecoder(onnx_path, providers)
    tolerance = options.resolved_tolerance()
    checks = check_parity(
        run,
        model,
        prompts,
        tolerance=tolerance,
        decode_steps=options.decode_steps,
        pad_id=_pad_id(model.config),
    )
    result = {
        "onnxruntime": importlib.metadata.version(_ort_distribution()),
        "providers": run.providers,
        "reference": f"transformers {importlib.metadata.version('transformers')} fp32 on {device}",
        "tolerance": tolerance,
        "checks": checks,
        "passed": all(c["passed"] for c in checks.values()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if not result["passed"]:
        failed = ", ".join(
            f"{name} max abs logit diff {c['max_abs_diff']:.3g}" for name, c in checks.items() if not c["passed"]
        )
        raise ValidationFailed(f"ONNX Runtime output differs from the checkpoint: {failed} > tolerance {tolerance:g}")
    return result


def _pad_id(config) -> int:
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _no_tf32() -> None:
    """The reference must be true fp32 on a GPU too."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _ort_distribution() -> str:
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    return "onnxruntime"


# --------------------------------------------------------------------------------------------
# onnxruntime-genai package


def build_genai(checkpoint: Path, genai_dir: Path, *, precision: str, execution_provider: str) -> dict[str, Any]:
    """Build an onnxruntime-genai package with its model builder (run as a subprocess: it prints a lot
    and keeps module state)."""
    require_genai()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prunecomp-genai-") as tmp:
        log_path = Path(tmp) / "builder.log"
        command = [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(checkpoint),
            "-o",
            str(genai_dir),
            "-p",
            precision,
            "-e",
            execution_provider,
            "-c",
            str(Path(tmp) / "cache"),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with open(log_path, "w") as log:
            completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        if completed.returncode != 0 or not (genai_dir / "genai_config.json").is_file():
            tail = log_path.read_text(errors="replace")[-2000:]
            raise ModelError(f"onnxruntime-genai's model builder failed (exit {completed.returncode}):\n{tail}")
    files = sorted(p.name for p in genai_dir.iterdir())
    return {
        "onnxruntime_genai": importlib.metadata.version(_genai_distribution()),
        "builder": f"onnxruntime_genai.models.builder -p {precision} -e {execution_provider}",
        "files": files,
        "seconds": round(time.perf_counter() - started, 1),
    }


def check_genai_greedy(checkpoint: Path, genai_dir: Path, model, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """Greedy tokens of the genai package vs transformers ``generate(do_sample=False)``.

    Both get the same prompt ids (the HF tokenizer's); the genai tokenizer is checked to produce the
    same ids. Sequences are compared up to the first end-of-sequence token.
    """
    import onnxruntime_genai as og
    import torch
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    prompt_ids = tokenizer(prompt)["input_ids"]
    og_model = og.Model(str(genai_dir))
    og_prompt_ids = [int(t) for t in og.Tokenizer(og_model).encode(prompt)]

    params = og.GeneratorParams(og_model)
    params.set_search_options(do_sample=False, num_beams=1, max_length=len(prompt_ids) + max_new_tokens)
    generator = og.Generator(og_model, params)
    generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    genai_new = [int(t) for t in generator.get_sequence(0)][len(prompt_ids) :]

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            repetition_penalty=1.0,
            pad_token_id=_pad_id(model.config),
        )
    hf_new = out[0, len(prompt_ids) :].tolist()
    eos = _eos_ids(checkpoint, model.config)
    greedy = compare_genai_greedy(prompt, prompt_ids, og_prompt_ids, hf_new, genai_new, eos)
    return {**greedy, "seconds": round(time.perf_counter() - started, 1)}


def compare_genai_greedy(
    prompt: str,
    prompt_ids: list[int],
    genai_prompt_ids: list[int],
    hf_new: list[int],
    genai_new: list[int],
    eos: set[int],
) -> dict[str, Any]:
    """The record of ``check_genai_greedy`` from the token ids both sides produced (a pure function,
    so the record's layout is testable without a genai package)."""
    genai_new, hf_new = _until_eos(genai_new, eos), _until_eos(hf_new, eos)
    mismatch = next((i for i, (a, b) in enumerate(zip(genai_new, hf_new, strict=False)) if a != b), None)
    if mismatch is None and len(genai_new) != len(hf_new):
        mismatch = min(len(genai_new), len(hf_new))
    return {
        "prompt": prompt,
        "prompt_tokens": len(prompt_ids),
        "tokenizer_match": genai_prompt_ids == prompt_ids,
        "hf_tokens": hf_new,
        "genai_tokens": genai_new,
        "first_mismatch": mismatch,
        "passed": mismatch is None and genai_prompt_ids == prompt_ids,
    }


def _eos_ids(checkpoint: Path, config) -> set[int]:
    from transformers import GenerationConfig

    values: list[Any] = [getattr(config, "eos_token_id", None)]
    with contextlib.suppress(OSError):
        values.append(GenerationConfig.from_pretrained(checkpoint).eos_token_id)
    eos: set[int] = set()
    for value in values:
        if isinstance(value, int):
            eos.add(value)
        elif isinstance(value, list):
            eos.update(int(v) for v in value)
    return eos


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i]
    return tokens


def _genai_distribution() -> str:
    for name in ("onnxruntime-genai", "onnxruntime-genai-cuda"):
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    return "onnxruntime-genai"


# --------------------------------------------------------------------------------------------
# parity figures for the report

LOGIT_UNIT = "max abs logit diff"


def logit_checks(checks: dict[str, dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """``check_parity``'s checks as the report's parity rows (``ParityCheck``); the ``tensorrt``
    target records the same checks."""
    return [
        {
            "name": name,
            "measured": check["max_abs_diff"],
            "comparison": "<=",
            "limit": tolerance,
            "unit": LOGIT_UNIT,
            "passed": bool(check["passed"]),
            "detail": _logit_check_detail(name, check),
        }
        for name, check in checks.items()
    ]


def _logit_check_detail(name: str, check: dict[str, Any]) -> str:
    """What a check of ``check_parity`` compared, in words."""
    if name == "prefill":
        return f"{check['tokens']} prompt tokens, no cache"
    if name == "decode":
        return f"{check['tokens']} cached decode steps on the runtime's own cache"
    if name == "padded_batch":
        first, second = check["lengths"]
        return f"prompts of {first} and {second} tokens left-padded in one batch, then 1 cached step"
    return f"{check['tokens']} tokens"


def genai_greedy_check(greedy: dict[str, Any]) -> dict[str, Any]:
    """``check_genai_greedy``'s record as one parity row: new tokens equal to transformers' before
    the first mismatch, of the longer continuation (so a package that runs on past transformers'
    end of sequence does not reach the limit)."""
    compared = max(len(greedy["hf_tokens"]), len(greedy["genai_tokens"]))
    mismatch = greedy["first_mismatch"]
    detail = [f"prompt {greedy['prompt']!r} ({greedy['prompt_tokens']} tokens)"]
    if not greedy["tokenizer_match"]:
        detail.append("genai's tokenizer encodes it differently")
    if mismatch is not None:
        detail.append(f"first mismatch at new token {mismatch}")
    return {
        "name": "genai_greedy",
        "measured": compared if mismatch is None else mismatch,
        "comparison": ">=",
        "limit": compared,
        "unit": "greedy tokens equal",
        "passed": bool(greedy["passed"]),
        "detail": "; ".join(detail),
    }


def parity_checks(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The parity figures of an ``onnx`` record (what ``build`` returns): ONNX Runtime's logit
    checks, then the genai package's greedy agreement when one was built."""
    rows = logit_checks(record["checks"], record["tolerance"])
    if "genai" in record:
        rows.append(genai_greedy_check(record["genai"]["greedy"]))
    return rows


# --------------------------------------------------------------------------------------------
# the target


def preflight(options: Options) -> None:
    """Before any weight is read: the exporter, ONNX Runtime (and genai when asked), the provider."""
    require_exporter()
    require_onnx_runtime()
    if options.genai:
        require_genai()
    resolve_providers(options.provider)


def build(checkpoint: Path, out_dir: Path, options: Options) -> dict:
    """Export, validate in ONNX Runtime, optionally build and check a genai package; return the record."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    require_onnx_runtime()
    if options.genai:
        require_genai()
    providers = resolve_providers(options.provider)
    on_cuda = providers[0] == "CUDAExecutionProvider"
    if options.genai and options.dtype == "fp16" and not on_cuda:
        raise TargetUnavailable("onnx genai with fp16 needs CUDA (the model builder has no FP16 CPU model)")
    if options.genai and on_cuda and not require_genai().is_cuda_available():
        raise TargetUnavailable("onnx genai on cuda needs onnxruntime-genai-cuda, or set genai: false")

    reference = load_hf_model(checkpoint, "fp32", "cuda" if on_cuda else "cpu")
    source = reference if options.dtype == "fp32" and not on_cuda else None
    export = export_onnx(checkpoint, out_dir, dtype=options.dtype, opset=options.opset, model=source)
    validation = validate_onnx(checkpoint, out_dir / ONNX_FILE, options, providers=providers, model=reference)

    record: dict[str, Any] = {
        "target": "onnx",
        "model": ONNX_FILE,
        **{k: export[k] for k in ("exporter", "opset", "dtype", "external_data", "num_layers")},
        "inputs": export["inputs"],
        "outputs": export["outputs"],
        "versions": {
            "torch": export["torch"],
            "onnx": export["onnx"],
            "onnxscript": export["onnxscript"],
            "onnxruntime": validation["onnxruntime"],
        },
        "providers": validation["providers"],
        "reference": validation["reference"],
        "tolerance": validation["tolerance"],
        "checks": validation["checks"],
        "seconds": {"export": export["seconds"], "validate": validation["seconds"]},
    }
    if options.genai:
        genai_dir = out_dir / "genai"
        package = build_genai(
            checkpoint, genai_dir, precision=options.dtype, execution_provider="cuda" if on_cuda else "cpu"
        )
        greedy = check_genai_greedy(checkpoint, genai_dir, reference, options.prompts[0], options.genai_max_new_tokens)
        record["genai"] = {"dir": "genai", **package, "greedy": greedy}
        record["seconds"]["genai"] = package["seconds"] + greedy["seconds"]
        if not greedy["passed"]:
            if not greedy["tokenizer_match"]:
                why = "its tokenizer encodes the prompt differently from the checkpoint's"
            else:
                why = f"greedy tokens differ from transformers at new token {greedy['first_mismatch']}"
            raise ValidationFailed(
                f"onnxruntime-genai package: {why} (hf {greedy['hf_tokens']}, genai {greedy['genai_tokens']})"
            )
    record["files"] = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    record["bytes"] = sum((out_dir / f).stat().st_size for f in record["files"])
    record["passed"] = True
    return record
