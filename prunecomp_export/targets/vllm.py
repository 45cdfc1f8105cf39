"""The ``vllm`` target: serve the pruned checkpoint with vLLM, judged by the one parity check.

A pruned checkpoint is a plain HF directory (fewer ``num_hidden_layers``), so vLLM loads it as it is.
``build`` runs vLLM offline in a child process (``runtimes.vllm.generate``: greedy continuations,
the prompts' log-probabilities, the top-k at each new token), compares it with the fp32
layer-streamed reference (``parity``), and writes ``serve.sh``, the exact OpenAI-compatible server
command with the memory the plan gives vLLM. Any dtype: bf16 and fp16 are judged by their own
tolerances, not by token equality (bf16 kernels drift apart from fp32 after a few tokens by design).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prunecomp_export.targets import Target, TargetContext, TargetRecord
from prunecomp_export.targets.parity import ParityOptions
from prunecomp_export.targets.runtimes.vllm import Settings, require_vllm, resolve_python, vllm_env

CHECK_FILE = "vllm_check.json"
LOG_FILE = "vllm_check.log"
SERVE_SCRIPT = "serve.sh"


class Options(ParityOptions, Settings):
    """Recipe options of the ``vllm`` target: the parity check's, and vLLM's settings."""


class VllmTarget(Target):
    name = "vllm"
    Options = Options

    def preflight(self, options: Options, context: TargetContext) -> None:
        """Before any weight is read: an interpreter with vLLM."""
        require_vllm(resolve_python(options))

    def build(self, checkpoint: Path, out_dir: Path, options: Options, context: TargetContext) -> TargetRecord:
        """vLLM's continuations against the reference; vllm_check.json, its log and serve.sh."""
        from transformers import AutoTokenizer

        from prunecomp_export.child import ChildRequest, run_child
        from prunecomp_export.targets import parity
        from prunecomp_export.targets.runtimes import vllm

        started = time.perf_counter()
        checkpoint, out_dir = Path(checkpoint).resolve(), Path(out_dir)
        python = resolve_python(options)
        version = require_vllm(python)  # before any model loads: a missing runtime fails fast
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        prompt_ids = [list(tokenizer(p)["input_ids"]) for p in options.prompts]
        stop_ids = parity.stop_token_ids(checkpoint, tokenizer)
        engine = options.engine(context.vllm_engine)
        request = ChildRequest(
            name="vLLM check",
            target="prunecomp_export.targets.runtimes.vllm:generate",
            kwargs={"checkpoint": str(checkpoint), "prompts": list(options.prompts), "prompt_ids": prompt_ids,
                    "max_new_tokens": options.max_new_tokens, "stop_ids": stop_ids, "top_k": options.top_k,
                    "engine": engine},
            python=python, env=vllm_env(options), timeout_s=options.check_timeout_s,
            log_file=str(out_dir / LOG_FILE),
        )  # fmt: skip
        ran = run_child(request).value
        run = parity.RuntimeRun.model_validate({k: ran[k] for k in parity.RuntimeRun.model_fields})
        run = run.model_copy(update={"dtype": vllm.PARITY_DTYPES.get(run.dtype, run.dtype)})
        reference_started = time.perf_counter()
        report = parity.check(checkpoint, options.prompts, run, options, stop_ids, device=context.device,
                              logits_chunk=context.logits_chunk)  # fmt: skip

        script = out_dir / SERVE_SCRIPT
        script.write_text(
            vllm.serve_script(checkpoint, options, python=python, directory=out_dir, planned=context.vllm_engine)
        )
        script.chmod(0o755)
        # the record's paths are relative to the output directory (out_dir is <output>/targets/vllm)
        model = Path(os.path.relpath(checkpoint, out_dir.resolve().parent.parent))
        port = options.port or vllm.SERVE_SCRIPT_PORT
        artifact: dict[str, Any] = {
            "vllm_version": version,
            "python": python,
            "checkpoint": str(model),
            "engine": engine,
            "max_model_len": ran.get("max_model_len"),
            "serve_script": SERVE_SCRIPT,
            "serve_command": vllm.server_command(model, options, port=port, python=python, planned=context.vllm_engine),
            "seconds": {
                "vllm_engine_start": round(ran["engine_start_s"], 2),
                "vllm_generate": round(ran["generate_s"], 2),
                "reference": round(time.perf_counter() - reference_started, 2),
                "total": round(time.perf_counter() - started, 2),
            },
        }
        record = TargetRecord.judged(self.name, report, artifact)
        (out_dir / CHECK_FILE).write_text(json.dumps(record.model_dump(mode="json"), indent=2) + "\n")
        return record


TARGET = VllmTarget()
