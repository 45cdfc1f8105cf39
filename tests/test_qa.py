"""Offline QA tasks and the lm-eval wrapper, on gensim's data and a tiny random model (no downloads)."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from prunecomp_export.errors import RecipeError
from prunecomp_export.evaluation import qa

OFFLINE = ["gensim_analogy", "gensim_sentiment"]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qa.materialize_offline_tasks(tmp_path_factory.mktemp("tasks"))


# ------------------------------------------------------------------------------------------- data


def test_same_seed_same_files_other_seed_other_sample(tmp_path: Path, task_dir: Path) -> None:
    again = qa.materialize_offline_tasks(tmp_path / "again")
    for name in OFFLINE:
        assert (again / f"{name}.jsonl").read_bytes() == (task_dir / f"{name}.jsonl").read_bytes()
    other = qa.materialize_offline_tasks(tmp_path / "other", seed=qa.DEFAULT_SEED + 1)
    assert (other / "gensim_analogy.jsonl").read_bytes() != (task_dir / "gensim_analogy.jsonl").read_bytes()
    assert (other / "gensim_sentiment.jsonl").read_bytes() != (task_dir / "gensim_sentiment.jsonl").read_bytes()


def test_rematerializing_keeps_unchanged_files(tmp_path: Path) -> None:
    """Unchanged files keep their mtime, which keys the datasets cache of the JSON loader."""
    first = qa.materialize_offline_tasks(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    qa.materialize_offline_tasks(tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamps
    assert sorted(stamps) == sorted(f"{name}.{ext}" for name in OFFLINE for ext in ("jsonl", "yaml"))


def test_default_task_dir_is_under_the_prunecomp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNECOMP_CACHE", str(tmp_path))
    written = qa.materialize_offline_tasks()
    assert written == tmp_path / "lm_eval_tasks" / f"v{qa.TASKS_VERSION}-seed{qa.DEFAULT_SEED}"
    assert (written / "gensim_analogy.yaml").is_file()


def test_analogy_questions_have_one_right_answer(task_dir: Path) -> None:
    sections = qa._read_analogy_sections(qa.gensim_test_data() / "questions-words.txt")
    docs = _read_jsonl(task_dir / "gensim_analogy.jsonl")
    expected = sum(min(qa.ANALOGY_PER_SECTION, len(rows)) for rows in sections.values())
    assert len(docs) == expected >= 200
    assert Counter(doc["section"] for doc in docs) == {
        name: min(qa.ANALOGY_PER_SECTION, len(rows)) for name, rows in sections.items()
    }
    assert len({doc["id"] for doc in docs}) == len(docs)
    for doc in docs:
        a, b, c, d = sections[doc["section"]][int(doc["id"].rsplit("/", 1)[1])]
        assert doc["question"] == f"{a} is to {b} as {c} is to"
        choices = doc["choices"]
        assert len(choices) == qa.ANALOGY_NUM_CHOICES
        assert len({choice.lower() for choice in choices}) == len(choices)
        assert choices[doc["label"]] == d
        assert [choice.lower() for choice in choices].count(d.lower()) == 1
        # No distractor is also a right answer for c anywhere in its section, and all are the section's words.
        right_for_c = {
            y.lower()
            for x1, y1, x2, y2 in sections[doc["section"]]
            for x, y in ((x1, y1), (x2, y2))
            if x.lower() == c.lower()
        }
        answer_words = {w for _, y1, _, y2 in sections[doc["section"]] for w in (y1, y2)}
        for i, choice in enumerate(choices):
            assert choice in answer_words
            if i != doc["label"]:
                assert choice.lower() not in right_for_c | {a.lower(), b.lower(), c.lower()}
    # Shuffled: the first questions (what `limit` evaluates) already span many sections.
    assert len({doc["section"] for doc in docs[:40]}) >= 8
    # The right answer is not always in the same position.
    assert len({doc["label"] for doc in docs}) == qa.ANALOGY_NUM_CHOICES


def test_sentiment_sentences_are_labelled_and_balanced(task_dir: Path) -> None:
    docs = _read_jsonl(task_dir / "gensim_sentiment.jsonl")
    source = (qa.gensim_test_data() / "pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines()
    assert len(docs) == len(source)
    labels = Counter(doc["label"] for doc in docs)
    assert labels == Counter(0 if line.startswith("__label__neg") else 1 for line in source)
    assert set(labels) == {0, 1}
    for doc in docs:
        assert doc["choices"] == list(qa.SENTIMENT_CHOICES)
        assert doc["question"] == f"Review: {doc['sentence']}\nSentiment:"
        assert "__label__" not in doc["question"] and "\ufffd" not in doc["question"]
    for n in (20, 50, 100):  # the prefixes that `limit` keeps are balanced within 3 binomial sigmas
        positives = sum(doc["label"] for doc in docs[:n])
        assert abs(positives - n / 2) <= 3 * math.sqrt(n) / 2
    assert any("—" in doc["sentence"] for doc in docs), "cp1252 em dashes should decode"


def test_detokenize() -> None:
    assert qa._detokenize("silly , tedious ( and long ) . it 's bad !") == "silly, tedious (and long). it's bad!"


def test_lm_eval_loads_our_yaml(task_dir: Path) -> None:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    assert sorted(manager.all_tasks) == OFFLINE
    loaded = manager.load(OFFLINE)["tasks"]
    for name in OFFLINE:
        task = loaded[name]
        rows = _read_jsonl(task_dir / f"{name}.jsonl")
        docs = list(task.test_docs())
        assert task.OUTPUT_TYPE == "multiple_choice"
        assert len(docs) == len(rows)
        for doc, row in zip(docs[:5], rows[:5], strict=True):
            assert task.doc_to_text(doc) == row["question"]
            assert task.doc_to_choice(doc) == row["choices"]
            assert task.doc_to_target(doc) == row["label"]
        assert [m["metric"] for m in task.config.metric_list] == ["acc"]


# --------------------------------------------------------------------------------------- evaluation


def _tiny_checkpoint(path: Path, docs: list[dict]) -> tuple[torch.nn.Module, object]:
    """A random 2-layer Llama and a byte-level BPE tokenizer trained in memory on the task text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([doc["question"] + " " + " ".join(doc["choices"]) for doc in docs], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # large enough weights that the choices get clearly different scores
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


@torch.no_grad()
def _manual_correct(model: torch.nn.Module, tokenizer, docs: list[dict]) -> list[int]:
    """Each question right (1) or wrong (0) by hand, scoring " choice" after the question the way
    lm-eval's HFLM encodes a pair."""
    correct = []
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer.encode(doc["question"])
            whole = tokenizer.encode(doc["question"] + " " + choice)
            continuation = whole[len(context) :]
            logprobs = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation)))
        correct.append(int(max(range(len(scores)), key=scores.__getitem__) == doc["label"]))
    return correct


def test_evaluate_qa_on_tiny_model(tmp_path: Path, task_dir: Path) -> None:
    limit = 6
    docs = {name: _read_jsonl(task_dir / f"{name}.jsonl") for name in OFFLINE}
    model, tokenizer = _tiny_checkpoint(tmp_path / "model", [d for rows in docs.values() for d in rows])

    result = qa.evaluate_qa(tmp_path / "model", OFFLINE, limit=limit, batch_size=4, task_dir=task_dir)

    assert set(result) == {*OFFLINE, "protocol"}
    for name, chance in (("gensim_analogy", 1 / qa.ANALOGY_NUM_CHOICES), ("gensim_sentiment", 0.5)):
        score = result[name]
        assert set(score) == {"acc", "acc_stderr", "n", "chance", "correct", "questions_sha256"}
        assert score["n"] == limit
        assert score["chance"] == pytest.approx(chance)
        assert 0.0 <= score["acc"] <= 1.0
        assert score["acc_stderr"] is None or score["acc_stderr"] >= 0.0
        # lm-eval scored exactly our questions, choices and labels; its per-question results in doc order
        manual = _manual_correct(model, tokenizer, docs[name][:limit])
        assert score["correct"] == manual
        assert score["acc"] == pytest.approx(sum(manual) / limit)
    protocol = result["protocol"]
    assert protocol["num_fewshot"] == 0 and protocol["limit"] == limit and protocol["batch_size"] == 4
    assert protocol["dtype"] == "float32" and protocol["lm_eval_version"].startswith("0.4.")
    assert protocol["offline_tasks"]["seed"] == qa.DEFAULT_SEED
    assert set(protocol["offline_tasks"]["data_sha256"]) == set(OFFLINE)
    assert protocol["task_versions"] == {name: float(qa.TASKS_VERSION) for name in OFFLINE}
    assert protocol["backend"] == "hf" and protocol["placement"]["modules"] == {"cpu": 1}


def test_evaluate_qa_within_a_memory_plan_offloads_and_scores_the_same(tmp_path: Path, task_dir: Path) -> None:
    """lm-eval's model placed by accelerate with max_memory below its size: offloaded to disk, the same
    accuracy on the same questions as the model loaded whole."""
    docs = {name: _read_jsonl(task_dir / f"{name}.jsonl") for name in OFFLINE}
    model, tokenizer = _tiny_checkpoint(tmp_path / "model", [d for rows in docs.values() for d in rows])
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    result = qa.evaluate_qa(
        tmp_path / "model", ["gensim_sentiment"], limit=6, batch_size=4, task_dir=task_dir,
        max_memory={"cpu": size // 3}, offload_folder=str(tmp_path / "offload"), max_length=256,
    )  # fmt: skip
    assert result["protocol"]["placement"]["modules"].get("disk", 0) > 0  # weights read from disk as they run
    manual = _manual_correct(model, tokenizer, docs["gensim_sentiment"][:6])
    assert result["gensim_sentiment"]["correct"] == manual
    assert result["gensim_sentiment"]["acc"] == pytest.approx(sum(manual) / 6)


def _result(accs: dict[str, float]) -> dict:
    return {
        **{name: {"acc": acc, "acc_stderr": None, "n": 10, "chance": 0.25} for name, acc in accs.items()},
        "protocol": {},
    }


def test_kept_percent_by_hand() -> None:
    dense = _result({"gensim_analogy": 0.8, "gensim_sentiment": 0.6})
    pruned = _result({"gensim_analogy": 0.6, "gensim_sentiment": 0.3})
    # mean pruned 0.45 / mean dense 0.7 = 64.2857...%
    assert qa.kept_percent(pruned, dense) == pytest.approx(0.45 / 0.7 * 100)
    assert qa.kept_percent(dense, dense) == pytest.approx(100.0)
    assert qa.mean_accuracy(dense) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="different tasks"):
        qa.kept_percent(_result({"gensim_analogy": 0.6}), dense)


# ------------------------------------------------------------------------------------------- names


@pytest.fixture
def fake_lm_eval_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in for lm-eval's task index, which takes ~20 s to build (the real one: integration tests)."""
    monkeypatch.setattr(qa, "_lm_eval_task_names", lambda: frozenset({"arc_easy", "arc_challenge", "hellaswag"}))


def test_offline_names_need_no_lm_eval_index(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> frozenset[str]:
        raise AssertionError("lm-eval's index should not be built for offline tasks")

    monkeypatch.setattr(qa, "_lm_eval_task_names", boom)
    assert qa.validate_tasks(OFFLINE) == []


@pytest.mark.usefixtures("fake_lm_eval_names")
def test_lm_eval_names_pass_through() -> None:
    assert qa.validate_tasks(["gensim_analogy", "arc_easy", "hellaswag"]) == ["arc_easy", "hellaswag"]


@pytest.mark.usefixtures("fake_lm_eval_names")
@pytest.mark.parametrize(("name", "suggestion"), [("gensim_analogie", "gensim_analogy"), ("arc_esay", "arc_easy")])
def test_unknown_task_is_a_recipe_error_with_a_suggestion(tmp_path: Path, name: str, suggestion: str) -> None:
    with pytest.raises(RecipeError) as info:
        qa.evaluate_qa(tmp_path / "no-model-needed", ["gensim_sentiment", name])
    message = str(info.value)
    assert repr(name) in message and f"did you mean {suggestion!r}" in message
    assert info.value.key == qa.DEFAULT_KEY


@pytest.mark.usefixtures("fake_lm_eval_names")
def test_empty_task_list_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="no QA tasks"):
        qa.validate_tasks([])


def test_the_qa_child_follows_the_memory_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch size, context length and accelerate's placement come from the plan; the vllm backend runs
    in vLLM's interpreter with the plan's engine arguments."""
    from types import SimpleNamespace

    from prunecomp_export.engine.variant import dense_variant
    from prunecomp_export.evaluation.evaluator import Evaluator
    from prunecomp_export.memory import QA, Machine, ModelShape, make_memory_plan
    from prunecomp_export.progress import Reporter
    from prunecomp_export.recipe import validate_recipe
    from prunecomp_export.targets.runtimes import vllm

    shape = ModelShape(
        num_layers=4, hidden_size=256, kv_size=128, mlp_size=512, num_heads=4, vocab_size=50_000, dtype_bytes=4,
        weights_bytes=400_000_000, slice_bytes=60_000_000, tensor_bytes=50_000_000, max_positions=4096,
    )  # fmt: skip
    variants = SimpleNamespace(model=SimpleNamespace(device="cpu", dtype=torch.float32), scratch=tmp_path / "scratch")
    monkeypatch.setenv(vllm.PYTHON_ENV, sys.executable)
    for backend in ("hf", "vllm"):
        recipe = validate_recipe({
            "model": {"source": "x"}, "prune": {"num_drop": 1}, "execution": {"memory_budget": "2GB"},
            "evaluation": {"perplexity": None, "qa": {"tasks": ["gensim_sentiment"], "max_length": 256,
                                                      "backend": backend, "batch_size": 32}},
        })  # fmt: skip
        plan = make_memory_plan(recipe, shape, Machine("cpu", None, 24 * 10**9), targets=[], bench=False)
        evaluator = Evaluator(recipe.evaluation, None, Reporter(), plan)
        request = evaluator.qa_request(variants, dense_variant(4), tmp_path / "model")
        stage = plan.stage(QA)
        assert request.kwargs["backend"] == backend and request.kwargs["max_length"] == stage.qa_length == 256
        if backend == "hf":
            assert request.python is None
            assert request.kwargs["batch_size"] == stage.load.batch_size < 32
            assert request.kwargs["max_memory"] == stage.load.max_memory == {"cpu": stage.load.max_memory["cpu"]}
            assert request.kwargs["offload_folder"].startswith(str(tmp_path / "scratch"))
        else:
            assert request.python == vllm.resolve_python()
            assert request.kwargs["vllm_engine"] == stage.vllm_engine
            assert stage.vllm_engine["kv_cache_memory_bytes"] == 2**30  # vLLM on the CPU: a fixed KV cache
            assert request.env["VLLM_NO_USAGE_STATS"] == "1"


def test_an_uninstalled_qa_backend_is_refused_before_any_weight_is_read(tmp_path: Path, monkeypatch, tiny_dir) -> None:
    import subprocess

    from click.testing import CliRunner

    from prunecomp_export.cli import main
    from prunecomp_export.targets.runtimes import vllm

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    monkeypatch.setenv(vllm.PYTHON_ENV, str(tmp_path / "venv" / "bin" / "python"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{source: {tiny_dir}}}\nprune: {{num_drop: 1}}\n"
        "evaluation: {qa: {tasks: [gensim_sentiment], backend: vllm}}\n"
    )
    result = CliRunner().invoke(main, [str(recipe), "--dry-run"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "evaluation.qa.backend: backend vllm:" in line and "vllm" in line
