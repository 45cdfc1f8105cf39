"""The one parity check (``targets/parity.py``): the layer-streamed reference against transformers
computed independently, vLLM's ``check_logprobs_close`` rule on hand-made continuations, the stop
rule, both directions on a tiny model (a right fp32 runtime passes exactly, a wrong model fails),
and the figures as results.json, report.md, report.html and the console show them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from prunecomp_export.report.render import NO_TARGETS, render_html, render_markdown, target_line
from prunecomp_export.report.results import SCHEMA_FILE, RunResults, TargetParity, deployed_targets
from prunecomp_export.targets import TargetRecord, target_parity
from prunecomp_export.targets import parity as P
from tests.test_report import hand_made
from tests.tiny_checkpoint import EOS, make_checkpoint, swapped_layers, transformers_run

PROMPTS = ["Hello, world", "The cat sat on the mat and"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny"), layers=3)


# --- the reference -------------------------------------------------------------------------------


def test_the_streamed_reference_is_what_transformers_computes(checkpoint):
    """Two sequences of different lengths in one right-padded batch, the head in chunks of 3 tokens:
    each token's log-probability and the top-k equal a plain fp32 transformers forward's."""
    import torch
    from transformers import AutoModelForCausalLM

    sequences = [([5, 17, 33, 9, 41, 7, 99], 4), ([7, 12, 3], 2)]
    scores = P.reference_scores(checkpoint, sequences, top_k=4, logits_chunk=3)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    for (ids, prompt_length), score in zip(sequences, scores, strict=True):
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        wanted = [float(expected[j, t]) for j, t in enumerate(ids[1:])]
        assert score.token_logprobs == pytest.approx(wanted, abs=1e-5)
        assert len(score.top) == len(ids) - prompt_length
        for position, top in enumerate(score.top):
            values, indices = expected[prompt_length - 1 + position].topk(4)
            assert sorted(top) == sorted(indices.tolist())
            assert [top[i] for i in indices.tolist()] == pytest.approx(values.tolist(), abs=1e-5)


def test_stop_ids_come_from_the_generation_config_and_the_tokenizer(checkpoint, tmp_path):
    from transformers import AutoTokenizer

    assert P.stop_token_ids(checkpoint, AutoTokenizer.from_pretrained(checkpoint)) == [EOS]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert P.stop_token_ids(tmp_path) == [2, 7]


# --- the comparison, on hand-made continuations ----------------------------------------------------

TOLERANCE = P.Tolerance(max_abs=0.5, mean_abs=0.1)


def run_of(new_ids, new_top, prompt_logprobs=(-1.0, -2.0), runtime_prompt_ids=None) -> P.RuntimeRun:
    new_logprobs = [top[t] for top, t in zip(new_top, new_ids, strict=True)]
    continuation = P.Continuation(
        prompt_ids=[1, 5, 6], runtime_prompt_ids=runtime_prompt_ids, prompt_logprobs=list(prompt_logprobs),
        new_ids=new_ids, new_logprobs=new_logprobs, new_top=new_top,
    )  # fmt: skip
    return P.RuntimeRun(runtime="r", dtype="bfloat16", continuations=[continuation])


def reference_of(new_ids, top) -> P.ReferenceScores:
    """The reference's log-probabilities: -1, -2 for the prompt, then its top's value of each token."""
    return P.ReferenceScores(token_logprobs=[-1.0, -2.0, *(t[i] for t, i in zip(top, new_ids, strict=True))], top=top)


def compare(run, ref) -> P.ParityReport:
    return P.compare(["p"], run, [ref], TOLERANCE, top_k=2, reference="ref")


def test_identical_continuations_have_no_divergence_and_zero_difference():
    top = [{7: -0.1, 8: -2.5}, {9: -0.2, 4: -1.9}]
    report = compare(run_of([7, 9], top), reference_of([7, 9], top))
    assert report.passed and report.divergences == []
    assert (report.prompt_tokens, report.new_tokens, report.max_abs_diff) == (2, 2, 0.0)


def test_a_divergence_at_a_near_tie_inside_both_top_k_is_close():
    runtime_top = [{7: -0.1, 8: -2.5}, {4: -0.70, 9: -0.72}]
    reference_top = [{7: -0.1, 8: -2.5}, {9: -0.70, 4: -0.75}]
    report = compare(run_of([7, 4], runtime_top), reference_of([7, 4], reference_top))
    (divergence,) = report.divergences
    assert (divergence.position, divergence.runtime_token, divergence.reference_token) == (1, 4, 9)
    assert divergence.gap == pytest.approx(0.05) and divergence.near_tie and divergence.close
    assert report.generation_passed
    assert report.max_abs_diff == pytest.approx(0.05)  # the runtime's -0.70 for token 4 against -0.75


def test_a_token_outside_the_other_sides_top_k_is_not_close_and_nothing_after_it_counts():
    runtime_top = [{3: -0.2, 8: -2.5}, {5: -0.1, 6: -3.0}]
    reference_top = [{7: -0.1, 8: -2.5, 3: -4.0}, {5: -0.1, 6: -3.0}]
    report = compare(run_of([3, 5], runtime_top), reference_of([3, 5], reference_top))
    (divergence,) = report.divergences
    assert divergence.position == 0 and not divergence.close and not divergence.near_tie
    assert divergence.gap == pytest.approx(3.9)
    assert not report.generation_passed and not report.passed
    rows = {row["name"]: row for row in report.checks()}
    assert rows["greedy_close"]["measured"] == 0 and "not in each other's top-k" in rows["greedy_close"]["detail"]


def test_log_probabilities_over_the_tolerance_fail_even_with_every_token_equal():
    top = [{7: -0.1, 8: -2.5}]
    report = compare(run_of([7], top, prompt_logprobs=(-1.0, -2.9)), reference_of([7], top))
    assert report.generation_passed and not report.logprobs_passed
    assert report.max_abs_diff == pytest.approx(0.9) and report.mean_abs_diff == pytest.approx(0.3)
    nan = compare(run_of([7], top, prompt_logprobs=(-1.0, math.nan)), reference_of([7], top))
    assert nan.max_abs_diff == math.inf and not nan.passed  # a broken runtime cannot pass


def test_a_runtime_tokenizer_that_encodes_the_prompt_differently_fails_generation():
    top = [{7: -0.1, 8: -2.5}]
    report = compare(run_of([7], top, runtime_prompt_ids=[1, 5]), reference_of([7], top))
    assert report.logprobs_passed and not report.generation_passed
    assert "tokenizer encodes it differently" in report.checks()[2]["detail"]


def test_the_one_stop_rule_keeps_the_stop_token_and_drops_what_follows():
    top = [{7: -0.1}, {2: -0.1}, {9: -0.1}]
    (continuation,) = run_of([7, 2, 9], top).continuations
    cut = continuation.until_stop([2])
    assert (cut.new_ids, cut.new_logprobs, len(cut.new_top)) == ([7, 2], [-0.1, -0.1], 2)
    assert continuation.until_stop([]).new_ids == [7, 2, 9]


def test_tolerances_are_set_for_every_dtype_and_overridable():
    assert set(P.TOLERANCES) == {"float32", "bfloat16", "float16", "int8", "int4"}
    assert P.TOLERANCES["float32"][0] < P.TOLERANCES["bfloat16"][0]
    assert P.ParityOptions(max_logprob_diff=0.3).tolerance("bfloat16") == P.Tolerance(
        max_abs=0.3, mean_abs=P.TOLERANCES["bfloat16"][1]
    )


# --- both directions on a tiny model --------------------------------------------------------------


def test_an_fp32_runtime_on_the_right_model_is_exact(checkpoint):
    run = transformers_run(checkpoint, PROMPTS, dtype="float32", stop_ids=[EOS])
    report = P.check(checkpoint, PROMPTS, run, P.ParityOptions(prompts=PROMPTS), [EOS])
    assert report.passed, report.summary()
    assert report.max_abs_diff < 1e-4 and report.divergences == []
    assert report.tokens_compared == sum(len(p.encode()) - 1 for p in PROMPTS) + report.new_tokens


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_runtime_given_a_wrong_model_fails_in_every_dtype(checkpoint, tmp_path, dtype):
    """Layers 0 and 1 swapped, run in ``dtype``, judged against the right checkpoint's reference."""
    wrong = swapped_layers(checkpoint, tmp_path / "swapped", 0, 1)
    run = transformers_run(wrong, PROMPTS, dtype=dtype, stop_ids=[EOS])
    report = P.check(checkpoint, PROMPTS, run, P.ParityOptions(prompts=PROMPTS), [EOS])
    assert not report.logprobs_passed, report.summary()
    assert report.max_abs_diff > P.TOLERANCES[dtype][0]


# --- results.json and the reports ---------------------------------------------------------------


def parity_report(max_abs: float = 0.01, divergence: bool = True) -> P.ParityReport:
    gap = P.ParityDivergence(prompt="a|b", position=3, runtime_token=4, reference_token=9, gap=0.04, near_tie=True,
                       close=True)  # fmt: skip
    prompt = P.PromptParity(prompt="a|b", prompt_tokens=5, new_tokens=8, max_abs_diff=max_abs, tokenizer_match=True,
                            divergence=gap if divergence else None)  # fmt: skip
    return P.ParityReport(
        runtime="vLLM 0.32.0", dtype="bfloat16", reference="fp32 layer-streamed reference on cpu",
        tolerance=P.tolerance_for("bfloat16"), top_k=5, prompt_tokens=4, new_tokens=8, max_abs_diff=max_abs,
        mean_abs_diff=max_abs / 4, prompts=[prompt],
    )  # fmt: skip


def deployed() -> list[TargetParity]:
    """A vllm target that passed (with a near-tie divergence), an onnx target whose log-probabilities
    are too far, and a tensorrt target that could not run."""
    records = {
        "vllm": TargetRecord.judged("vllm", parity_report(), {}).model_dump(mode="json"),
        "onnx": TargetRecord.judged("onnx", parity_report(max_abs=2.3, divergence=False), {}).model_dump(mode="json"),
        "tensorrt": TargetRecord(
            target="tensorrt", passed=False, error="TensorRT check failed (log: x.log)"
        ).model_dump(mode="json"),
    }
    return deployed_targets(records)


def test_results_json_records_each_target_and_validates_against_the_schema():
    results = hand_made(targets=deployed()).to_json()
    jsonschema.validate(results, json.loads(SCHEMA_FILE.read_text()))
    assert RunResults.model_validate(results).to_json() == results
    vllm, onnx, tensorrt = results["targets"]
    assert (vllm["passed"], vllm["dtype"], vllm["tokens_compared"]) == (True, "bfloat16", 12)
    assert [c["name"] for c in vllm["checks"]] == ["logprob_max", "logprob_mean", "greedy_close"]
    assert vllm["divergences"][0] | {"prompt": "a|b"} == {"prompt": "a|b", "position": 3, "runtime_token": 4,
                                                       "reference_token": 9, "gap": 0.04, "near_tie": True,
                                                       "close": True}  # fmt: skip
    assert (onnx["passed"], onnx["checks"][0]["passed"], onnx["checks"][2]["passed"]) == (False, False, True)
    assert (tensorrt["passed"], tensorrt["checks"], tensorrt["error"]) == (
        False,
        [],
        "TensorRT check failed (log: x.log)",
    )
    with pytest.raises(ValidationError):
        hand_made(targets=[{"target": "onnx", "passed": True, "checks": []}])  # no checks and no error


def test_markdown_lists_every_check_and_the_error_of_a_target_that_could_not_run():
    markdown = render_markdown(hand_made(targets=deployed()))
    section = markdown[markdown.index("## Deployed targets") : markdown.index("## Cost")]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0] == "| target | check | measured | limit | unit | result | detail |"
    assert table[1].startswith("| vllm | logprob_max | 0.01 | ≤ 0.6 | max |log-prob diff| (nats) | PASS |".replace(
        "|log-prob diff|", "\\|log-prob diff\\|"))  # fmt: skip
    assert "diverged at new token 3 (a near-tie, 0.04 nats apart; close)" in table[3]
    assert "'a\\|b'" in table[3]  # a | in a prompt is escaped, so the row keeps its 7 cells
    assert table[4].startswith("| onnx | logprob_max | 2.3 | ≤ 0.6 |") and "| FAIL |" in table[4]
    assert table[7] == "| tensorrt | built |  |  |  | FAIL | TensorRT check failed (log: x.log) |"
    assert "built: vllm PASS, onnx FAIL, tensorrt FAIL." in section


def test_markdown_and_html_say_when_no_target_was_built():
    results = hand_made(targets=[])
    assert f"## Deployed targets\n\n{NO_TARGETS}\n" in render_markdown(results)
    assert f"<p id='targets'>{NO_TARGETS}</p>" in render_html(results)


def test_html_shows_every_check_with_its_verdict():
    page = render_html(hand_made(targets=deployed()))
    assert "<table id='targets'>" in page
    assert "<tr><td>vllm</td><td>greedy_close</td><td>1</td><td>≥ 1</td><td>continuations close</td>" in page
    assert page.count("<td class='FAIL'>FAIL</td>") == 3  # onnx's two log-probability rows, tensorrt's error


def test_console_line_gives_the_runtime_dtype_tokens_and_each_figure():
    vllm, _, tensorrt = deployed()
    assert target_line(vllm).startswith("vllm (vLLM 0.32.0 bfloat16, 12 tokens): logprob_max 0.01 ≤ 0.6")
    assert target_line(tensorrt) == "tensorrt: TensorRT check failed (log: x.log)"


def test_parity_figures_import_no_runtime():
    """results.json is written in the CLI process: reading the records must not import a backend."""
    record = TargetRecord.judged("vllm", parity_report(), {}).model_dump(mode="json")
    code = (
        "import json, sys; from prunecomp_export.targets import target_parity; "
        f"target_parity({{'vllm': json.loads({json.dumps(json.dumps(record))})}}); "
        "heavy = {'torch', 'transformers', 'onnx', 'onnxruntime', 'onnxruntime_genai', 'onnxscript', "
        "'tensorrt', 'tensorrt_llm', 'vllm', 'numpy'}; "
        "loaded = sorted(heavy & set(sys.modules)); print(loaded); sys.exit(bool(loaded))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert target_parity({"vllm": record})[0]["passed"] is True


def test_a_target_recorded_by_an_older_version_asks_to_be_rebuilt():
    old = {"target": "vllm", "tokens_equal": True, "prompts": [], "dtype": "float32"}
    (entry,) = target_parity({"vllm": old})
    assert entry["passed"] is False and "prunecomp-export export OUT --target vllm" in entry["error"]
