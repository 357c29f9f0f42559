"""Before / after under both scorings: the paired change, its standard error, the sentence."""

from __future__ import annotations

import math

import pytest

from dorafit.eval.evaluate import EvalResult
from dorafit.eval.report import change_sentence, paired_change, summary


def _generated(right: list[bool]) -> EvalResult:
    predictions = [{"row": i + 1, "gold": "answer1", "pred": "answer1" if ok else None} for i, ok in enumerate(right)]
    return EvalResult("t", len(right), sum(right), unparseable=len(right) - sum(right), scoring="generate",
                      predictions=predictions)


def _scored(right: list[bool]) -> EvalResult:
    predictions = [{"row": i + 1, "gold": 0, "pred": 0 if ok else 1, "pred_norm": 0} for i, ok in enumerate(right)]
    return EvalResult("t", len(right), sum(right), scoring="loglik", correct_norm=len(right), predictions=predictions)


def test_paired_change_and_its_standard_error():
    before = _scored([True] * 50 + [False] * 50)
    after = _scored([True] * 50 + [True] * 10 + [False] * 40)  # 10 rows gained, none lost
    change, error = paired_change(before, after)
    d = [0] * 90 + [1] * 10
    sd = math.sqrt(sum((x - 0.1) ** 2 for x in d) / 99)
    assert change == pytest.approx(0.1) and error == pytest.approx(sd / 10)
    assert paired_change(before, after, norm=True) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same rows"):
        paired_change(before, _scored([True]))


def test_the_sentence_says_which_moved():
    flat = (_scored([True] * 50 + [False] * 50),) * 2
    gen = (_generated([False] * 100), _generated([True] * 40 + [False] * 60))
    only_gen = change_sentence(gen, flat)
    assert "generation accuracy +40.0 points" in only_gen and "likelihood accuracy +0.0 points (± 0.0)" in only_gen
    assert "Only generation moved" in only_gen
    both = change_sentence(gen, (flat[0], _scored([True] * 70 + [False] * 30)))
    assert "Both moved" in both
    assert "Neither moved" in change_sentence((gen[0], gen[0]), flat)
    assert change_sentence(None, None) == ""


def test_summary_keeps_figures_not_rows():
    s = summary(_scored([True, False, True, True]))
    assert s["acc"] == 0.75 and s["acc_norm"] == 1.0 and s["rows"] == 4 and "predictions" not in s
    assert summary(None) is None and summary(_generated([True, False]))["unparseable"] == 0.5
