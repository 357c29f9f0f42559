"""Commonsense multiple-choice data for the encoder reproduction.

The LLM-Adapters files hold rows {instruction, input, output, answer} written for a decoder that
generates "the correct answer is answer2". An encoder cannot generate, so each task is read as
multiple choice instead: the instruction is split into a question and its choices, and the model
scores every (question, choice) pair; a softmax over the pair scores of one question gives the
prediction.

    BoolQ:        "... question: <q>\\n\\nAnswer format: true/false"     -> choices ("true", "false")
    ARC-e/c, OBQA: "... question: <q>\\n\\nAnswer1: <a> Answer2: <b> ..." -> choices (a, b, ...)

Subsets are drawn with a fixed seed so that every run of the reproduction sees the same questions.
"""
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

TASKS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")

_QUESTION_PREFIX = re.compile(r"^.*?question:\s*", re.S)
_CHOICE = re.compile(r"Answer(\d+):\s*(.*?)\s*(?=Answer\d+:|$)", re.S)


@dataclass
class Question:
    task: str
    question: str
    choices: List[str]
    label: int  # index into choices


def parse_row(task: str, row: dict, where: str) -> Question:
    """One LLM-Adapters row -> Question; `where` (file:row) names the row in errors."""
    text = row["instruction"]
    body = _QUESTION_PREFIX.sub("", text, count=1)
    question, _, rest = body.partition("\n\n")
    answer = row["answer"].strip().lower()
    if task == "boolq":
        choices = ["true", "false"]
        if answer not in choices:
            raise ValueError(f"{where}: BoolQ answer must be true/false, got {row['answer']!r}")
        return Question(task, question.strip(), choices, choices.index(answer))
    found = _CHOICE.findall(rest.split("\n\nAnswer format")[0])
    if len(found) < 2:
        raise ValueError(f"{where}: could not find 'AnswerN:' choices in the instruction")
    numbers = [int(n) for n, _ in found]
    if numbers != list(range(1, len(found) + 1)):
        raise ValueError(f"{where}: choices are not numbered 1..{len(found)}: {numbers}")
    match = re.fullmatch(r"answer(\d+)", answer)
    if match is None or not 1 <= int(match.group(1)) <= len(found):
        raise ValueError(f"{where}: answer {row['answer']!r} is not one of answer1..answer{len(found)}")
    return Question(task, question.strip(), [c for _, c in found], int(match.group(1)) - 1)


def load_task(root: Path, task: str, split: str) -> List[Question]:
    path = Path(root) / task / f"{split}.json"
    rows = json.loads(path.read_text())
    return [parse_row(task, row, f"{path}:{i}") for i, row in enumerate(rows)]


def load_subset(root: Path, tasks: Sequence[str], split: str, per_task: int, seed: int = 0) -> List[Question]:
    """`per_task` questions of each task (all of them if per_task <= 0), drawn with `seed`; a
    smaller subset is a prefix of a larger one."""
    out: List[Question] = []
    for task in tasks:
        questions = load_task(root, task, split)
        if 0 < per_task < len(questions):
            questions = list(questions)
            random.Random(f"{seed}-{task}-{split}").shuffle(questions)
            questions = questions[:per_task]
        out.extend(questions)
    return out
