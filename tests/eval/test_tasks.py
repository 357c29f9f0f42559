"""The task table, the paper's answer extraction and the parsing of commonsense instructions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dorafit.eval.evaluate import score_responses
from dorafit.eval.tasks import TASKS, answer_index, extract_answer, get_task, parse_instruction

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data" / "LLM-Adapters" / "dataset"
SEVEN = ["boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]


@pytest.mark.parametrize("name", SEVEN)
def test_the_seven_tasks_are_known_by_name(name):
    assert get_task(name).name == name
    assert get_task(name.upper()).name == name


def test_aliases_and_unknown_task():
    assert get_task("arc_e").name == "ARC-Easy"
    assert get_task("obqa").name == "openbookqa"
    assert get_task("siqa").name == "social_i_qa"
    with pytest.raises(ValueError, match="unknown task 'mmlu'.*boolq"):
        get_task("mmlu")


@pytest.mark.parametrize("task, text, want", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "false, not true", "false"),               # first match wins
    ("piqa", "solution2 is better than solution1", "solution2"),
    ("ARC-Easy", "the correct answer is answer5", "answer5"),
    ("hellaswag", "ending3", "ending3"),
    ("winogrande", "I pick option1", "option1"),
    ("social_i_qa", "Answer2", None),                    # the paper's regex is case-sensitive
    ("openbookqa", "no idea", None),
])
def test_extract_answer_takes_the_first_match(task, text, want):
    assert extract_answer(get_task(task), text) == want


def test_score_responses_counts_unparseable():
    task = get_task("piqa")
    result = score_responses(task, ["solution1", "solution2 maybe", "dunno", "solution1"],
                             ["solution1", "solution1", "solution2", "solution1"])
    assert (result.rows, result.correct, result.unparseable) == (4, 2, 1)
    assert result.accuracy == 0.5 and result.unparseable_share == 0.25


def test_parse_instruction_examples():
    q, choices, words = parse_instruction(
        "Please choose the correct answer to the question: Which is a gas?\n\n"
        "Answer1: iron Answer2: oxygen Answer3: salt\n\nAnswer format: answer1/answer2/answer3")
    assert q == "Which is a gas?" and choices == ["iron", "oxygen", "salt"]
    assert words == ["answer1", "answer2", "answer3"]
    q, choices, words = parse_instruction(
        "Please answer the following question with true or false, question: is water wet?\n\n"
        "Answer format: true/false")
    assert q == "is water wet?" and choices == ["true", "false"]
    with pytest.raises(ValueError, match="Answer format"):
        parse_instruction("What is 2 + 2?")
    with pytest.raises(ValueError, match="do not match"):
        parse_instruction("Please choose: Q\n\nAnswer1: a Answer3: b\n\nAnswer format: answer1/answer2")
    assert answer_index(get_task("boolq"), "false") == 1


def _files():
    files = sorted(SHARED.glob("*/*.json")) if SHARED.is_dir() else []
    return files or sorted((ROOT / "dorafit" / "data").glob("*/*.json"))


@pytest.mark.parametrize("path", _files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_row_of_the_real_files_parses(path):
    task = get_task(path.parent.name)
    rows = json.loads(path.read_text())
    for number, row in enumerate(rows, start=1):
        question, choices, words = parse_instruction(row["instruction"])
        assert question and all(choices), (path, number)
        assert set(words) <= set(task.answer_words), (path, number)
        assert row["answer"] in words, (path, number)
        assert extract_answer(task, row["output"]) == row["answer"], (path, number)
    assert len(TASKS) == 8  # the seven files plus HellaSwag (not in the snapshot)


def test_score_responses_counts_each_predicted_word():
    # A model that answers one word always is visible in the counts (unparseable rows are not counted).
    task = get_task("ARC-Easy")
    result = score_responses(task, ["the correct answer is answer1"] * 3 + ["no idea", "answer2"],
                             ["answer1", "answer2", "answer3", "answer1", "answer2"])
    assert result.predicted == {"answer1": 3, "answer2": 1}
    assert (result.correct, result.unparseable) == (2, 1)
