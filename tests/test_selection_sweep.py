"""The selection sweep's comparison of two runs' accuracy kept, paired over the same questions, against
a paired bootstrap over those questions (an independent estimate of the same interval)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.selection_sweep import kept_difference

DENSE_ACCURACY = {"analogy": 0.78, "sentiment": 0.81}


def run_results(answers: dict[str, list[int]], questions: str = "same") -> dict:
    """A results.json as the sweep reads it: the dense model's and the final model's accuracy rows."""
    rows = [
        {"variant": "dense", "layers_removed": 0, "kind": "accuracy", "dataset": task, "value": value, "details": {}}
        for task, value in DENSE_ACCURACY.items()
    ]
    for task, correct in answers.items():
        details = {"correct": correct, "questions_sha256": f"{task}/{questions}", "n": len(correct)}
        row = {"variant": "prunecomp", "layers_removed": 6, "kind": "accuracy", "dataset": task, "details": details}
        rows.append(row | {"value": sum(correct) / len(correct)})
    return {"model": {"layers_removed": 6}, "measurements": rows}


def random_answers(
    rng: np.random.Generator, accuracy: dict[str, float], sizes: dict[str, int]
) -> dict[str, np.ndarray]:
    return {task: (rng.random(sizes[task]) < accuracy[task]).astype(int) for task in sizes}


def test_kept_difference_matches_a_paired_bootstrap_over_the_questions():
    rng = np.random.default_rng(0)
    sizes = {"analogy": 280, "sentiment": 200}
    a = random_answers(rng, {"analogy": 0.72, "sentiment": 0.70}, sizes)
    # b agrees with a on most questions (the same model family), so the pairing narrows the interval
    b = {t: np.where(rng.random(sizes[t]) < 0.8, a[t], 1 - a[t]) for t in sizes}
    value, margin = kept_difference(
        run_results({t: a[t].tolist() for t in sizes}), run_results({t: b[t].tolist() for t in sizes})
    )
    dense = np.mean(list(DENSE_ACCURACY.values()))
    expected = 100 * np.mean([a[t].mean() - b[t].mean() for t in sizes]) / dense
    assert value == pytest.approx(expected, rel=1e-12)
    draws = []
    for _ in range(4000):  # resample the questions of each task, the same ones for both runs
        picks = {t: rng.integers(0, sizes[t], sizes[t]) for t in sizes}
        draws.append(100 * np.mean([a[t][picks[t]].mean() - b[t][picks[t]].mean() for t in sizes]) / dense)
    low, high = np.percentile(draws, [2.5, 97.5])
    assert margin == pytest.approx((high - low) / 2, rel=0.08)
    unpaired = 100 * 1.96 * np.sqrt(sum(a[t].var() / sizes[t] + b[t].var() / sizes[t] for t in sizes)) / 2 / dense
    assert margin < 0.8 * unpaired


def test_kept_difference_of_a_run_with_itself_is_zero_and_swapping_negates_it():
    rng = np.random.default_rng(1)
    sizes = {"analogy": 50, "sentiment": 40}
    a = run_results({t: v.tolist() for t, v in random_answers(rng, {"analogy": 0.6, "sentiment": 0.7}, sizes).items()})
    b = run_results({t: v.tolist() for t, v in random_answers(rng, {"analogy": 0.5, "sentiment": 0.8}, sizes).items()})
    assert kept_difference(a, a) == (0.0, 0.0)
    forward, backward = kept_difference(a, b), kept_difference(b, a)
    assert forward[0] == pytest.approx(-backward[0]) and forward[1] == pytest.approx(backward[1])


def test_kept_difference_refuses_runs_that_asked_other_questions():
    answers = {"analogy": [1, 0, 1], "sentiment": [0, 1]}
    assert kept_difference(run_results(answers), run_results(answers, questions="other")) is None
    assert kept_difference(run_results(answers), run_results({"analogy": [1, 0, 1]})) is None
    older = run_results(answers)  # a results.json from before per-question results were recorded
    for row in older["measurements"]:
        row["details"].pop("correct", None)
    assert kept_difference(run_results(answers), older) is None
