"""Each target's parity figures as the sign-off report shows them: records shaped by the target
modules' own functions (onnx's ``check_parity`` on a stand-in runtime, genai's and vLLM's greedy
comparisons) turned into ``ParityCheck`` rows, a failing record gives a failing row, and results.json,
report.md, report.html and the console line show every check."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
from pydantic import ValidationError

from prunecomp_export.report.render import NO_TARGETS, render_html, render_markdown, target_line
from prunecomp_export.report.results import SCHEMA_FILE, RunResults, TargetParity, deployed_targets
from prunecomp_export.targets import onnx, target_parity, tensorrt, vllm
from tests.test_report import hand_made

PROMPTS = [[5, 17, 33, 9, 41], [7, 12, 3]]
TOLERANCE = 1e-3
OFFSET = 0.25


@pytest.fixture(scope="module")
def model():
    from tests.conftest import make_model

    return make_model("llama")


def stand_in_runtime(model, cached_offset: float = 0.0):
    """A runtime computing exactly what transformers computes (its "cache" is the ids and positions
    seen so far), plus ``cached_offset`` on every logit of a cached step: a runtime with a broken cache."""

    def run(ids, mask, positions, past=None):
        new = ids.shape[1]
        if past is not None:
            ids, positions = np.concatenate([past[0], ids], 1), np.concatenate([past[1], positions], 1)
        logits = onnx.hf_logits(model, ids, mask, positions)[:, -new:]
        return logits + (cached_offset if past is not None else 0.0), [ids, positions]

    return run


def logit_record(model, cached_offset: float = 0.0, tolerance: float = TOLERANCE, target: str = "onnx") -> dict:
    """The parity part of an onnx (or tensorrt) record, as ``build`` writes it."""
    run = stand_in_runtime(model, cached_offset)
    checks = onnx.check_parity(run, model, PROMPTS, tolerance=tolerance, decode_steps=2, pad_id=0)
    return {"target": target, "tolerance": tolerance, "checks": checks, "passed": True}


def genai_greedy(hf_new, genai_new, genai_prompt_ids=(1, 5, 6)) -> dict:
    greedy = onnx.compare_genai_greedy("a|b", [1, 5, 6], list(genai_prompt_ids), hf_new, genai_new, eos={2})
    return {**greedy, "seconds": 0.1}


def vllm_record(rows: list[dict]) -> dict:
    """A vllm record, with the keys ``vllm.build`` writes that its parity reads."""
    return {
        "target": "vllm",
        "dtype": "float32",
        "max_new_tokens": 4,
        "tokens_equal": all(row["tokens_equal"] and row["prompt_ids_equal"] for row in rows),
        "prompts": rows,
    }


def vllm_rows(vllm_new_ids, vllm_prompt_ids=((1, 5), (1, 6), (1, 7))) -> list[dict]:
    hf = {
        "prompt_ids": [[1, 5], [1, 6], [1, 7]],
        "new_ids": [[7, 8, 2, 2], [9, 10, 11, 12], [3, 4, 5, 6]],
        "texts": ["x", "y", "z"],
        "stop_ids": [2],
    }
    out = {"prompt_ids": [list(p) for p in vllm_prompt_ids], "new_ids": vllm_new_ids, "texts": ["x", "y", "z"]}
    return vllm.compare_greedy(["a", "b", "c"], hf, out)


# --- onnx / tensorrt: logit differences ----------------------------------------------------------


def test_onnx_logit_checks_measure_the_difference_against_the_tolerance(model):
    record = logit_record(model)
    rows = onnx.parity_checks(record)
    assert [r["name"] for r in rows] == ["prefill", "decode", "padded_batch"]
    for row in rows:
        assert row["measured"] == 0.0  # the stand-in computes exactly what transformers computes
        assert (row["comparison"], row["limit"], row["unit"], row["passed"]) == ("<=", TOLERANCE, onnx.LOGIT_UNIT, True)
    assert [r["detail"] for r in rows] == [
        "5 prompt tokens, no cache",
        "2 cached decode steps on the runtime's own cache",
        "prompts of 5 and 3 tokens left-padded in one batch, then 1 cached step",
    ]


def test_a_broken_cache_fails_the_cached_checks_only(model):
    rows = {r["name"]: r for r in onnx.parity_checks(logit_record(model, cached_offset=OFFSET))}
    assert rows["prefill"]["passed"] and rows["prefill"]["measured"] == 0.0
    for name in ("decode", "padded_batch"):
        assert rows[name]["measured"] == pytest.approx(OFFSET, abs=1e-5)
        assert rows[name]["passed"] is False
    (parity,) = target_parity({"onnx": logit_record(model, cached_offset=OFFSET)})
    assert parity["target"] == "onnx" and parity["passed"] is False


def test_tensorrt_shows_the_same_logit_checks(model):
    rows = tensorrt.parity_checks(logit_record(model, cached_offset=OFFSET, tolerance=0.5, target="tensorrt"))
    assert [(r["name"], r["limit"], r["passed"]) for r in rows] == [
        ("prefill", 0.5, True),
        ("decode", 0.5, True),  # 0.25 is within fp16's tolerance
        ("padded_batch", 0.5, True),
    ]
    strict = tensorrt.parity_checks(logit_record(model, cached_offset=OFFSET, tolerance=0.1, target="tensorrt"))
    assert [r["passed"] for r in strict] == [True, False, False]
    assert rows[1]["measured"] == pytest.approx(OFFSET, abs=1e-5)


# --- genai: greedy tokens ------------------------------------------------------------------------


def test_genai_greedy_counts_equal_tokens_up_to_the_end_of_sequence():
    row = onnx.genai_greedy_check(genai_greedy([7, 8, 9, 2, 2], [7, 8, 9]))
    assert row == {
        "name": "genai_greedy",
        "measured": 3,
        "comparison": ">=",
        "limit": 3,
        "unit": "greedy tokens equal",
        "passed": True,
        "detail": "prompt 'a|b' (3 tokens)",
    }


@pytest.mark.parametrize(
    ("hf_new", "genai_new", "measured", "limit"),
    [
        ([7, 8, 9], [7, 4, 9], 1, 3),  # a differing token
        ([7, 2], [7, 8, 9], 1, 3),  # genai runs on past transformers' end of sequence
        ([7, 8, 9], [7], 1, 3),  # genai stops early
    ],
)
def test_genai_greedy_mismatch_fails_and_names_the_token(hf_new, genai_new, measured, limit):
    row = onnx.genai_greedy_check(genai_greedy(hf_new, genai_new))
    assert (row["measured"], row["limit"], row["passed"]) == (measured, limit, False)
    assert row["detail"] == "prompt 'a|b' (3 tokens); first mismatch at new token 1"


def test_genai_tokenizer_mismatch_fails_with_every_token_equal():
    row = onnx.genai_greedy_check(genai_greedy([7, 8], [7, 8], genai_prompt_ids=(5, 6)))
    assert (row["measured"], row["limit"], row["passed"]) == (2, 2, False)
    assert row["detail"] == "prompt 'a|b' (3 tokens); genai's tokenizer encodes it differently"


def test_onnx_record_with_a_genai_package_adds_its_greedy_check(model):
    record = {**logit_record(model), "genai": {"dir": "genai", "greedy": genai_greedy([7, 8, 9], [7, 8, 9])}}
    rows = onnx.parity_checks(record)
    assert [r["name"] for r in rows] == ["prefill", "decode", "padded_batch", "genai_greedy"]
    assert (rows[-1]["measured"], rows[-1]["limit"]) == (3, 3)


# --- vllm: greedy tokens on every prompt ---------------------------------------------------------


def test_vllm_counts_the_prompts_whose_greedy_tokens_are_equal():
    (row,) = vllm.parity_checks(vllm_record(vllm_rows([[7, 8, 2], [9, 10, 11, 12], [3, 4, 5, 6]])))
    assert row == {
        "name": "greedy_tokens",
        "measured": 3,
        "comparison": ">=",
        "limit": 3,
        "unit": "prompts greedy-equal",
        "passed": True,
        "detail": "float32, 11 new tokens of transformers compared (at most 4 a prompt)",
    }


def test_vllm_differing_tokens_or_prompt_ids_fail_and_are_named():
    rows = vllm_rows([[7, 8, 2], [9, 10, 99, 12], [3, 4, 5, 6]], vllm_prompt_ids=((1, 5), (1, 6), (7,)))
    (row,) = vllm.parity_checks(vllm_record(rows))
    assert (row["measured"], row["limit"], row["passed"]) == (1, 3, False)
    assert row["detail"] == (
        "float32, 11 new tokens of transformers compared (at most 4 a prompt); "
        "'b' first mismatch at new token 2; 'c' tokenized differently"
    )


# --- results.json and the reports ---------------------------------------------------------------


def deployed(model) -> list[TargetParity]:
    """An onnx target (with genai) that passed and a vllm target that failed on one prompt."""
    onnx_record = {**logit_record(model), "genai": {"greedy": genai_greedy([7, 8, 9], [7, 8, 9])}}
    rows = vllm_rows([[7, 8, 2], [9, 10, 99, 12], [3, 4, 5, 6]])
    return deployed_targets({"onnx": onnx_record, "vllm": vllm_record(rows)})


def test_results_json_records_each_target_and_validates_against_the_schema(model):
    results = hand_made(targets=deployed(model)).to_json()
    jsonschema.validate(results, json.loads(SCHEMA_FILE.read_text()))
    assert RunResults.model_validate(results).to_json() == results
    assert [(t["target"], t["passed"], len(t["checks"])) for t in results["targets"]] == [
        ("onnx", True, 4),
        ("vllm", False, 1),
    ]
    assert results["targets"][1]["checks"][0]["measured"] == 2
    with pytest.raises(ValidationError):
        hand_made(targets=[{"target": "onnx", "passed": True, "checks": []}])  # a target proves something
    bad = {**results["targets"][1]["checks"][0], "comparison": "=="}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**results, "targets": [{**results["targets"][1], "checks": [bad]}]},
                            json.loads(SCHEMA_FILE.read_text()))  # fmt: skip


def test_markdown_lists_every_check_of_every_target(model):
    markdown = render_markdown(hand_made(targets=deployed(model)))
    section = markdown[markdown.index("## Deployed targets") : markdown.index("## Cost")]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0] == "| target | check | measured | limit | unit | result | detail |"
    assert table[1:4] == [
        "| onnx | prefill | 0 | ≤ 0.001 | max abs logit diff | PASS | 5 prompt tokens, no cache |",
        "| onnx | decode | 0 | ≤ 0.001 | max abs logit diff | PASS "
        "| 2 cached decode steps on the runtime's own cache |",
        "| onnx | padded_batch | 0 | ≤ 0.001 | max abs logit diff | PASS "
        "| prompts of 5 and 3 tokens left-padded in one batch, then 1 cached step |",
    ]
    # a | in a prompt is escaped, so the row keeps its 7 cells
    assert table[4] == "| onnx | genai_greedy | 3 | ≥ 3 | greedy tokens equal | PASS | prompt 'a\\|b' (3 tokens) |"
    assert table[5] == (
        "| vllm | greedy_tokens | 2 | ≥ 3 | prompts greedy-equal | FAIL "
        "| float32, 11 new tokens of transformers compared (at most 4 a prompt); 'b' first mismatch at new token 2 |"
    )
    assert len(table) == 6
    assert "when it was built: onnx PASS, vllm FAIL." in section


def test_markdown_and_html_say_when_no_target_was_built():
    results = hand_made(targets=[])
    assert f"## Deployed targets\n\n{NO_TARGETS}\n" in render_markdown(results)
    assert f"<p id='targets'>{NO_TARGETS}</p>" in render_html(results)


def test_html_shows_every_check_with_its_verdict(model):
    page = render_html(hand_made(targets=deployed(model)))
    assert "<table id='targets'>" in page
    assert (
        "<tr><td>onnx</td><td>decode</td><td>0</td><td>≤ 0.001</td><td>max abs logit diff</td>"
        "<td class='PASS'>PASS</td><td>2 cached decode steps on the runtime&#x27;s own cache</td></tr>"
    ) in page
    assert "<td>vllm</td><td>greedy_tokens</td><td>2</td><td>≥ 3</td>" in page
    assert page.count("<td class='FAIL'>FAIL</td>") == 1


def test_console_line_gives_each_figure_and_its_bound(model):
    onnx_parity, vllm_parity = deployed(model)
    assert target_line(vllm_parity) == "vllm: greedy_tokens 2 ≥ 3 (prompts greedy-equal)"
    assert target_line(onnx_parity).startswith("onnx: prefill 0 ≤ 0.001 (max abs logit diff), decode 0 ≤ 0.001")


def test_parity_figures_import_no_runtime():
    """results.json is written in the CLI process: reading the records must not import a backend."""
    code = (
        "import sys; from prunecomp_export.targets import target_parity; "
        "checks = {'prefill': {'max_abs_diff': 0.0, 'tokens': 3, 'passed': True}}; "
        "target_parity({'onnx': {'checks': checks, 'tolerance': 0.1}, 'tensorrt': {'checks': checks, 'tolerance': 0.5},"
        " 'vllm': {'dtype': 'float32', 'max_new_tokens': 1, 'tokens_equal': True, 'prompts': []}}); "
        "heavy = {'torch', 'transformers', 'onnx', 'onnxruntime', 'onnxruntime_genai', 'onnxscript', "
        "'tensorrt', 'vllm'}; "
        "loaded = sorted(heavy & set(sys.modules)); print(loaded); sys.exit(bool(loaded))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
