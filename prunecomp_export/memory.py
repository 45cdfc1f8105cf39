"""The memory plan: what every stage of a run may hold on the device and in host memory, computed once
before any weight is read (from the model's config, the recipe and the machine), shown by
``--dry-run``, recorded in results.json, and honoured by every stage.

Sizes (b: bytes per element of the compute dtype; d: hidden size; d_kv: key/value width; I: MLP
width (an MoE layer's active experts'); h: attention heads; V: vocabulary; L: decoder layers):

- W: every weight; S: the largest slice ever resident alone in a streamed run (one decoder layer, the
  embedding, or the final norm and head); T: the largest single tensor (a dtype conversion or a
  scaled copy of it exists beside it for a moment);
- act(n, s) = n s (b (4 d + 2 d_kv + 3 I) + 4 h s): one decoder layer's activations on n sequences
  of s tokens (stream in and out, normed input, projections, MLP, fp32 attention scores);
- logits(t, c) = t V 4 c: the head's fp32 output on t tokens, c copies (softmax, gradient);
- cache = (L + 1) N s b d: the residual stream of the N calibration windows at every layer boundary.

Stages (D: the device budget, ``execution.memory_budget``, default 80 % of the free GPU memory or
half the available host memory on CPU; H: the host budget, ``execution.host_memory_budget``, default
half the available host memory; on CPU the device is the host and H = D):

- prune and perplexity (this process): resident weights W, or S + T streamed, plus act of one
  calibration (perplexity) batch, plus logits of one chunk of ``logits_chunk`` tokens, sized to an
  eighth of D (the head's output never exists for a whole batch; the divergence from the dense model
  runs both heads on half a chunk), plus the stream cache where it is on the device. Weights stay
  resident when W and the cache fit D. Perplexity also keeps the dense model's streams entering the
  final norm, n s b d per corpus of n windows, in host memory (the divergence's reference).
- reload check and QA (child processes, after this process released its device memory): the
  checkpoint loaded through accelerate's big-model inference with ``max_memory`` = D minus a reserve
  (act and logits of one batch, and S + T for the layer an offloaded forward brings in) on the
  device, H on the host (GPU runs), the rest offloaded to disk. QA's batch (of
  ``evaluation.qa.max_length`` tokens each) is the recipe's batch size or fewer, so that its logits
  and activations take at most a quarter of D.
- bench (child processes): each timed model whole on the device, W + act of the largest scenario:
  refused when it does not fit, since timing an offloaded model would time the offload.
- targets (child processes, one after another): the parity reference streams the written
  checkpoint in fp32 (S + T in fp32, and one chunk of the head's output); vLLM holds the pruned
  model (W' = W less the removed layers, in its dtype, split over ``tensor_parallel_size``
  devices) and a KV cache: on a GPU it is told its share of the device (``gpu_memory_utilization`` =
  D over the GPU's memory), on the CPU a KV cache of what D leaves beside W' (at most 1 GiB) and a
  context that fits in it, and it is refused when W' does not fit D; the ONNX builders and TensorRT
  load the whole pruned model on the host (genai's builder: W' in the checkpoint's dtype, and for
  int4/int8 the whole graph in its I/O dtype before it quantises, fp32 on the CPU; torch.onnx:
  three fp32 copies): listed, with a warning where that is over the host budget.

Each Python process also holds its own interpreter, torch and transformers (about
``PROCESS_OVERHEAD_BYTES``), outside the budget; each stage counts the processes it runs at once
(``StagePlan.process_overhead_bytes``: vLLM runs three of its own, ``VLLM_PROCESS_BYTES`` each).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from prunecomp_export.engine.execution import CachePlace, Placement
from prunecomp_export.errors import RecipeError
from prunecomp_export.recipe import ExecutionSpec, Recipe, parse_size

#: share of the device budget the head's output may take (the chunk of tokens is sized to it)
LOGITS_SHARE = 1 / 8
#: share of the device budget a QA batch's logits and activations may take
QA_BATCH_SHARE = 1 / 4
#: fp32 copies of the head's output the engine holds at once (logits, log-softmax, a gradient)
ENGINE_LOGIT_COPIES = 3
#: lm-eval's and transformers' copies (logits, log-softmax)
EVAL_LOGIT_COPIES = 2
#: bounds of the engine's chunk of tokens
MIN_CHUNK, MAX_CHUNK = 16, 4096
#: what one Python process with torch and transformers imported holds, outside the budget (measured
#: on this project's CPU machine: 0.6 GB)
PROCESS_OVERHEAD_BYTES = 600_000_000
#: what each process vLLM starts holds beyond the weights and KV cache it is given: the caller, its
#: engine core and each worker, with vLLM's imports and the worker's buffers (measured with vLLM 0.32
#: on the CPU, TinyLlama-1.1B's shape: 0.80, 0.78 and 1.30 GB at the target's peak, and on a first
#: start up to 0.5 GB more of the compiler processes torch starts to build its CPU kernels)
VLLM_PROCESS_BYTES = 1_200_000_000
#: the reload check's sample (verification.safetensors) and what it generates after 16 prompt tokens
RELOAD_SEQUENCES, RELOAD_TOKENS = 2, 64 + 8
#: the KV cache a vLLM process on the CPU gets (vLLM's CPU backend otherwise takes a share of the RAM)
VLLM_CPU_KV_CACHE_BYTES = 2**30
#: the largest share of a GPU vLLM is told it may use (gpu_memory_utilization)
VLLM_MAX_UTILIZATION = 0.95
#: the shortest context the vllm target's KV cache must hold (prompts and continuations of the check)
VLLM_MIN_CONTEXT = 256
#: the context a vLLM on the CPU gets when the model states none
VLLM_MAX_CONTEXT = 4096
#: bytes per weight of an ONNX model in each precision of the onnx target (int4: two a byte)
ONNX_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}
#: bytes per weight of genai's int8 / int4 MatMulNBits: the packed weight and an fp32 scale per block of 32
QUANTISED_BYTES = {"int8": 1 + 4 / 32, "int4": 0.5 + 4 / 32}
#: fp32 copies of the largest tensor genai's builder holds beside the model while it converts or
#: quantises one (measured: the fp32 build of TinyLlama-1.1B's shape peaked at W' + 3.2 of them)
GENAI_TENSOR_COPIES = 4

#: the stages' names in the plan
PRUNE, PERPLEXITY, QA, RELOAD, BENCH = "prune", "evaluate: perplexity", "evaluate: QA", "save: reload check", "bench"


# ------------------------------------------------------------------------------------------ machine


@dataclass(frozen=True)
class Machine:
    """The memory a run may plan with: the device's free memory (None on CPU, where the host is the
    device) and the host's available memory."""

    device: str  # "cpu", "cuda", "cuda:1"
    device_free_bytes: int | None
    host_available_bytes: int
    device_total_bytes: int | None = None

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def device_index(self) -> int:
        """The GPU's index ("cuda" is the first)."""
        return int(self.device.partition(":")[2] or 0)

    @classmethod
    def here(cls, device) -> Machine:
        """This machine, for ``device`` (a ``torch.device`` already checked to exist)."""
        import psutil

        free = total = None
        if device.type == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info(device)
        return cls(str(device), free, int(psutil.virtual_memory().available), total)

    @classmethod
    def parse(cls, text: str) -> Machine:
        """A machine described for ``--dry-run --machine``: ``cuda:24GB,host:32GB`` (a GPU with 24 GB
        free, 32 GB of host memory available) or ``host:16GB`` (CPU only)."""
        items = {}
        for item in text.split(","):
            kind, _, size = item.strip().partition(":")
            if kind not in ("cuda", "host") or kind in items or not size:
                raise ValueError(f"{text!r}: expected cuda:SIZE and host:SIZE, e.g. cuda:24GB,host:32GB")
            items[kind] = parse_size(size)
        if "host" not in items:
            raise ValueError(f"{text!r}: give the host's memory too, e.g. {text},host:32GB")
        return cls("cuda" if "cuda" in items else "cpu", items.get("cuda"), items["host"], items.get("cuda"))


def budgets(spec: ExecutionSpec, machine: Machine) -> tuple[int, int]:
    """(device budget D, host budget H) in bytes; on CPU the host is the device and H = D."""
    default_host = int(0.5 * machine.host_available_bytes)
    if not machine.gpu:
        device = parse_size(spec.memory_budget) if spec.memory_budget is not None else default_host
        return device, device
    device = parse_size(spec.memory_budget) if spec.memory_budget is not None else int(0.8 * machine.device_free_bytes)
    host = parse_size(spec.host_memory_budget) if spec.host_memory_budget is not None else default_host
    return device, host


# -------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelShape:
    """What the model's memory is made of, from its config alone (a skeleton on the meta device)."""

    num_layers: int
    hidden_size: int
    kv_size: int
    mlp_size: int
    num_heads: int
    vocab_size: int
    dtype_bytes: int
    weights_bytes: int
    slice_bytes: int
    tensor_bytes: int
    max_positions: int | None
    #: one decoder layer (0: unknown, then a pruned model is planned at the dense model's size)
    layer_bytes: int = 0

    def pruned_weights(self, layers_after: int | None) -> int:
        """W': the weights left after removing decoder layers down to ``layers_after``."""
        removed = 0 if layers_after is None else self.num_layers - layers_after
        return self.weights_bytes - removed * self.layer_bytes

    @classmethod
    def from_config(cls, config, adapter, dtype) -> ModelShape:
        """Parameter counts of a meta-device skeleton built from ``config``, grouped like the engine
        materialises them: one decoder layer, the embedding, the final norm and head."""
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights(include_buffers=True):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
        size = torch.empty((), dtype=dtype).element_size()
        slices: dict[str, int] = {}
        largest = 0
        for name, param in skeleton.named_parameters():
            layer = adapter.split_layer_key(name)
            group = f"layer {layer[0]}" if layer else "embedding" if name == adapter.embedding_key else "head"
            slices[group] = slices.get(group, 0) + param.numel() * size
            largest = max(largest, param.numel() * size)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            kv_size=2 * (getattr(config, "num_key_value_heads", None) or heads) * head_dim,
            mlp_size=_mlp_size(config),
            num_heads=heads,
            vocab_size=config.vocab_size,
            dtype_bytes=size,
            weights_bytes=sum(slices.values()),
            slice_bytes=max(slices.values()),
            tensor_bytes=largest,
            max_positions=getattr(config, "max_position_embeddings", None),
            layer_bytes=max((v for k, v in slices.items() if k.startswith("layer ")), default=0),
        )

    def activations(self, sequences: int, tokens: int) -> int:
        """act(n, s): one decoder layer's activations on ``sequences`` of ``tokens`` tokens."""
        per_token = self.dtype_bytes * (4 * self.hidden_size + self.kv_size + 3 * self.mlp_size)
        return sequences * tokens * (per_token + 4 * self.num_heads * tokens)

    def logits(self, tokens: int, copies: int) -> int:
        """logits(t, c): the head's fp32 output on ``tokens`` tokens, ``copies`` times."""
        return tokens * self.vocab_size * 4 * copies

    def streams(self, windows: int, seq_len: int) -> int:
        """The residual stream of ``windows`` windows at one layer boundary."""
        return windows * seq_len * self.hidden_size * self.dtype_bytes

    def stream_cache(self, windows: int, seq_len: int) -> int:
        return (self.num_layers + 1) * windows * seq_len * self.hidden_size * self.dtype_bytes


def _mlp_size(config) -> int:
    """The MLP width one token goes through: its active experts' (and a shared expert's) for MoE."""
    experts = getattr(config, "num_experts_per_tok", None)
    moe = getattr(config, "moe_intermediate_size", None)
    if experts and moe:
        return experts * moe + (getattr(config, "shared_expert_intermediate_size", None) or 0)
    return experts * config.intermediate_size if experts else config.intermediate_size


# -------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ChildLoad:
    """How a child process loads the checkpoint through accelerate: ``max_memory`` per device
    (``device_map="auto"``), and how much goes to the offload folder on disk."""

    #: accelerate's max_memory, keys as JSON has them: a GPU's index ("0"), "cpu"
    max_memory: dict[str, int]
    offloaded_bytes: int
    batch_size: int


@dataclass(frozen=True)
class StagePlan:
    """One stage's planned peak: on the device (None on CPU) and in host memory, beyond each
    process's own overhead; how it is reached; whether it fits its budget."""

    stage: str
    process: str  # "this process", "child process"
    device_bytes: int | None
    host_bytes: int
    how: str
    fits: bool = True
    #: for a stage that may not run over its budget: what to tell the user
    refusal: str | None = None
    #: a child that loads the checkpoint with transformers: accelerate's placement
    load: ChildLoad | None = None
    #: a child that runs vLLM: its engine arguments (memory, parallelism)
    vllm_engine: dict[str, Any] | None = None
    #: QA: the longest context lm-eval feeds the model
    qa_length: int | None = None
    #: the imports of every process the stage runs at once (not in ``host_bytes``); a measurement of
    #: the stage's process tree is held to the two together
    process_overhead_bytes: int = PROCESS_OVERHEAD_BYTES


@dataclass(frozen=True)
class MemoryPlan:
    machine: Machine
    shape: ModelShape
    device_budget: int
    host_budget: int
    placement: Placement
    #: tokens per chunk of the head's output in the engine (losses, log-probabilities, metrics)
    logits_chunk: int
    stages: list[StagePlan] = field(default_factory=list)

    def stage(self, name: str) -> StagePlan:
        return next(stage for stage in self.stages if stage.stage == name)

    def check(self) -> None:
        """The first stage that cannot run within the plan, as one line naming it and what it needs."""
        for stage in self.stages:
            if not stage.fits and stage.refusal is not None:
                raise RecipeError(stage.refusal, key="execution.memory_budget")

    def warnings(self) -> list[str]:
        return [f"{stage.stage}: {stage.how}" for stage in self.stages if not stage.fits and stage.refusal is None]

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": asdict(self.machine),
            "device_budget_bytes": self.device_budget,
            "host_budget_bytes": self.host_budget,
            "weights_bytes": self.shape.weights_bytes,
            "slice_bytes": self.shape.slice_bytes,
            "logits_chunk_tokens": self.logits_chunk,
            "process_overhead_bytes": PROCESS_OVERHEAD_BYTES,
            "stages": [
                {k: v for k, v in asdict(stage).items() if k not in ("refusal", "load", "vllm_engine", "qa_length")}
                | {"max_memory": None if stage.load is None else stage.load.max_memory}
                for stage in self.stages
            ],
        }


def logits_chunk(shape: ModelShape, device_budget: int) -> int:
    """Tokens per chunk of the head's output: its fp32 copies take at most ``LOGITS_SHARE`` of the budget."""
    fits = int(LOGITS_SHARE * device_budget) // shape.logits(1, ENGINE_LOGIT_COPIES)
    return max(MIN_CHUNK, min(MAX_CHUNK, fits))


def make_memory_plan(
    recipe: Recipe,
    shape: ModelShape,
    machine: Machine,
    *,
    targets: Sequence[str] | Mapping[str, Any],
    bench: bool,
    layers_after: int | None = None,
):
    """The plan for ``recipe`` on ``machine``; ``check()`` it to refuse a budget too small. ``targets``:
    names, or names and their validated options; ``layers_after``: the pruned model's layer count."""
    spec = recipe.execution
    device_budget, host_budget = budgets(spec, machine)
    chunk = logits_chunk(shape, device_budget)
    engine_logits = shape.logits(chunk, ENGINE_LOGIT_COPIES)
    streamed = shape.slice_bytes + shape.tensor_bytes
    calibration = recipe.calibration
    prune_work = shape.activations(min(calibration.batch_size, calibration.num_samples), calibration.seq_len)
    cache = shape.stream_cache(calibration.num_samples, calibration.seq_len)
    placement = _placement(spec, machine, device_budget, shape, streamed + prune_work + engine_logits, cache)
    weights = shape.weights_bytes if placement.weights_resident else streamed
    where = "resident" if placement.weights_resident else "streamed one slice at a time"

    stages = []
    device = weights + prune_work + engine_logits + (cache if placement.cache == "device" else 0)
    host_cache = cache if placement.cache == "host" else 0
    stages.append(
        _engine_stage(
            PRUNE, machine, device, host_cache, device_budget,
            f"weights {where}, stream cache ({_gb(cache)} GB) on {placement.cache}, head in chunks of {chunk} tokens",
        )
    )  # fmt: skip
    perplexity = recipe.evaluation.perplexity
    if perplexity is not None:
        work = shape.activations(perplexity.batch_size, perplexity.seq_len)
        reference, held = 0, "the dense model's streams of every window kept as the divergence's reference"
        if perplexity.max_windows is not None:
            reference = len(perplexity.corpora) * shape.streams(perplexity.max_windows, perplexity.seq_len)
            held = f"the dense model's streams ({_gb(reference)} GB) kept as the divergence's reference"
        stages.append(
            _engine_stage(
                PERPLEXITY, machine, weights + work + engine_logits, reference, device_budget,
                f"weights {where}, {perplexity.batch_size} x {perplexity.seq_len} tokens a batch, "
                f"head in chunks of {chunk} tokens, {held}",
            )
        )  # fmt: skip
    qa = recipe.evaluation.qa
    if qa is not None:
        length = min(qa.max_length, shape.max_positions or qa.max_length)
        if qa.backend == "vllm":
            stages.append(_vllm_qa_stage(qa.tensor_parallel_size, machine, shape, device_budget, length))
        else:
            per_sequence = shape.activations(1, length) + shape.logits(length, EVAL_LOGIT_COPIES)
            batch = max(1, min(qa.batch_size, int(QA_BATCH_SHARE * device_budget) // per_sequence))
            stage = _child_load_stage(
                QA, machine, shape, device_budget, host_budget, batch * per_sequence, batch,
                f"lm-eval batches of {batch} x {length} tokens",
            )  # fmt: skip
            stages.append(replace(stage, qa_length=length))
    if recipe.output.verify:
        work = shape.activations(RELOAD_SEQUENCES, RELOAD_TOKENS)
        work += shape.logits(RELOAD_SEQUENCES * RELOAD_TOKENS, EVAL_LOGIT_COPIES)
        stages.append(
            _child_load_stage(
                RELOAD, machine, shape, device_budget, host_budget, work, RELOAD_SEQUENCES,
                "transformers reloads the written checkpoint",
            )
        )  # fmt: skip
    if bench:
        stages.append(_bench_stage(recipe, machine, shape, device_budget))
    options = targets if isinstance(targets, Mapping) else dict.fromkeys(targets)
    layers = layers_after or shape.num_layers
    pruned = replace(shape, weights_bytes=shape.pruned_weights(layers_after), num_layers=layers)
    for name, chosen in options.items():
        if name == "vllm":
            stages.append(_vllm_target_stage(chosen, machine, pruned, device_budget, chunk))
        elif name != "hf":
            stages.append(_target_stage(name, chosen, machine, pruned, host_budget, chunk))
    return MemoryPlan(machine, shape, device_budget, host_budget, placement, chunk, stages)


def _placement(spec: ExecutionSpec, machine: Machine, budget: int, shape: ModelShape, working: int, cache: int):
    """Weights resident if they fit beside the cache; the cache on the device when it fits beside what
    is resident, then host memory (GPU runs), then disk."""
    from prunecomp_export.engine.execution import check_cache_dir

    resident = shape.weights_bytes + cache <= budget if spec.weights == "auto" else spec.weights == "resident"
    on_device = (shape.weights_bytes if resident else working) + cache <= budget
    place: CachePlace
    if spec.stream_cache != "auto":
        place = spec.stream_cache  # type: ignore[assignment]
    elif on_device:
        place = "device"
    elif machine.gpu and cache <= int(0.5 * machine.host_available_bytes):
        place = "host"
    else:
        place = "disk"
    if not machine.gpu and place == "host":
        place = "device"  # on the CPU, host memory is the device
    return Placement(
        machine.device, budget, resident, place, check_cache_dir(spec), shape.weights_bytes, cache, working
    )


def _engine_stage(name: str, machine: Machine, device: int, host: int, budget: int, how: str) -> StagePlan:
    fits = device <= budget
    refusal = (
        None
        if fits
        else f"the memory budget ({_gb(budget)} GB) is too small for the {name} stage: it needs {_gb(device)} GB "
        f"({how})"
    )
    if machine.gpu:
        return StagePlan(name, "this process", device, host, how, fits, refusal)
    return StagePlan(name, "this process", None, device + host, how, fits, refusal)


def _child_load_stage(
    name: str, machine: Machine, shape: ModelShape, budget: int, host_budget: int, work: int, batch: int, how: str
) -> StagePlan:
    """A child that loads the checkpoint through accelerate within the budget, after a reserve for its
    work and for the slice an offloaded forward brings in."""
    reserve = work + shape.slice_bytes + shape.tensor_bytes
    on_device = min(shape.weights_bytes, budget - reserve)
    if on_device < shape.slice_bytes:
        refusal = (
            f"the memory budget ({_gb(budget)} GB) is too small for the {name} stage: it needs at least "
            f"{_gb(reserve + shape.slice_bytes)} GB ({how}, one layer on the device)"
        )
        return StagePlan(name, "child process", budget if machine.gpu else None, budget, how, False, refusal)
    rest = shape.weights_bytes - on_device
    if machine.gpu:
        on_host = min(rest, host_budget)
        load = ChildLoad({str(machine.device_index): on_device, "cpu": on_host}, rest - on_host, batch)
        where = f"{_gb(on_device)} GB of weights on the device, {_gb(on_host)} GB in host memory"
        device, host = on_device + reserve, on_host
    else:
        load = ChildLoad({"cpu": on_device}, rest, batch)
        where = f"{_gb(on_device)} GB of weights in memory"
        device, host = None, on_device + reserve
    offload = f", {_gb(load.offloaded_bytes)} GB offloaded to disk" if load.offloaded_bytes else ""
    return StagePlan(name, "child process", device, host, f"{how}; {where}{offload}", True, None, load)


def _vllm_qa_stage(tensor_parallel: int, machine: Machine, shape: ModelShape, budget: int, length: int) -> StagePlan:
    """lm-eval's vLLM model: each of ``tensor_parallel`` GPUs holds its share of the weights and vLLM
    sizes its KV cache within the budget (gpu_memory_utilization); on the CPU a fixed KV cache."""
    weights = shape.weights_bytes // tensor_parallel
    how = f"vLLM, weights split over {tensor_parallel} device(s), contexts of up to {length} tokens"
    if machine.gpu:
        engine: dict[str, Any] = {"tensor_parallel_size": tensor_parallel, "enforce_eager": True}
        engine["gpu_memory_utilization"] = round(min(VLLM_MAX_UTILIZATION, budget / machine.device_total_bytes), 3)
        need, host = budget, 0
    else:
        engine = {"tensor_parallel_size": 1, "enforce_eager": True, "kv_cache_memory_bytes": VLLM_CPU_KV_CACHE_BYTES}
        need = host = weights + VLLM_CPU_KV_CACHE_BYTES
    fits = weights < budget and (machine.gpu or need <= budget)
    refusal = (
        None
        if fits
        else f"the memory budget ({_gb(budget)} GB) is too small for the {QA} stage with vLLM: each device needs "
        f"{_gb(weights)} GB of weights{'' if machine.gpu else ' and a 1 GiB KV cache'} "
        "(raise evaluation.qa.tensor_parallel_size, or use backend hf, which offloads)"
    )
    return StagePlan(QA, "child process", need if machine.gpu else None, host, how, fits, refusal,
                     vllm_engine=engine, qa_length=length,
                     process_overhead_bytes=vllm_processes_bytes(engine["tensor_parallel_size"]))  # fmt: skip


def _bench_stage(recipe: Recipe, machine: Machine, shape: ModelShape, budget: int) -> StagePlan:
    longest = max(
        (s.batch, max(s.prompt_len, s.past_len) + s.new_tokens) for s in recipe.bench.scenarios
    )  # the scenario with the most tokens at once
    need = shape.weights_bytes + shape.activations(*longest) + shape.logits(longest[0] * longest[1], EVAL_LOGIT_COPIES)
    fits = need <= budget
    how = "each timed model whole on the device"
    refusal = (
        None
        if fits
        else f"the bench needs each model whole on the device ({_gb(need)} GB) and the memory budget is "
        f"{_gb(budget)} GB: timing an offloaded model would time the offload"
    )
    return StagePlan(BENCH, "child process", need if machine.gpu else None, 0 if machine.gpu else need, how, fits,
                     refusal)  # fmt: skip


def parity_reference(shape: ModelShape, chunk: int) -> int:
    """The parity reference: the written checkpoint streamed in fp32, one slice (and a converted
    tensor) at a time, and one chunk of the head's fp32 output."""
    return (shape.slice_bytes + shape.tensor_bytes) * 4 // shape.dtype_bytes + shape.logits(chunk, ENGINE_LOGIT_COPIES)


def _target_stage(name: str, options: Any, machine: Machine, shape: ModelShape, host_budget: int, chunk: int):
    """The ONNX and TensorRT builders load the whole pruned model on the host; listed with what that
    needs, a warning where it is over the host budget (the builders cannot stream)."""
    fp32 = shape.weights_bytes * 4 // shape.dtype_bytes
    genai = name == "onnx" and getattr(options, "exporter", "auto") != "torch"
    dtype = getattr(options, "dtype", "fp32")
    # the ONNX model ONNX Runtime then holds: the weights in the exported precision
    exported = int(fp32 * ONNX_BYTES.get(dtype, 4) / 4)
    if genai:
        build, how = genai_build_bytes(shape, dtype, _genai_on_cuda(options, machine))
        host = max(build, exported)
        how += f", ONNX Runtime then holds {_gb(exported)} GB"
    elif name == "tensorrt" and getattr(options, "runtime", "tensorrt") == "tensorrt_llm":
        host, how = shape.weights_bytes, "TensorRT-LLM loads the model onto its GPUs"
    else:
        host, how = 3 * fp32, "torch.onnx traces the whole model in fp32 on the host"
    reference = parity_reference(shape, chunk)
    how += f"; parity reference streamed ({_gb(reference)} GB)"
    fits = host <= host_budget
    if not fits:
        how += f": {_gb(host)} GB, over the host budget of {_gb(host_budget)} GB"
    device = max(shape.weights_bytes, reference) if machine.gpu else None  # one after the other
    # each export and each runtime runs in a child of the target's own child process
    return StagePlan(f"targets: {name}", "child process", device, host if machine.gpu else max(host, reference), how,
                     fits, process_overhead_bytes=2 * PROCESS_OVERHEAD_BYTES)  # fmt: skip


def genai_build_bytes(shape: ModelShape, dtype: str, on_cuda: bool) -> tuple[int, str]:
    """What onnxruntime-genai's builder holds on the host: the checkpoint in its stored dtype and a few
    fp32 copies of its largest tensor (converted one at a time as they are written); for int8 / int4
    also the whole graph in its I/O dtype (fp32 on the CPU, fp16 on CUDA), which it makes before its
    quantiser runs over it, and the quantised weights."""
    params = shape.weights_bytes // shape.dtype_bytes
    held = shape.weights_bytes + GENAI_TENSOR_COPIES * shape.tensor_bytes * 4 // shape.dtype_bytes
    if dtype not in QUANTISED_BYTES:
        return held, "onnxruntime-genai's builder loads the model"
    io_bytes = 2 if on_cuda else 4
    graph = params * io_bytes
    held += graph + int(params * QUANTISED_BYTES[dtype])
    return held, (
        f"onnxruntime-genai's builder loads the model and makes its whole graph in {'fp16' if on_cuda else 'fp32'} "
        f"({_gb(graph)} GB) before quantising it to {dtype}"
    )


def _genai_on_cuda(options: Any, machine: Machine) -> bool:
    """Whether the onnx target builds for CUDA. ``targets/runtimes/ort.resolve_providers`` decides it
    at export time by asking onnxruntime; the plan is made before any backend is imported, also for
    ``--dry-run --machine cuda:...`` away from the GPU box, so it assumes that box's onnxruntime has CUDA."""
    provider = getattr(options, "provider", "auto")
    return provider == "cuda" or (provider == "auto" and machine.gpu)


def _vllm_target_stage(options: Any, machine: Machine, shape: ModelShape, budget: int, chunk: int) -> StagePlan:
    """vLLM holds the pruned model in its dtype, split over ``tensor_parallel_size`` devices, and a KV
    cache within the device budget: on a GPU its share of the device, on the CPU what the budget
    leaves beside the weights (at most 1 GiB), and a context that fits in it."""
    tensor_parallel = getattr(options, "tensor_parallel_size", 1)
    dtype = getattr(options, "dtype", "float32")
    size = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, shape.dtype_bytes)
    weights = shape.weights_bytes * size // shape.dtype_bytes // tensor_parallel
    kv_per_token = shape.kv_size * shape.num_layers * size // tensor_parallel
    reference = parity_reference(shape, chunk)
    how = f"vLLM {dtype}, {_gb(weights)} GB of weights a device ({tensor_parallel} device(s))"
    engine: dict[str, Any] = {}
    if machine.gpu:  # the reference runs on the device too, after vLLM has exited
        engine["gpu_memory_utilization"] = round(min(VLLM_MAX_UTILIZATION, budget / machine.device_total_bytes), 3)
        fits = weights < budget
        need, host = max(budget, reference), 0
        how += f", gpu_memory_utilization {engine['gpu_memory_utilization']}"
    else:
        kv = min(VLLM_CPU_KV_CACHE_BYTES, budget - weights)
        fits = kv >= kv_per_token * VLLM_MIN_CONTEXT
        if fits:
            engine["kv_cache_memory_bytes"] = kv
            engine["max_model_len"] = min(shape.max_positions or VLLM_MAX_CONTEXT, kv // max(kv_per_token, 1))
            how += f", a {_gb(kv)} GB KV cache ({engine['max_model_len']} tokens)"
        need = host = max(weights + max(kv, 0), reference)  # the reference runs after vLLM has exited
    how += f"; parity reference streamed ({_gb(reference)} GB)"
    refusal = (
        None
        if fits
        else f"the memory budget ({_gb(budget)} GB) is too small for the vllm target: vLLM holds {_gb(weights)} GB of "
        f"weights a device and a KV cache of at least {VLLM_MIN_CONTEXT} tokens "
        "(raise execution.memory_budget, or targets.vllm.tensor_parallel_size on GPUs, or use dtype bfloat16)"
    )
    return StagePlan("targets: vllm", "child process", need if machine.gpu else None, host, how, fits, refusal,
                     vllm_engine=engine,
                     process_overhead_bytes=PROCESS_OVERHEAD_BYTES + vllm_processes_bytes(tensor_parallel))  # fmt: skip


def vllm_processes_bytes(tensor_parallel: int) -> int:
    """vLLM's own processes at once: the caller, its engine core and a worker a device."""
    return (2 + tensor_parallel) * VLLM_PROCESS_BYTES


def _gb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f}"
