"""A non-interactive log never sits silent through a long loop."""

from __future__ import annotations

from prunecomp_export import progress


def test_a_long_loop_logs_how_far_it_got(monkeypatch, capsys):
    clock = iter(range(0, 1000, 25))  # each step takes 25 s
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    assert list(progress.Reporter().track(range(6), "layers")) == list(range(6))
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines()]
    assert lines == ["layers: 3/6", "layers: 6/6"]  # at most one line a minute


def test_a_short_loop_logs_nothing(capsys):
    assert list(progress.Reporter().track(iter("abc"), "batches")) == ["a", "b", "c"]
    assert capsys.readouterr().err == ""
