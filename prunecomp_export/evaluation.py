"""Accuracy of one model variant: held-out token perplexity on several corpora and zero-shot
multiple-choice accuracy through lm-evaluation-harness. Every figure is a ``Measurement`` row
labelled with its variant, the number of layers removed and how it was measured."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from prunecomp_export import calibration, corpus
from prunecomp_export.errors import RecipeError
from prunecomp_export.perplexity import PROTOCOL as PPL_PROTOCOL
from prunecomp_export.perplexity import perplexity
from prunecomp_export.progress import Reporter
from prunecomp_export.recipe import EvaluationSpec

VARIANTS = ("dense", "baseline", "prunecomp")


@dataclass
class Measurement:
    variant: str  # dense | baseline | prunecomp
    layers_removed: int
    kind: str  # perplexity | accuracy
    dataset: str
    value: float
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


class Evaluator:
    """Holds the tokenized evaluation windows so every variant is measured on the same tokens."""

    def __init__(self, spec: EvaluationSpec, tokenizer, reporter: Reporter):
        self.spec = spec
        self.tokenizer = tokenizer
        self.reporter = reporter
        self.windows = {}
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
            },
            "qa": None if spec.qa is None else self._qa_protocol(),
        }

    def _qa_protocol(self) -> dict:
        from prunecomp_export import qa

        return {
            "harness": "lm-evaluation-harness",
            "num_fewshot": 0,
            "metric": "acc",
            # the offline tasks' prompts and data: part of the dense-cache key
            "offline_tasks_version": qa.TASKS_VERSION,
            "offline_tasks_seed": qa.DEFAULT_SEED,
            **self.spec.qa.model_dump(),
        }

    def evaluate(self, model: nn.Module, variant: str, layers_removed: int) -> list[Measurement]:
        rows = []
        for name, windows in self.windows.items():
            value = perplexity(model, windows, self.spec.perplexity.batch_size, self.reporter)
            self.reporter.log(f"{variant} ({layers_removed} removed) perplexity on {name}: {value:.2f}")
            rows.append(Measurement(variant, layers_removed, "perplexity", name, value))
        if self.spec.qa is not None:
            rows.extend(self._qa(model, variant, layers_removed))
        return rows

    def _qa(self, model: nn.Module, variant: str, layers_removed: int) -> list[Measurement]:
        """lm-eval scores the checkpoint as users will load it: a plain directory on disk."""
        from prunecomp_export import qa
        from prunecomp_export.checkpoint import save_checkpoint

        spec = self.spec.qa
        with tempfile.TemporaryDirectory(prefix="prunecomp-qa-") as directory:
            save_checkpoint(model, self.tokenizer, Path(directory))
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            result = qa.evaluate_qa(
                Path(directory), spec.tasks, limit=spec.limit, batch_size=spec.batch_size, dtype=dtype
            )
        rows = []
        for task, score in qa.task_scores(result).items():
            self.reporter.log(f"{variant} ({layers_removed} removed) accuracy on {task}: {score['acc']:.3f}")
            details = {"n": score["n"], "stderr": score["acc_stderr"], "chance": score["chance"]}
            rows.append(Measurement(variant, layers_removed, "accuracy", task, score["acc"], details))
        return rows


class DenseCache:
    """The dense model's measurements, keyed by the source model's hash and the evaluation protocol,
    so re-runs (e.g. with another pruning amount) don't pay for them twice."""

    def __init__(self, model_sha256: str | None, protocol: dict, enabled: bool):
        self.path = None
        if enabled and model_sha256:
            key = hashlib.sha256(json.dumps([model_sha256, protocol], sort_keys=True).encode()).hexdigest()[:24]
            root = Path(os.environ.get("PRUNECOMP_CACHE", Path.home() / ".cache" / "prunecomp_export"))
            self.path = root / "dense" / f"{key}.json"

    def load(self) -> list[Measurement] | None:
        if self.path is None or not self.path.is_file():
            return None
        return [Measurement(**row) for row in json.loads(self.path.read_text())]

    def store(self, rows: list[Measurement]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_suffix(f".tmp-{os.getpid()}")
        staging.write_text(json.dumps([row.to_json() for row in rows]))
        os.replace(staging, self.path)
