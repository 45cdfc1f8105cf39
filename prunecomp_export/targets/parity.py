"""One parity check for every target, judged the way runtimes judge themselves.

The reference is the project's layer-streamed engine (``LayerwiseModel``) on the *written*
checkpoint in fp32: one decoder layer in memory at a time, the head applied to chunks of tokens, so
checking a 70B deployment never needs a second whole model. The runtime generates first (greedy,
with its log-probabilities); the reference is then teacher-forced on each prompt plus the runtime's
continuation, so every log-probability the runtime reported has a reference computed in the same
context. A runtime passes when

- **log-probabilities** (the prompt's tokens and the generated ones): the largest and the mean
  |runtime - reference| are within the tolerance of the runtime's dtype (``TOLERANCES``), and
- **generation**: the greedy continuation is close in the sense of vLLM's ``check_logprobs_close``
  (vllm/tests/models/utils.py): tokens equal up to the first difference; there, the runtime's token
  is in the reference's top-k and the reference's in the runtime's; after it nothing is compared.

Why both: the generation rule alone cannot see a missing compensation (measured on the demo: the
layers removed without it still pass top-5 on every prompt), while its log-probabilities move an
order of magnitude more than bf16 rounding moves them (README, "Parity").

One stop rule for every runtime: a continuation ends with the first stop token, which is kept and
compared (``stop_token_ids``: the checkpoint's generation-config and tokenizer end-of-sequence ids).

This module imports no runtime: ``reference_scores`` imports torch inside, the rest is plain Python
(the report reads ``ParityReport`` in the CLI process).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from prunecomp_export.report.results import ParityDivergence
from prunecomp_export.validation import FiniteFloat

# Tolerances on |log-prob(runtime) - log-prob(fp32 reference)| in nats, per runtime dtype: the
# largest over all tokens compared, and the mean. Measured on the demo's pruned checkpoint (178
# tokens: 6 prompts, up to 16 new tokens; ``benchmarks/parity_tolerances.py``, README "Parity"):
# vLLM fp32 max 3e-5 / mean 6e-6, fp16 0.026 / 0.0046, bf16 0.20 / 0.036; onnxruntime-genai fp32
# 2e-5 / 9e-6, int8 0.44 / 0.074. The wrong models (the compensation left out, two layers swapped)
# measured max 1.65-2.55 / mean 0.37-0.41 in every dtype: each bound sits a few times above what its
# dtype measured on the right model and below what every wrong model measured. int4 shares int8's
# bounds: they are what a wrong model must fail; on the 135M demo int4's own error (mean 0.40-0.74)
# is as large as a missing compensation's, and the check fails it.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (0.005, 0.0005),
    "bfloat16": (0.6, 0.12),
    "float16": (0.15, 0.03),
    "int8": (1.0, 0.2),
    "int4": (1.0, 0.2),
}
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Pruning whole decoder layers makes a language model",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "The history of the Roman Empire spans more than a thousand years, from the founding of the city "
    "to the fall of Constantinople.",
    "Water boils at one hundred degrees Celsius at sea level, but at a lower temperature high in the "
    "mountains, because the air pressure there is lower.",
)


class Tolerance(BaseModel):
    """The bounds a runtime's log-probabilities must stay within (nats)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_abs: float = Field(gt=0)
    mean_abs: float = Field(gt=0)


def tolerance_for(dtype: str, max_abs: float | None = None, mean_abs: float | None = None) -> Tolerance:
    """The tolerance of ``dtype`` (a key of ``TOLERANCES``), each bound overridable."""
    default_max, default_mean = TOLERANCES[dtype]
    return Tolerance(max_abs=max_abs or default_max, mean_abs=mean_abs or default_mean)


class ParityOptions(BaseModel):
    """What every target's parity check runs (recipe options shared by the targets)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS),
        min_length=1,
        description="Prompts the runtime continues greedily; their tokens and the continuations are compared.",
    )
    max_new_tokens: int = Field(16, ge=1, le=1024, description="Greedy tokens generated per prompt.")
    top_k: int = Field(5, ge=1, le=20, description="At the first differing token, each side's in the other's top-k.")
    max_logprob_diff: FiniteFloat | None = Field(
        None, gt=0, description="Largest |log-prob diff| allowed (nats); default: the dtype's measured tolerance."
    )
    mean_logprob_diff: FiniteFloat | None = Field(
        None, gt=0, description="Mean |log-prob diff| allowed (nats); default: the dtype's measured tolerance."
    )

    def tolerance(self, dtype: str) -> Tolerance:
        return tolerance_for(dtype, self.max_logprob_diff, self.mean_logprob_diff)


# ------------------------------------------------------------------------------ what runtimes return


class Continuation(BaseModel):
    """One prompt as a runtime ran it: the prompt's log-probabilities and its greedy continuation."""

    model_config = ConfigDict(extra="forbid")

    #: the ids the runtime was given (the checkpoint's tokenizer's)
    prompt_ids: list[int] = Field(min_length=1)
    #: how the runtime's own tokenizer encodes the prompt text; None where it has none
    runtime_prompt_ids: list[int] | None = None
    #: log-probability of prompt token j + 1 after tokens 0..j (one fewer than the prompt)
    prompt_logprobs: list[float]
    new_ids: list[int]
    #: the runtime's log-probability of each new token
    new_logprobs: list[float]
    #: the runtime's top-k log-probabilities at each new token (token id -> log-probability)
    new_top: list[dict[int, float]]

    def until_stop(self, stop_ids: Sequence[int]) -> Continuation:
        """The continuation up to and including its first stop token (the one stop rule)."""
        stops = set(stop_ids)
        end = next((i + 1 for i, token in enumerate(self.new_ids) if token in stops), len(self.new_ids))
        return self.model_copy(
            update={
                "new_ids": self.new_ids[:end],
                "new_logprobs": self.new_logprobs[:end],
                "new_top": self.new_top[:end],
            }
        )


class RuntimeRun(BaseModel):
    """A runtime's answer to the prompts (returned by its child process as JSON)."""

    model_config = ConfigDict(extra="forbid")

    #: e.g. "vLLM 0.32.0", "ONNX Runtime 1.32.0 (CPUExecutionProvider)"
    runtime: str
    #: the precision the runtime computed in: a key of ``TOLERANCES``
    dtype: str
    continuations: list[Continuation]


class ReferenceScores(BaseModel):
    """The fp32 reference on one prompt + continuation: each token's log-probability after the ones
    before it, and the top-k where each new token was predicted."""

    model_config = ConfigDict(extra="forbid")

    token_logprobs: list[float]
    top: list[dict[int, float]]


# ------------------------------------------------------------------------------------ the verdict


class PromptParity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    prompt_tokens: int
    new_tokens: int
    max_abs_diff: float
    tokenizer_match: bool
    divergence: ParityDivergence | None = None

    @property
    def close(self) -> bool:
        return self.tokenizer_match and (self.divergence is None or self.divergence.close)


class ParityReport(BaseModel):
    """A runtime against the fp32 reference: the figures the report shows and the verdict."""

    model_config = ConfigDict(extra="forbid")

    runtime: str
    dtype: str
    reference: str
    tolerance: Tolerance
    top_k: int
    prompt_tokens: int
    new_tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    prompts: list[PromptParity]

    @property
    def tokens_compared(self) -> int:
        return self.prompt_tokens + self.new_tokens

    @property
    def logprobs_passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance.max_abs and self.mean_abs_diff <= self.tolerance.mean_abs

    @property
    def generation_passed(self) -> bool:
        return all(p.close for p in self.prompts)

    @property
    def passed(self) -> bool:
        return self.logprobs_passed and self.generation_passed

    @property
    def divergences(self) -> list[ParityDivergence]:
        return [p.divergence for p in self.prompts if p.divergence is not None]

    def summary(self) -> str:
        """One line for an error message."""
        return (
            f"{self.runtime} {self.dtype}: |log-prob diff| max {self.max_abs_diff:.3g} "
            f"(<= {self.tolerance.max_abs:g}), mean {self.mean_abs_diff:.3g} (<= {self.tolerance.mean_abs:g}) "
            f"over {self.tokens_compared} tokens; "
            f"{sum(p.close for p in self.prompts)} of {len(self.prompts)} continuations close"
        )

    def checks(self) -> list[dict[str, Any]]:
        """The report's rows (``ParityCheck``): the largest and the mean log-probability difference,
        and the continuations that are close."""
        where = f"{self.runtime} {self.dtype} vs {self.reference}"
        counted = f"{self.tokens_compared} tokens ({self.prompt_tokens} prompt, {self.new_tokens} generated)"
        close = sum(p.close for p in self.prompts)
        notes = [f"top-{self.top_k} at the first differing token"]
        for prompt in self.prompts:
            if not prompt.tokenizer_match:
                notes.append(f"{prompt.prompt!r}: the runtime's tokenizer encodes it differently")
            if (d := prompt.divergence) is not None:
                tie = "a near-tie" if d.near_tie else "not a near-tie"
                verdict = "close" if d.close else "not in each other's top-k"
                notes.append(
                    f"{d.prompt!r} diverged at new token {d.position} ({tie}, {d.gap:.3g} nats apart; {verdict})"
                )
        return [
            {
                "name": "logprob_max",
                "measured": self.max_abs_diff,
                "comparison": "<=",
                "limit": self.tolerance.max_abs,
                "unit": "max |log-prob diff| (nats)",
                "passed": self.max_abs_diff <= self.tolerance.max_abs,
                "detail": f"{where}, {counted}",
            },
            {
                "name": "logprob_mean",
                "measured": self.mean_abs_diff,
                "comparison": "<=",
                "limit": self.tolerance.mean_abs,
                "unit": "mean |log-prob diff| (nats)",
                "passed": self.mean_abs_diff <= self.tolerance.mean_abs,
                "detail": f"{where}, {counted}",
            },
            {
                "name": "greedy_close",
                "measured": close,
                "comparison": ">=",
                "limit": len(self.prompts),
                "unit": "continuations close",
                "passed": self.generation_passed,
                "detail": "; ".join(notes),
            },
        ]


def _abs_diff(a: float, b: float) -> float:
    """|a - b|, infinite when either is not finite (a broken runtime cannot pass)."""
    return abs(a - b) if math.isfinite(a) and math.isfinite(b) else math.inf


def compare(
    prompts: Sequence[str],
    run: RuntimeRun,
    references: Sequence[ReferenceScores],
    tolerance: Tolerance,
    top_k: int,
    reference: str,
) -> ParityReport:
    """The runtime's log-probabilities and continuations against the reference's, prompt by prompt
    (each continuation already cut by ``Continuation.until_stop``)."""
    diffs: list[float] = []
    prompt_tokens = new_tokens = 0
    rows = []
    for text, ran, ref in zip(prompts, run.continuations, references, strict=True):
        length = len(ran.prompt_ids)
        if len(ran.prompt_logprobs) != length - 1 or len(ref.token_logprobs) != length - 1 + len(ran.new_ids):
            raise ValueError(f"{text!r}: the runtime's and the reference's token counts differ")
        own = [_abs_diff(a, b) for a, b in zip(ran.prompt_logprobs, ref.token_logprobs[: length - 1], strict=True)]
        own += [_abs_diff(a, b) for a, b in zip(ran.new_logprobs, ref.token_logprobs[length - 1 :], strict=True)]
        diffs += own
        prompt_tokens += length - 1
        new_tokens += len(ran.new_ids)
        rows.append(
            PromptParity(
                prompt=text,
                prompt_tokens=length,
                new_tokens=len(ran.new_ids),
                max_abs_diff=max(own, default=0.0),
                tokenizer_match=ran.runtime_prompt_ids is None or ran.runtime_prompt_ids == ran.prompt_ids,
                divergence=first_divergence(text, ran, ref, tolerance, top_k),
            )
        )
    return ParityReport(
        runtime=run.runtime,
        dtype=run.dtype,
        reference=reference,
        tolerance=tolerance,
        top_k=top_k,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        max_abs_diff=max(diffs, default=0.0),
        mean_abs_diff=sum(diffs) / len(diffs) if diffs else 0.0,
        prompts=rows,
    )


def first_divergence(
    prompt: str, ran: Continuation, ref: ReferenceScores, tolerance: Tolerance, top_k: int
) -> ParityDivergence | None:
    """The first new token where the reference's pick (its argmax in the same context) differs from
    the runtime's, judged by vLLM's ``check_logprobs_close`` rule; None when every token agrees."""
    start = len(ran.prompt_ids) - 1
    for position, token in enumerate(ran.new_ids):
        ref_top = ref.top[position]
        best = max(ref_top, key=lambda t: ref_top[t])
        if best == token:
            continue
        ref_top_k = sorted(ref_top, key=lambda t: -ref_top[t])[:top_k]
        runtime_top = ran.new_top[position]
        runtime_top_k = sorted(runtime_top, key=lambda t: -runtime_top[t])[:top_k]
        gap = ref_top[best] - ref.token_logprobs[start + position]
        return ParityDivergence(
            prompt=prompt,
            position=position,
            runtime_token=token,
            reference_token=best,
            gap=gap,
            near_tie=gap <= tolerance.max_abs,
            close=token in ref_top_k and best in runtime_top_k,
        )
    return None


# ------------------------------------------------------------------------------------ the reference


def stop_token_ids(checkpoint: Path, tokenizer: Any = None) -> list[int]:
    """The ids that end a continuation, for every runtime: the checkpoint's generation config's and
    config's end-of-sequence ids, and the tokenizer's."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = Path(checkpoint) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(int(i) for i in ids)


def reference_scores(
    checkpoint: Path,
    sequences: Sequence[tuple[Sequence[int], int]],
    *,
    top_k: int,
    device: str = "cpu",
    logits_chunk: int = 256,
    batch_tokens: int = 4096,
) -> list[ReferenceScores]:
    """The fp32 reference for each ``(token ids, prompt length)``: the checkpoint's safetensors
    streamed one decoder layer at a time (``LayerwiseModel``), the head applied ``logits_chunk``
    tokens at a time, its log-softmax in fp32. Sequences are right-padded into batches of at most
    ``batch_tokens`` tokens (causal attention: padding after a token never changes it)."""
    import torch
    from transformers import AutoConfig

    from prunecomp_export.adapters import adapter_for
    from prunecomp_export.engine.layerwise import LayerwiseModel, layer_output
    from prunecomp_export.source.weights import SafetensorsCheckpoint

    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference on a GPU too
    torch.backends.cudnn.allow_tf32 = False
    config = AutoConfig.from_pretrained(checkpoint)
    model = LayerwiseModel(
        SafetensorsCheckpoint(Path(checkpoint)), config, adapter_for(config), torch.device(device), torch.float32,
        resident=False, logits_chunk=logits_chunk,
    )  # fmt: skip
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    batches: list[list[int]] = [[]]
    for index in order:
        width = len(sequences[index][0])
        if batches[-1] and width * (len(batches[-1]) + 1) > batch_tokens:
            batches.append([])
        batches[-1].append(index)
    with torch.no_grad():
        inputs = []
        for batch in batches:
            width = max(len(sequences[i][0]) for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for row, index in enumerate(batch):
                ids[row, : len(sequences[index][0])] = torch.tensor(list(sequences[index][0]))
            inputs.append(model.layer_inputs(ids))
        hidden = [h for h, _ in inputs]
        for layer_index in range(model.num_layers):
            with model.layer(layer_index) as layer:
                hidden = [
                    layer_output(layer(h, **kwargs[layer_index])) for h, (_, kwargs) in zip(hidden, inputs, strict=True)
                ]
        scores: dict[int, ReferenceScores] = {}
        with model.head() as logits_of:
            for batch, states in zip(batches, hidden, strict=True):
                for row, index in enumerate(batch):
                    ids, prompt_length = sequences[index]
                    scores[index] = _scores(logits_of, states[row, : len(ids)], list(ids), prompt_length, top_k,
                                            model.logits_chunk)  # fmt: skip
    model.release()
    return [scores[i] for i in range(len(sequences))]


def _scores(logits_of, states, ids: list[int], prompt_length: int, top_k: int, chunk: int) -> ReferenceScores:
    """Log-probabilities of each next token, and the top-k from the prompt's last token on."""
    import torch

    token_logprobs: list[float] = []
    top: list[dict[int, float]] = []
    for start in range(0, len(ids) - 1, chunk):
        stop = min(start + chunk, len(ids) - 1)
        logprobs = torch.log_softmax(logits_of(states[start:stop]).float(), dim=-1)
        targets = torch.tensor(ids[start + 1 : stop + 1], device=logprobs.device)
        token_logprobs += logprobs.gather(1, targets[:, None])[:, 0].tolist()
        first = max(start, prompt_length - 1)
        if first < stop:
            values, indices = logprobs[first - start :].topk(top_k, dim=-1)
            top += [dict(zip(i.tolist(), v.tolist(), strict=True)) for i, v in zip(indices, values, strict=True)]
    return ReferenceScores(token_logprobs=token_logprobs, top=top)


def reference_name(device: str) -> str:
    return f"fp32 layer-streamed reference on {device}"


def check(
    checkpoint: Path,
    prompts: Sequence[str],
    run: RuntimeRun,
    options: ParityOptions,
    stop_ids: Sequence[int],
    *,
    device: str = "cpu",
    logits_chunk: int = 256,
) -> ParityReport:
    """Cut each continuation by the one stop rule, teacher-force the reference on it, compare."""
    run = run.model_copy(update={"continuations": [c.until_stop(stop_ids) for c in run.continuations]})
    sequences = [(c.prompt_ids + c.new_ids, len(c.prompt_ids)) for c in run.continuations]
    references = reference_scores(checkpoint, sequences, top_k=options.top_k, device=device, logits_chunk=logits_chunk)
    tolerance = options.tolerance(run.dtype)
    return compare(prompts, run, references, tolerance, options.top_k, reference_name(device))
