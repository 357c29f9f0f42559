"""The commonsense-reasoning tasks of the DoRA paper's recipe, by name.

Each task of the LLM-Adapters commonsense files ({instruction, input, output, answer}) has a
fixed set of answer words. The paper's protocol reads a generated response by taking the
FIRST match of the regular expression that alternates those words, e.g. for ARC:

    re.findall(r"answer1|answer2|answer3|answer4|answer5", response)[0]

and counts a response with no match as wrong ("unparseable"). For encoders the same rows are
read as multiple choice: the instruction is parsed into a question and its choices, and the
gold index is the position of ``answer`` among the task's answer words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """One commonsense task: its canonical name, folder name and answer words."""

    name: str
    folder: str
    answer_words: tuple[str, ...]
    aliases: tuple[str, ...] = ()

    @property
    def pattern(self) -> re.Pattern:
        """The paper's answer regex: the answer words as alternatives, case-sensitive."""
        return re.compile("|".join(re.escape(w) for w in self.answer_words))

    @property
    def num_choices(self) -> int:
        return len(self.answer_words)


_ANSWERS5 = tuple(f"answer{i}" for i in range(1, 6))

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("boolq", "boolq", ("true", "false")),
        Task("piqa", "piqa", ("solution1", "solution2")),
        Task("social_i_qa", "social_i_qa", _ANSWERS5, aliases=("siqa", "social-i-qa")),
        Task("hellaswag", "hellaswag", tuple(f"ending{i}" for i in range(1, 5))),
        Task("winogrande", "winogrande", ("option1", "option2")),
        Task("ARC-Easy", "ARC-Easy", _ANSWERS5, aliases=("arc-e", "arc_easy", "arce")),
        Task("ARC-Challenge", "ARC-Challenge", _ANSWERS5, aliases=("arc-c", "arc_challenge", "arcc")),
        Task("openbookqa", "openbookqa", _ANSWERS5, aliases=("obqa", "openbook_qa")),
    )
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def get_task(name: str) -> Task:
    """Look a task up by its name or an alias (case-insensitive; '_' and '-' are the same)."""
    key = _normalise(name)
    for task in TASKS.values():
        if key == _normalise(task.name) or key in {_normalise(a) for a in task.aliases}:
            return task
    known = ", ".join(TASKS)
    raise ValueError(f"unknown task {name!r}; known tasks: {known}")


def extract_answer(task: Task, response: str) -> str | None:
    """The first answer word found in a generated response, or None if there is none.

    Follows the paper's evaluation: a plain regex search over the stripped response text,
    the earliest match wins, no case folding.
    """
    match = task.pattern.search(response.strip())
    return match.group(0) if match else None


def answer_index(task: Task, answer: str) -> int:
    """Position of a gold answer word among the task's answer words."""
    try:
        return task.answer_words.index(answer.strip())
    except ValueError:
        raise ValueError(
            f"answer {answer!r} is not one of the answer words of task {task.name} "
            f"({'/'.join(task.answer_words)})"
        ) from None


# The instruction of a commonsense row, e.g.
#   "Please choose the correct answer to the question: <question>\n\nAnswer1: <a> Answer2: <b>
#    \n\nAnswer format: answer1/answer2"
# starts with a "Please ...:" preamble, lists its choices behind "<Word><digit>:" markers and
# ends with the "Answer format:" line, which names the answer words.
_PREAMBLE = re.compile(r"^\s*Please [^:]*?:\s*", re.DOTALL)
_FORMAT = re.compile(r"\s*Answer format:\s*(\S+)\s*$")
_MARKER = re.compile(r"\b(Answer|Solution|Option|Ending)(\d+):\s*")


def parse_instruction(instruction: str) -> tuple[str, list[str], list[str]]:
    """Split a commonsense instruction into (question, choices, answer_words).

    For BoolQ-style rows with no choice markers, the choices are the answer words themselves
    ("true", "false"). Raises ValueError when the text has no "Answer format:" line or when
    its markers do not match the answer words.
    """
    fmt = _FORMAT.search(instruction)
    if fmt is None:
        raise ValueError("no 'Answer format: ...' line at the end of the instruction")
    answer_words = fmt.group(1).split("/")
    body = instruction[: fmt.start()]
    body = _PREAMBLE.sub("", body, count=1)
    markers = list(_MARKER.finditer(body))
    if not markers:
        return body.strip(), list(answer_words), answer_words
    question = body[: markers[0].start()].strip()
    choices = []
    for i, marker in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(body)
        choices.append(body[marker.end() : end].strip())
    labels = [f"{m.group(1).lower()}{m.group(2)}" for m in markers]
    if labels != answer_words:
        raise ValueError(
            f"choice markers {labels} do not match the answer format {'/'.join(answer_words)}"
        )
    return question, choices, answer_words
