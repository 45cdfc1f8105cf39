"""The memory plan (``memory.py``): every stage's planned memory from the config alone, checked against
the formulas it documents computed here by hand; placement choices; refusals in one line; the dry
run that plans a 70B model for another machine; the head applied in chunks of the plan's size."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from prunecomp_export.adapters import adapter_for
from prunecomp_export.cli import main
from prunecomp_export.errors import RecipeError
from prunecomp_export.memory import (
    BENCH,
    PERPLEXITY,
    PRUNE,
    QA,
    RELOAD,
    Machine,
    ModelShape,
    budgets,
    make_memory_plan,
)
from prunecomp_export.recipe import ExecutionSpec, validate_recipe

GB = 10**9

# Llama-3-70B's shape: bf16, untied, grouped-query attention
D, MLP, L, H, KV_HEADS, HEAD_DIM, V = 8192, 28672, 80, 64, 8, 128, 128256
LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D, "intermediate_size": MLP,
    "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV_HEADS, "vocab_size": V,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}  # fmt: skip


def config_of(raw: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "architectures"})


def shape_70b() -> ModelShape:
    config = config_of(LLAMA_70B)
    return ModelShape.from_config(config, adapter_for(config), torch.bfloat16)


def recipe(**sections):
    return validate_recipe({"model": {"source": "x"}, "prune": {"num_drop": 16}, **sections})


# -- by hand ---------------------------------------------------------------------------------------
KV = KV_HEADS * HEAD_DIM
LAYER_PARAMS = 2 * D * D + 2 * D * KV + 3 * D * MLP + 2 * D  # q, o; k, v; gate, up, down; two norms
EMBED_PARAMS = V * D
WEIGHTS = 2 * (L * LAYER_PARAMS + 2 * EMBED_PARAMS + D)  # bf16; embedding, lm_head, final norm
SLICE = 2 * (EMBED_PARAMS + D)  # the largest slice: lm_head and the final norm
TENSOR = 2 * EMBED_PARAMS


def act(sequences: int, tokens: int) -> int:
    """act(n, s) = n s (b (4 d + 2 d_kv + 3 I) + 4 h s), as memory.py documents it."""
    return sequences * tokens * (2 * (4 * D + 2 * KV + 3 * MLP) + 4 * H * tokens)


def logits(tokens: int, copies: int) -> int:
    return tokens * V * 4 * copies


def test_the_shape_of_a_70b_model_comes_from_its_config_alone():
    shape = shape_70b()
    assert shape.weights_bytes == WEIGHTS  # 141.1 GB
    assert shape.slice_bytes == SLICE and shape.tensor_bytes == TENSOR
    assert shape.activations(4, 512) == act(4, 512)
    assert shape.logits(100, 3) == logits(100, 3)
    assert shape.stream_cache(16, 512) == (L + 1) * 16 * 512 * D * 2


def test_the_plan_of_a_70b_model_on_one_24gb_gpu_with_32gb_of_host_memory():
    machine = Machine.parse("cuda:24GB,host:32GB")
    qa = {"tasks": ["gensim_sentiment"], "limit": 8}
    plan = make_memory_plan(recipe(evaluation={"qa": qa}), shape_70b(), machine, targets=[], bench=False)
    device, host = 24 * GB * 8 // 10, 32 * GB // 2
    assert (plan.device_budget, plan.host_budget) == (device, host)
    chunk = device // 8 // logits(1, 3)
    assert plan.logits_chunk == chunk == 1559

    # prune: weights streamed (141 GB do not fit), the calibration streams (16 x 512 tokens) on the device
    cache = (L + 1) * 16 * 512 * D * 2
    prune = plan.stage(PRUNE)
    assert not plan.placement.weights_resident and plan.placement.cache == "device"
    assert prune.device_bytes == SLICE + TENSOR + act(4, 512) + logits(chunk, 3) + cache <= device
    assert prune.host_bytes == 0 and prune.fits

    perplexity = plan.stage(PERPLEXITY)
    assert perplexity.device_bytes == SLICE + TENSOR + act(4, 512) + logits(chunk, 3)

    # QA: batches of 2048-token contexts sized to a quarter of the budget; the rest of the budget holds
    # weights, the host budget more, and what is left goes to disk
    per_sequence = act(1, 2048) + logits(2048, 2)
    batch = max(1, min(8, int(device / 4) // per_sequence))
    on_device = device - (batch * per_sequence + SLICE + TENSOR)
    qa_plan = plan.stage(QA)
    assert qa_plan.load.batch_size == batch == 1
    assert qa_plan.load.max_memory == {"0": on_device, "cpu": host}
    assert qa_plan.load.offloaded_bytes == WEIGHTS - on_device - host
    assert qa_plan.device_bytes == device and qa_plan.host_bytes == host

    reload = plan.stage(RELOAD)
    work = act(2, 72) + logits(144, 2)
    assert reload.load.max_memory == {"0": device - (work + SLICE + TENSOR), "cpu": host}
    plan.check()  # every stage fits


def test_the_dry_run_plans_a_70b_model_from_its_config_json_for_another_machine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "llama-70b"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(LLAMA_70B))  # no weights, no tokenizer
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"model: {{source: {source}}}\nprune: {{num_drop: 16}}\nevaluation: {{qa: {{limit: 8}}}}\n")
    args = [str(recipe_file), "--dry-run", "--machine", "cuda:24GB,host:32GB"]
    result = CliRunner().invoke(main, args, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    for stage in (PRUNE, PERPLEXITY, QA, RELOAD):
        assert stage in out
    assert "host budget 16.00 GB" in out and "device budget 19.20 GB" in out and "weights 141.11 GB" in out
    assert f"{(SLICE + TENSOR + act(4, 512) + logits(1559, 3) + (L + 1) * 16 * 512 * D * 2) / GB:.2f}" in out
    assert not (tmp_path / "outputs").exists()
    # without --machine, the same directory is refused: there are no weights here to run on
    result = CliRunner().invoke(main, [str(recipe_file), "--dry-run"])
    assert result.exit_code == 2 and "no .safetensors weights" in result.output


def test_machine_descriptions():
    assert Machine.parse("cuda:24GB,host:32GB") == Machine("cuda", 24 * GB, 32 * GB, 24 * GB)
    assert Machine.parse("host:16GiB") == Machine("cpu", None, 16 * 2**30, None)
    for bad in ("cuda:24GB", "gpu:1GB,host:2GB", "host:lots", "host:1GB,host:2GB", ""):
        with pytest.raises(ValueError):
            Machine.parse(bad)
    result = CliRunner().invoke(main, ["r.yaml", "--machine", "host:lots"])
    assert result.exit_code == 2 and "--machine" in result.output


def test_budgets():
    gpu = Machine("cuda", 40 * GB, 100 * GB, 80 * GB)
    assert budgets(ExecutionSpec(), gpu) == (32 * GB, 50 * GB)
    assert budgets(ExecutionSpec(memory_budget="10GB", host_memory_budget="20GB"), gpu) == (10 * GB, 20 * GB)
    cpu = Machine("cpu", None, 24 * GB)
    assert budgets(ExecutionSpec(), cpu) == (12 * GB, 12 * GB)  # the host is the device
    assert budgets(ExecutionSpec(memory_budget="1GB"), cpu) == (GB, GB)


# -- placement -------------------------------------------------------------------------------------

MB = 10**6
CPU = Machine("cpu", None, 24 * GB)


def small_shape(weights: int, slice_: int, cache_per_window: int = 0) -> ModelShape:
    """A stand-in shape with round sizes; calibration windows of 1 token, hidden size 1, b = 1."""
    return ModelShape(
        num_layers=cache_per_window - 1 if cache_per_window else 1, hidden_size=1, kv_size=0, mlp_size=0,
        num_heads=0, vocab_size=1, dtype_bytes=1, weights_bytes=weights, slice_bytes=slice_, tensor_bytes=0,
        max_positions=None,
    )  # fmt: skip


def placed(budget: str, weights_bytes: int, slice_: int, cache: int, machine: Machine = CPU, **execution):
    calibration = {"num_samples": 1, "seq_len": 8, "batch_size": 1}
    shape = small_shape(weights_bytes, slice_, cache // 8)
    r = recipe(
        execution={"memory_budget": budget, **execution}, calibration=calibration, evaluation={"perplexity": None}
    )
    return make_memory_plan(r, shape, machine, targets=[], bench=False)


def test_weights_stay_resident_when_they_fit_beside_the_cache():
    plan = placed("1GB", 600 * MB, 100 * MB, 300 * MB)
    assert plan.placement.weights_resident and plan.placement.cache == "device"
    assert plan.placement.describe()["weights"] == "resident"


def test_weights_stream_and_the_cache_goes_to_disk_or_host_memory_when_it_does_not_fit(tmp_path):
    plan = placed("1GB", 2000 * MB, 100 * MB, 700 * MB)
    assert not plan.placement.weights_resident and plan.placement.cache == "device"
    plan = placed("1GB", 2000 * MB, 100 * MB, 950 * MB, cache_dir=str(tmp_path))
    assert plan.placement.cache == "disk" and plan.placement.cache_dir == tmp_path
    gpu = Machine("cuda", 10 * GB, 24 * GB, 10 * GB)  # a GPU run uses host memory first when it fits there
    assert placed("100MB", 2000 * MB, 10 * MB, 90 * MB, gpu).placement.cache == "host"


def test_explicit_choices_win():
    plan = placed("1GB", 600 * MB, 100 * MB, 300 * MB, weights="streamed", stream_cache="disk")
    assert not plan.placement.weights_resident and plan.placement.cache == "disk"


def test_a_budget_too_small_names_the_stage_and_what_it_needs():
    plan = placed("150MB", 2000 * MB, 200 * MB, 8)
    with pytest.raises(RecipeError, match=r"too small for the prune stage: it needs 0\.20 GB") as info:
        plan.check()
    assert info.value.key == "execution.memory_budget"


def test_qa_batches_shrink_to_fit_and_a_budget_below_one_sequence_is_refused():
    small = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 151936}  # fmt: skip
    config = config_of(LLAMA_70B | small)
    shape = ModelShape.from_config(config, adapter_for(config), torch.float32)
    qa = {"tasks": ["gensim_sentiment"], "max_length": 512, "batch_size": 64}
    plan = make_memory_plan(
        recipe(evaluation={"qa": qa}, execution={"memory_budget": "4GB"}), shape, CPU, targets=[], bench=False
    )
    per_sequence = shape.activations(1, 512) + shape.logits(512, 2)
    assert plan.stage(QA).load.batch_size == int(GB) // per_sequence < 64
    tight = recipe(evaluation={"qa": qa}, execution={"memory_budget": "700MB"})
    with pytest.raises(RecipeError, match=r"too small for the evaluate: QA stage: it needs at least"):
        make_memory_plan(tight, shape, CPU, targets=[], bench=False).check()


def test_the_bench_refuses_a_model_that_would_be_offloaded():
    plan = make_memory_plan(recipe(execution={"memory_budget": "20GB"}), shape_70b(), Machine.parse(
        "cuda:24GB,host:256GB"), targets=[], bench=True)  # fmt: skip
    assert not plan.stage(BENCH).fits
    with pytest.raises(RecipeError, match="timing an offloaded model would time the offload"):
        plan.check()


def test_vllm_qa_needs_the_weights_split_over_enough_devices():
    qa = {"tasks": ["gensim_sentiment"], "backend": "vllm", "tensor_parallel_size": 4}
    machine = Machine.parse("cuda:80GB,host:256GB")
    plan = make_memory_plan(recipe(evaluation={"qa": qa}), shape_70b(), machine, targets=[], bench=False)
    assert plan.stage(QA).vllm_engine["tensor_parallel_size"] == 4
    assert plan.stage(QA).vllm_engine["gpu_memory_utilization"] == 0.8
    one = recipe(evaluation={"qa": {**qa, "tensor_parallel_size": 1}})
    with pytest.raises(RecipeError, match=r"raise evaluation\.qa\.tensor_parallel_size"):
        make_memory_plan(one, shape_70b(), machine, targets=[], bench=False).check()


# -- the head in chunks ----------------------------------------------------------------------------


def test_the_engine_never_applies_the_head_to_more_tokens_than_the_plan_allows(tmp_path):
    """Calibration loss with the head applied 7 tokens at a time equals transformers' loss on the full
    logits; no call of the head saw more than 7 tokens."""
    from prunecomp_export.engine.layerwise import LayerwiseModel
    from prunecomp_export.engine.stream_cache import StreamCache
    from prunecomp_export.engine.streams import ResidualStreams
    from prunecomp_export.engine.variant import dense_variant
    from prunecomp_export.source.weights import SafetensorsCheckpoint
    from tests.conftest import make_model

    model = make_model("llama")
    model.save_pretrained(tmp_path)
    batches = [torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(b)) for b in range(2)]
    layerwise = LayerwiseModel(
        SafetensorsCheckpoint(tmp_path), model.config, adapter_for(model.config), torch.device("cpu"), torch.float32,
        resident=False, logits_chunk=7,
    )  # fmt: skip
    seen: list[int] = []
    head = layerwise.head

    def counting_head(*args, **kwargs):
        from contextlib import contextmanager

        @contextmanager
        def wrapped():
            with head(*args, **kwargs) as logits_of:
                yield lambda hidden: seen.append(hidden.reshape(-1, hidden.shape[-1]).shape[0]) or logits_of(hidden)

        return wrapped()

    layerwise.head = counting_head
    with StreamCache.open("device", torch.device("cpu"), len(batches), tmp_path) as cache:
        streams = ResidualStreams(layerwise, batches, cache, dense_variant(model.config.num_hidden_layers))
        streams.capture()
        loss = streams.lm_loss()
    with torch.no_grad():
        expected = sum(model(input_ids=ids, labels=ids).loss.item() * ids[:, 1:].numel() for ids in batches)
    assert loss == pytest.approx(expected / sum(ids[:, 1:].numel() for ids in batches), rel=1e-5)
    assert seen and max(seen) <= 7


def test_a_151k_vocabulary_prunes_with_the_demo_calibration_under_a_budget_below_one_batch_of_logits(tmp_path):
    """Qwen2.5's 151,936-token vocabulary: one calibration batch of the demo (4 x 512 tokens) has 1.24 GB
    of fp32 logits. With a 300 MB budget the run goes through (prune, perplexity, the reload check) and
    the CLI's memory never grows by anything near a batch of logits."""
    import subprocess
    import sys

    from tests.conftest import synthetic_checkpoints

    source = synthetic_checkpoints().write_synthetic_checkpoint(
        tmp_path / "model", "tiny-151k-vocab", "float32", shards=1
    )
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    batch_logits = 4 * 512 * vocab * 4
    assert vocab == 151936 and batch_logits > 1.2 * GB
    recipe_file = tmp_path / "r.json"
    recipe_file.write_text(json.dumps({
        "model": {"source": str(source)},
        "calibration": {"source": "builtin", "corpus": "gensim-wiki", "num_samples": 16, "seq_len": 512,
                        "batch_size": 4},
        "prune": {"num_drop": 1},
        "evaluation": {"perplexity": {"corpora": ["gensim-wiki-heldout"], "seq_len": 512, "max_windows": 4},
                       "baseline": False, "cache_dense": False},
        "execution": {"device": "cpu", "memory_budget": "300MB"},
        "output": {"dir": str(tmp_path / "out")},
    }))  # fmt: skip
    subprocess.run([sys.executable, "-m", "prunecomp_export", str(recipe_file)], check=True, cwd=tmp_path)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    chunk = results["memory_plan"]["logits_chunk_tokens"]
    assert chunk * vocab * 4 * 3 <= 300 * MB / 8
    costs = {cost["name"]: cost for cost in results["costs"]}
    grown = max(costs[name]["peak_rss_bytes"] for name in ("prune", "evaluate")) - costs["load"]["peak_rss_bytes"]
    assert grown < batch_logits / 4, grown  # the head's output never existed for a whole batch
    assert results["trajectory"]["rounds"][0]["step"]["removed"]
    # the divergence from the dense model (both heads over the vocabulary) within the same plan
    assert [(m["variant"], m["kind"]) for m in results["measurements"]] == [
        ("dense", "perplexity"), ("prunecomp", "perplexity"), ("prunecomp", "kl_divergence"),
        ("prunecomp", "top1_agreement"),
    ]  # fmt: skip


# -- the vllm target: its memory from the plan ------------------------------------------------------


def test_vllm_on_gpus_gets_the_budgets_share_of_the_gpu_and_the_pruned_model_split_over_them():
    """A 70B model pruned to 60 layers, bf16, over 4 GPUs of 80 GB with 70 GB free: vLLM is told
    D / total = 0.8 x 70 / 80 of each GPU; each holds W' / 4, W' = W less 20 layers (by hand)."""
    from prunecomp_export.targets.vllm import Options

    machine = Machine("cuda", 70 * GB, 256 * GB, 80 * GB)
    options = Options(dtype="bfloat16", tensor_parallel_size=4)
    plan = make_memory_plan(recipe(), shape_70b(), machine, targets={"vllm": options}, bench=False, layers_after=60)
    stage = plan.stage("targets: vllm")
    assert stage.vllm_engine == {"gpu_memory_utilization": round(0.8 * 70 / 80, 3)}
    assert stage.fits and stage.device_bytes == int(0.8 * 70 * GB)
    pruned = WEIGHTS - 20 * 2 * LAYER_PARAMS
    assert f"{pruned / 4 / GB:.2f} GB of weights a device (4 device(s))" in stage.how
    # one GPU cannot hold 106 GB of weights: refused in one line, before any weight is read
    one = make_memory_plan(recipe(), shape_70b(), machine, targets={"vllm": Options(dtype="bfloat16")}, bench=False,
                           layers_after=60)  # fmt: skip
    with pytest.raises(RecipeError, match=r"too small for the vllm target.*tensor_parallel_size"):
        one.check()


def test_vllm_on_the_cpu_gets_a_kv_cache_of_what_the_budget_leaves_and_a_context_that_fits():
    """SmolLM2-135M's shape pruned to 24 layers in fp32 with the demo's 600 MB budget: the KV cache is
    the budget less the weights, max_model_len the tokens it holds (by hand); 300 MB is refused."""
    from prunecomp_export.targets.vllm import Options

    config = config_of({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                        "max_position_embeddings": 8192, "tie_word_embeddings": True})  # fmt: skip
    shape = ModelShape.from_config(config, adapter_for(config), torch.float32)
    layer = 4 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576)
    assert shape.layer_bytes == layer
    weights = 4 * (49152 * 576 + 576) + 24 * layer  # tied embedding, final norm, 24 layers
    budget = 600 * 10**6
    plan = make_memory_plan(recipe(execution={"memory_budget": "600MB"}), shape, Machine("cpu", None, 8 * GB),
                            targets={"vllm": Options()}, bench=False, layers_after=24)  # fmt: skip
    engine = plan.stage("targets: vllm").vllm_engine
    assert engine["kv_cache_memory_bytes"] == budget - weights
    assert engine["max_model_len"] == min(8192, (budget - weights) // (2 * 192 * 24 * 4))
    assert Options().engine(engine)["kv_cache_memory_bytes"] == budget - weights  # what vLLM is started with
    tight = make_memory_plan(recipe(execution={"memory_budget": "300MB"}), shape, Machine("cpu", None, 8 * GB),
                             targets={"vllm": Options()}, bench=False, layers_after=24)  # fmt: skip
    refused = tight.stage("targets: vllm")  # (the prune stage refuses 300 MB too)
    assert not refused.fits and "too small for the vllm target" in refused.refusal and not refused.vllm_engine


# -- the onnx target: what onnxruntime-genai's builder holds ---------------------------------------


@pytest.mark.parametrize(
    ("dtype", "provider", "graph_bytes", "packed_bytes"),
    [
        ("fp32", "cpu", 0, 0),  # converted a tensor at a time as it is written
        ("int8", "cpu", 4, 1 + 4 / 32),  # the whole graph in fp32 first, then int8 and a scale per 32
        ("int4", "cpu", 4, 0.5 + 4 / 32),
        ("int4", "cuda", 2, 0.5 + 4 / 32),  # on CUDA the builder's graph is fp16
    ],
)
def test_the_genai_build_of_a_70b_model_counts_the_graph_it_makes_before_quantising(
    dtype, provider, graph_bytes, packed_bytes
):
    """Llama-3-70B pruned to 64 layers: the builder holds W' (bf16), four fp32 copies of the largest
    tensor and, to quantise, the whole graph in its I/O dtype and the packed weights (by hand); the
    target runs two processes of its own (its child and the builder's)."""
    from prunecomp_export.memory import PROCESS_OVERHEAD_BYTES
    from prunecomp_export.targets.onnx import Options

    machine = Machine("cuda", 70 * GB, 2000 * GB, 80 * GB) if provider == "cuda" else Machine("cpu", None, 2000 * GB)
    plan = make_memory_plan(recipe(), shape_70b(), machine, targets={"onnx": Options(dtype=dtype, provider=provider)},
                            bench=False, layers_after=64)  # fmt: skip
    stage = plan.stage("targets: onnx")
    params = L * LAYER_PARAMS - 16 * LAYER_PARAMS + 2 * EMBED_PARAMS + D
    built = 2 * params + 4 * (2 * TENSOR) + graph_bytes * params + int(params * packed_bytes)
    exported = {"fp32": 4, "int8": 1, "int4": 0.5}[dtype] * params
    assert stage.host_bytes == pytest.approx(max(built, exported), abs=16)
    assert stage.process_overhead_bytes == 2 * PROCESS_OVERHEAD_BYTES
    if graph_bytes:
        graph = f"whole graph in {'fp32' if graph_bytes == 4 else 'fp16'} ({graph_bytes * params / GB:.2f} GB)"
        assert graph in stage.how


def test_vllm_counts_its_own_processes_the_caller_the_engine_core_and_a_worker_a_device():
    from prunecomp_export.memory import PROCESS_OVERHEAD_BYTES, VLLM_PROCESS_BYTES
    from prunecomp_export.targets.vllm import Options

    machine = Machine("cuda", 70 * GB, 256 * GB, 80 * GB)
    four = make_memory_plan(recipe(), shape_70b(), machine, targets={"vllm": Options(tensor_parallel_size=4)},
                            bench=False, layers_after=60).stage("targets: vllm")  # fmt: skip
    assert four.process_overhead_bytes == PROCESS_OVERHEAD_BYTES + 6 * VLLM_PROCESS_BYTES
    big = recipe(execution={"memory_budget": "200GB"})
    cpu = make_memory_plan(big, shape_70b(), Machine("cpu", None, 512 * GB), targets={"vllm": Options()}, bench=False,
                           layers_after=60).stage("targets: vllm")  # fmt: skip
    assert cpu.process_overhead_bytes == PROCESS_OVERHEAD_BYTES + 3 * VLLM_PROCESS_BYTES
