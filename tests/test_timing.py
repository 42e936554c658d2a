"""biasshift.timing: the benchmarks' best-of timing."""

from __future__ import annotations

import itertools

import pytest

from biasshift.timing import best_of, synchronize


def test_best_of_warms_up_once_then_returns_the_shortest_call(monkeypatch) -> None:
    import biasshift.timing as timing

    clock = itertools.chain([0.0, 5.0, 10.0, 12.0, 20.0, 23.0])  # calls of 5, 2 and 3 s
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    assert best_of(lambda: calls.append(1), 3, "cpu") == 2.0
    assert len(calls) == 4  # one untimed warm-up, three timed


def test_best_of_rejects_no_repeats() -> None:
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        best_of(lambda: None, 0)


def test_synchronize_is_a_no_op_on_the_cpu() -> None:
    synchronize("cpu")
