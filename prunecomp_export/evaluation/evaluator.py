"""Accuracy of one model variant: held-out token perplexity on several corpora and zero-shot
multiple-choice accuracy through lm-evaluation-harness. Every figure is a ``Measurement`` row
labelled with its variant, the number of layers removed and how it was measured."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from prunecomp_export.engine.streams import Divergence
from prunecomp_export.engine.variant import Variant
from prunecomp_export.errors import RecipeError
from prunecomp_export.progress import Reporter
from prunecomp_export.recipe import EvaluationSpec
from prunecomp_export.source import calibration, corpus
from prunecomp_export.source.loading import cache_root

if TYPE_CHECKING:
    from prunecomp_export.memory import MemoryPlan
    from prunecomp_export.variants import ModelVariants

VARIANTS = ("dense", "baseline", "prunecomp")
#: token-level perplexity with the paper's protocol; lm-evaluation-harness's ``wikitext`` task reports
#: word and byte perplexity per document, a different number
PPL_PROTOCOL = "token perplexity: joined with '\\n\\n', tokenized once, non-overlapping windows, exp(mean NLL)"
#: how the pruned models' token distributions are compared with the dense model's (the same windows)
DIVERGENCE_PROTOCOL = (
    "per next-token position of the perplexity windows: KL(dense || model) in nats over the whole vocabulary "
    "(mean, 90th and 99th percentiles) and top-1 agreement (both argmax tokens equal); the dense model's "
    "streams entering the final norm are stored once per corpus with the dense results, and both heads run "
    "over chunks of positions within the memory plan: exact, no vocabulary truncation"
)


@dataclass
class Measurement:
    variant: str  # dense | baseline | prunecomp
    layers_removed: int
    kind: str  # perplexity | accuracy | kl_divergence | top1_agreement
    dataset: str
    value: float
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class Evaluator:
    """Holds the tokenized evaluation windows so every variant is measured on the same tokens."""

    def __init__(self, spec: EvaluationSpec, tokenizer, reporter: Reporter, memory: MemoryPlan | None = None):
        self.spec = spec
        self.tokenizer = tokenizer
        self.reporter = reporter
        #: the run's memory plan: where QA's child loads the model (None: whole, on the engine's device)
        self.memory = memory
        self.windows = {}
        #: per corpus, the dense model's streams entering the final norm, per batch (host memory)
        self.dense_finals: dict[str, list] = {}
        if spec.perplexity is not None:
            for index, name in enumerate(spec.perplexity.corpora):
                key = f"evaluation.perplexity.corpora.{index}"
                tokens = calibration.tokenize_joined(tokenizer, corpus.resolve_corpus(name, key=key))
                try:
                    self.windows[name] = calibration.spaced_windows(
                        tokens, spec.perplexity.seq_len, spec.perplexity.max_windows
                    )
                except ValueError as exc:
                    raise RecipeError(str(exc), key=key) from None

    @property
    def enabled(self) -> bool:
        return bool(self.windows) or self.spec.qa is not None

    def protocol(self) -> dict:
        spec = self.spec
        return {
            "perplexity": None
            if spec.perplexity is None
            else {
                "protocol": PPL_PROTOCOL,
                "seq_len": spec.perplexity.seq_len,
                "windows": {name: int(w.shape[0]) for name, w in self.windows.items()},
                "note": "token-level perplexity; lm-eval's wikitext task reports word perplexity, a different number",
                "divergence": DIVERGENCE_PROTOCOL,
            },
            "qa": None if spec.qa is None else self._qa_protocol(),
        }

    def _qa_protocol(self) -> dict:
        from prunecomp_export.evaluation import qa

        return {
            "harness": "lm-evaluation-harness",
            "num_fewshot": 0,
            "metric": "acc",
            # the offline tasks' prompts and data: part of the dense-cache key
            "offline_tasks_version": qa.TASKS_VERSION,
            "offline_tasks_seed": qa.DEFAULT_SEED,
            **self.spec.qa.model_dump(),
        }

    def evaluate(self, variants: ModelVariants, models: list[Variant]) -> list[Measurement]:
        """Every figure of ``models``: perplexity of each, run layer by layer from the source files in
        this process; then, with this process's weights released, QA of each by lm-eval on the variant
        written as a plain checkpoint, in a child process within the memory plan."""
        rows = [row for variant in models for row in self.perplexities(variants, variant)]
        if self.spec.qa is not None:
            variants.model.release()
            rows += [row for variant in models for row in self.accuracies(variants, variant)]
        return rows

    def perplexities(self, variants: ModelVariants, variant: Variant) -> list[Measurement]:
        rows = []
        k = variant.layers_removed
        details = _details(variant)
        dense = variant.name == "dense"
        for name, windows in self.windows.items():
            reference = None if dense else self.dense_finals.get(name)
            figures = variants.window_figures(variant, windows, self.spec.perplexity.batch_size, reference)
            if dense:
                self.dense_finals[name] = [hidden.cpu() for hidden in figures.finals]
            self.reporter.log(f"{variant.name} ({k} removed) perplexity on {name}: {figures.perplexity:.2f}")
            rows.append(Measurement(variant.name, k, "perplexity", name, figures.perplexity, dict(details)))
            if figures.divergence is not None:
                rows += self._divergence_rows(variant, name, figures.divergence, details)
        return rows

    def _divergence_rows(self, variant: Variant, name: str, divergence: Divergence, details: dict) -> list[Measurement]:
        k = variant.layers_removed
        self.reporter.log(
            f"{variant.name} ({k} removed) on {name}: KL from dense {divergence.mean_kl:.4f} nats/token "
            f"(p99 {divergence.p99_kl:.3f}), top-1 agreement {100 * divergence.top1_agreement:.1f} %"
        )
        spread = {"p90": divergence.p90_kl, "p99": divergence.p99_kl, "tokens": divergence.tokens}
        return [
            Measurement(variant.name, k, "kl_divergence", name, divergence.mean_kl, {**details, **spread}),
            Measurement(
                variant.name, k, "top1_agreement", name, divergence.top1_agreement,
                {**details, "tokens": divergence.tokens},
            ),
        ]  # fmt: skip

    def accuracies(self, variants: ModelVariants, variant: Variant) -> list[Measurement]:
        """lm-eval scores the checkpoint as users will load it: a plain directory on disk."""
        from prunecomp_export.child import run_child
        from prunecomp_export.evaluation import qa

        with variants.materialised(variant) as directory:
            child = run_child(self.qa_request(variants, variant, directory))
        rows = []
        k = variant.layers_removed
        for task, score in qa.task_scores(child.value).items():
            self.reporter.log(f"{variant.name} ({k} removed) accuracy on {task}: {score['acc']:.3f}")
            row_details = {
                **_details(variant), "n": score["n"], "stderr": score["acc_stderr"], "chance": score["chance"],
                "correct": score["correct"], "questions_sha256": score["questions_sha256"],
            }  # fmt: skip
            rows.append(Measurement(variant.name, k, "accuracy", task, score["acc"], row_details))
        return rows

    def qa_request(self, variants: ModelVariants, variant: Variant, directory):
        """The QA child: lm-eval's hf model placed by the memory plan (what does not fit offloaded into
        the run's scratch directory), or its vLLM model in vLLM's interpreter."""
        from prunecomp_export.child import ChildRequest

        spec = self.spec.qa
        device = str(variants.model.device)
        kwargs = {"model_dir": str(directory), "tasks": spec.tasks, "limit": spec.limit, "batch_size": spec.batch_size,
                  "dtype": str(variants.model.dtype).removeprefix("torch."), "device": device,
                  "backend": spec.backend, "max_length": spec.max_length}  # fmt: skip
        python, env = None, {}
        from prunecomp_export.memory import QA

        stage = self.memory.stage(QA) if self.memory is not None else None
        if stage is not None:
            kwargs["max_length"] = stage.qa_length
            if stage.load is not None:
                offload = variants.scratch / "offload-qa"
                kwargs.update(batch_size=stage.load.batch_size, max_memory=stage.load.max_memory,
                              offload_folder=str(offload))  # fmt: skip
            if stage.vllm_engine is not None:
                kwargs["vllm_engine"] = stage.vllm_engine
        if spec.backend == "vllm":
            from prunecomp_export.targets.runtimes import vllm

            python, env = vllm.resolve_python(), vllm.vllm_env(vllm.Settings())
        elif device.startswith("cuda"):
            # lm-eval places the model on every GPU it sees: it sees the plan's one
            env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2] or "0"
            kwargs["device"] = "cuda:0"
        return ChildRequest(
            name=f"QA of {variant.name} ({variant.layers_removed} removed)",
            target="prunecomp_export.evaluation.qa:evaluate_qa",
            kwargs=kwargs,
            python=python,
            env=env,
        )


def _details(variant: Variant) -> dict:
    return {"removed": variant.removed} if variant.name == "baseline" else {}


class DenseCache:
    """The dense model's measurements and its streams entering the final norm on each perplexity
    corpus (the reference of the divergence figures), keyed by the source model's hash and the
    evaluation protocol, so re-runs (e.g. with another pruning amount) don't pay for them twice."""

    def __init__(self, model_sha256: str | None, protocol: dict, enabled: bool):
        self.path = None
        if enabled and model_sha256:
            key = hashlib.sha256(json.dumps([model_sha256, protocol], sort_keys=True).encode()).hexdigest()[:24]
            self.path = cache_root() / "dense" / f"{key}.json"

    @property
    def streams_path(self):
        return self.path.with_suffix(".streams.safetensors")

    def load(self, corpora: list[str]) -> tuple[list[Measurement], dict[str, list]] | None:
        """The rows and, per corpus, the final-norm streams per batch; None unless both are stored."""
        if self.path is None or not self.path.is_file() or not self.streams_path.is_file():
            return None
        from safetensors.torch import load_file

        stored = load_file(self.streams_path)
        finals = {name: _batches_of(stored, index) for index, name in enumerate(corpora)}
        rows = [Measurement(**row) for row in json.loads(self.path.read_text())]
        return rows, finals

    def store(self, rows: list[Measurement], finals: dict[str, list]) -> None:
        if self.path is None:
            return
        from safetensors.torch import save_file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"corpus{index}.batch{b}": hidden.contiguous()
            for index, batches in enumerate(finals.values())
            for b, hidden in enumerate(batches)
        }
        staging = self.streams_path.with_suffix(f".tmp-{os.getpid()}")
        save_file(tensors, staging)
        os.replace(staging, self.streams_path)
        staging = self.path.with_suffix(f".tmp-{os.getpid()}")
        staging.write_text(json.dumps([row.to_json() for row in rows]))
        os.replace(staging, self.path)


def _batches_of(stored: dict, index: int) -> list:
    count = sum(1 for key in stored if key.startswith(f"corpus{index}."))
    return [stored[f"corpus{index}.batch{b}"] for b in range(count)]
