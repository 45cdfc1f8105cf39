"""Times one model on one runtime, in a child process of its own (``run_job``, started by the bench
through the child runner): a fresh process per model and runtime keeps caches, allocators and thread
pools of one measurement out of the next. Returns ``{"scenarios": {name: {"times_ms": [...], ...}}}``."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np


def _timed(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def _tokens(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(batch, length), dtype=np.int64)


# --------------------------------------------------------------------------------------------- torch


def run_torch(job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    model = AutoModelForCausalLM.from_pretrained(job["checkpoint"], dtype=torch.float32).eval()
    vocab, layers = model.config.vocab_size, model.model.layers
    layer_time = [0.0]

    def pre(_m, _a):
        layer_time.append(-time.perf_counter())

    def post(_m, _a, _o):
        layer_time[-1] += time.perf_counter()

    results = {}
    for scenario in job["scenarios"]:
        kind, batch = scenario["kind"], scenario["batch"]
        with torch.no_grad():
            if kind == "prefill":
                ids = torch.from_numpy(_tokens(vocab, batch, scenario["prompt_len"]))

                def step(ids=ids):
                    model(input_ids=ids, use_cache=False)

            elif kind == "decode":
                past_len = scenario["past_len"]
                ids = torch.from_numpy(_tokens(vocab, batch, past_len + 1))
                cache = model(input_ids=ids[:, :past_len], use_cache=True).past_key_values

                def step(ids=ids, cache=cache, past_len=past_len):
                    model(input_ids=ids[:, past_len:], past_key_values=cache, use_cache=True)
                    cache.crop(-1)  # drop the new token: the same past length for the next repeat

            else:
                ids = torch.from_numpy(_tokens(vocab, batch, scenario["prompt_len"]))
                new = scenario["new_tokens"]

                def step(ids=ids, new=new):
                    model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=new,
                        min_new_tokens=new,
                        do_sample=False,
                        pad_token_id=0,
                    )

            times = _timed(step, job["warmup"], job["repeats"])
            # The decoder layers' share of one run, for the cost model: hooks time each layer.
            handles = [
                h for layer in layers for h in (layer.register_forward_pre_hook(pre), layer.register_forward_hook(post))
            ]
            del layer_time[:]
            start = time.perf_counter()
            step()
            total = time.perf_counter() - start
            for handle in handles:
                handle.remove()
        results[scenario["name"]] = {"times_ms": times, "layer_share": sum(layer_time) / total}
    return {"runtime_version": torch.__version__, "threads": torch.get_num_threads(), "scenarios": results}


# --------------------------------------------------------------------------------------- onnxruntime


def run_onnxruntime(job: dict) -> dict:
    import onnxruntime as ort

    from prunecomp_export.bench.layer_share import onnx_node_layers
    from prunecomp_export.targets.onnx import OrtDecoder

    options_threads = job["threads"]
    decoder = OrtDecoder(Path(job["onnx_path"]), ["CPUExecutionProvider"])

    def session(profile_prefix: str | None = None):
        """Pinned intra-op threads (OrtDecoder takes the runtime's defaults); profiling on request."""
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options_threads
        session_options.inter_op_num_threads = 1
        session_options.log_severity_level = 3
        if profile_prefix is not None:
            session_options.enable_profiling = True
            session_options.profile_file_prefix = profile_prefix
        return ort.InferenceSession(job["onnx_path"], session_options, providers=["CPUExecutionProvider"])

    decoder.session = session()
    node_layers = onnx_node_layers(Path(job["onnx_path"]))
    vocab = job["vocab_size"]
    results = {}
    for scenario in job["scenarios"]:
        kind, batch = scenario["kind"], scenario["batch"]
        if kind == "prefill":
            ids = _tokens(vocab, batch, scenario["prompt_len"])
            mask, pos = np.ones_like(ids), np.broadcast_to(np.arange(ids.shape[1]), ids.shape)

            def step(ids=ids, mask=mask, pos=pos):
                decoder(ids, mask, pos)

        elif kind == "decode":
            past_len = scenario["past_len"]
            ids = _tokens(vocab, batch, past_len + 1)
            _, past = decoder(
                ids[:, :past_len], np.ones((batch, past_len)), np.broadcast_to(np.arange(past_len), (batch, past_len))
            )
            mask, pos = np.ones((batch, past_len + 1)), np.full((batch, 1), past_len)

            def step(ids=ids, past=past, mask=mask, pos=pos, past_len=past_len):
                decoder(ids[:, past_len:], mask, pos, past)

        else:
            ids = _tokens(vocab, batch, scenario["prompt_len"])
            new = scenario["new_tokens"]

            def step(ids=ids, new=new):
                length = ids.shape[1]
                logits, past = decoder(ids, np.ones_like(ids), np.broadcast_to(np.arange(length), ids.shape))
                for t in range(new - 1):
                    token = logits[:, -1].argmax(-1)[:, None]
                    logits, past = decoder(
                        token, np.ones((ids.shape[0], length + t + 1)), np.full((ids.shape[0], 1), length + t), past
                    )

        times = _timed(step, job["warmup"], job["repeats"])
        share = _ort_layer_share(decoder, session, step, node_layers)
        results[scenario["name"]] = {"times_ms": times, "layer_share": share}
    return {"runtime_version": ort.__version__, "threads": options_threads, "scenarios": results}


def _ort_layer_share(decoder, session, step: Callable[[], None], node_layers: dict) -> float:
    """The decoder layers' share of one step, from ONNX Runtime's profiler: the step runs twice on a
    profiling session (same threads and graph optimisations) and only the second, warm, run counts."""
    import tempfile

    from prunecomp_export.bench.layer_share import ort_layer_share

    timed = decoder.session
    with tempfile.TemporaryDirectory(prefix="prunecomp-ort-profile-") as tmp:
        decoder.session = session(str(Path(tmp) / "ort"))
        try:
            step()
            step()
            events = json.loads(Path(decoder.session.end_profiling()).read_text())
        finally:
            decoder.session = timed
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    warm = runs[len(runs) // 2]  # the first model_run of the second step
    return ort_layer_share([e for e in events if e.get("ts", 0) >= warm], node_layers)


# ---------------------------------------------------------------------------------------------- vllm


def _install_layer_timer(model) -> int:
    """Runs inside vLLM's worker (``LLM.apply_model``): hooks that add up the time spent in each
    decoder layer, as PyTorch eager's bench does. Module-level so that it is pickled by reference."""
    state = {"seconds": 0.0, "calls": 0, "started": []}

    def pre(_module, _args):
        state["started"].append(time.perf_counter())

    def post(_module, _args, _output):
        state["seconds"] += time.perf_counter() - state["started"].pop()
        state["calls"] += 1

    model._prunecomp_layer_timer = state
    for layer in model.model.layers:
        layer.register_forward_pre_hook(pre)
        layer.register_forward_hook(post)
    return len(model.model.layers)


def _layer_timer(model) -> tuple[float, int]:
    state = model._prunecomp_layer_timer
    return state["seconds"], state["calls"]


def run_vllm(job: dict) -> dict:
    """Timed through vLLM's own engine (``LLM.generate``), not HTTP. Prefill: one token generated;
    decode: (time for 1+N tokens - time for 1) / N; throughput: the whole batched generation.
    The decoder layers' share of each scenario is measured inside vLLM's worker, with hooks
    installed through ``LLM.apply_model`` after the timed repeats (vLLM sends the hook functions to
    its engine process by pickle, which it allows only with VLLM_ALLOW_INSECURE_SERIALIZATION: set
    here, in this bench process, for our own two functions)."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=job["checkpoint"],
        dtype="float32",
        enforce_eager=True,
        max_model_len=job["max_model_len"],
        kv_cache_memory_bytes=2 * 2**30,
        # Every repeat sends the same prompt: with prefix caching on, repeats would skip the prefill.
        enable_prefix_caching=False,
    )
    vocab = job["vocab_size"]
    results = {}

    def generate(prompts: np.ndarray, tokens: int) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
        llm.generate([{"prompt_token_ids": row.tolist()} for row in prompts], params, use_tqdm=False)

    def layer_time(tokens_of: Callable[[], None]) -> tuple[float, float, int]:
        """Wall seconds of one call, the seconds spent in decoder layers meanwhile, and layer calls."""
        (seconds_before, calls_before), started = llm.apply_model(_layer_timer)[0], time.perf_counter()
        tokens_of()
        wall = time.perf_counter() - started
        seconds, calls = llm.apply_model(_layer_timer)[0]
        return wall, seconds - seconds_before, calls - calls_before

    runs: dict[str, tuple[Callable[[], None], Callable[[], None] | None]] = {}
    for scenario in job["scenarios"]:
        kind, batch = scenario["kind"], scenario["batch"]
        if kind == "decode":
            ids, extra = _tokens(vocab, batch, scenario["past_len"]), 16
            first = partial(generate, ids, 1)
            run = partial(generate, ids, 1 + extra)
            one, more = (_timed(fn, job["warmup"], job["repeats"]) for fn in (first, run))
            times = [(b - a) / extra for a, b in zip(one, more, strict=True)]
            runs[scenario["name"]] = (run, first)
        else:
            ids = _tokens(vocab, batch, scenario["prompt_len"])
            run = partial(generate, ids, 1 if kind == "prefill" else scenario["new_tokens"])
            times = _timed(run, job["warmup"], job["repeats"])
            runs[scenario["name"]] = (run, None)
        results[scenario["name"]] = {"times_ms": times}
    # hooks only after every timed repeat: the times above are vLLM's own
    try:
        hooked = llm.apply_model(_install_layer_timer)[0] > 0
    except Exception as exc:  # e.g. the engine process cannot import this module: PyTorch eager's share is used
        hooked, note = False, f"{type(exc).__name__}: {exc}"
    else:
        note = None
    for name, (run, baseline) in runs.items() if hooked else ():
        wall, inside, calls = layer_time(run)
        if baseline is not None:  # decode: the extra tokens only, as timed
            base_wall, base_inside, base_calls = layer_time(baseline)
            wall, inside, calls = wall - base_wall, inside - base_inside, calls - base_calls
        if calls > 0 and wall > 0:  # no calls: the layers did not run as modules (compiled); no share
            results[name]["layer_share"] = min(1.0, inside / wall)
    import vllm

    out = {"runtime_version": vllm.__version__, "threads": job["threads"], "scenarios": results}
    return out if note is None else {**out, "layer_share_unavailable": note[:300]}


RUNTIMES = {"torch": run_torch, "onnxruntime": run_onnxruntime, "vllm": run_vllm}


def run_job(job: dict) -> dict:
    """Time ``job["checkpoint"]`` on ``job["runtime"]`` (run in a child process of its own by the bench)."""
    load_before = os.getloadavg()[0]
    result = RUNTIMES[job["runtime"]](job)
    return {**result, "load_before": load_before, "load_after": os.getloadavg()[0]}
