"""Generation-based evaluation: stopping a row at its first answer match changes no prediction."""

from __future__ import annotations

import re

import pytest

from dorafit.eval.evaluate import generate_responses, stops_at_first_match
from dorafit.eval.tasks import TASKS, Task


def test_every_task_may_stop_at_its_first_match():
    assert all(stops_at_first_match(task) for task in TASKS.values())
    # "true" inside "untrue": a later token could turn "true" into an earlier-starting "untrue".
    assert not stops_at_first_match(Task("x", "x", ("true", "untrue")))


@pytest.mark.slow
def test_a_row_stops_at_its_first_match_and_keeps_its_prediction(smollm2_folder):
    from dorafit.train.models import load_model, load_tokenizer

    model, _ = load_model(smollm2_folder, "causal-lm", trust_remote_code=False)
    tokenizer = load_tokenizer(smollm2_folder, trust_remote_code=False)
    prompts = ["The capital of France is", "Write one sentence about the sea.",
               "List three colours:", "Question: is the sky blue? Answer:"]
    pattern = re.compile(r"\b(the|is|a)\b")  # words an untrained model writes early in prose
    full = generate_responses(model, tokenizer, prompts, 20, batch_size=4)
    stopped = generate_responses(model, tokenizer, prompts, 20, batch_size=4, stop_pattern=pattern)
    matched = 0
    for whole, short in zip(full, stopped):
        assert whole.startswith(short)
        first = pattern.search(whole)
        if first is None:
            assert short == whole  # no match: the row runs to the end
            continue
        matched += 1
        assert pattern.search(short).group(0) == first.group(0)
        assert short.strip() == whole[: len(short)].strip() and len(short) < len(whole)
    assert matched >= 2  # the check above ran on rows that did stop early
