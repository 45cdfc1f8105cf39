"""Token windows: random ones for calibration (the paper's protocol), evenly spaced
non-overlapping ones for held-out perplexity."""

from __future__ import annotations

import torch

from prunecomp_export.errors import RecipeError
from prunecomp_export.recipe import CalibrationSpec
from prunecomp_export.source import corpus

DOCUMENT_SEPARATOR = "\n\n"


def tokenize_joined(tokenizer, documents: list[str]) -> torch.Tensor:
    """Join documents with a blank line and tokenize once, as the perplexity protocol does."""
    ids = tokenizer(DOCUMENT_SEPARATOR.join(documents), add_special_tokens=False, return_tensors="pt")
    return ids["input_ids"][0]


def random_windows(tokens: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens at random starts (seeded), shape [count, length]."""
    if tokens.numel() < length + 1:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one window of {length}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - length, (count,), generator=generator)
    return torch.stack([tokens[s : s + length] for s in starts.tolist()])


def spaced_windows(tokens: torch.Tensor, length: int, max_windows: int | None) -> torch.Tensor:
    """Non-overlapping windows of ``length``; if there are more than ``max_windows``, take that many
    evenly spaced ones so the sample covers the whole text."""
    total = tokens.numel() // length
    if total == 0:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one window of {length}")
    windows = tokens[: total * length].view(total, length)
    if max_windows is not None and total > max_windows:
        picks = torch.linspace(0, total - 1, max_windows).round().long()
        windows = windows[picks]
    return windows


def check_calibration_source(spec: CalibrationSpec) -> None:
    """The checks that need no data loading, so --dry-run catches a missing file or corpus."""
    if spec.source == "builtin" and spec.corpus not in corpus.BUILTIN:
        raise RecipeError(corpus.BUILTIN.unknown_message(spec.corpus or ""), key="calibration.corpus")
    if spec.source == "text":
        corpus.check_files(spec.files, key="calibration.files")


def calibration_documents(spec: CalibrationSpec) -> list[str]:
    if spec.source == "builtin":
        return corpus.builtin_corpus(spec.corpus or "", key="calibration.corpus")
    if spec.source == "text":
        return corpus.text_files(spec.files, key="calibration.files")
    return corpus.dataset_texts(
        spec.dataset or "", spec.dataset_config, spec.split, spec.text_field, key="calibration.dataset"
    )


def calibration_windows(spec: CalibrationSpec, tokenizer) -> torch.Tensor:
    tokens = tokenize_joined(tokenizer, calibration_documents(spec))
    try:
        return random_windows(tokens, spec.num_samples, spec.seq_len, spec.seed)
    except ValueError as exc:
        raise RecipeError(str(exc), key="calibration.seq_len") from None
