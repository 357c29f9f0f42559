"""Evaluation on the paper's commonsense tasks: task table, answer extraction, accuracy."""

from dorafit.eval.evaluate import EvalResult, evaluate_choices, evaluate_generation, score_responses
from dorafit.eval.tasks import TASKS, Task, extract_answer, get_task, parse_instruction

__all__ = [
    "TASKS",
    "EvalResult",
    "Task",
    "evaluate_choices",
    "evaluate_generation",
    "extract_answer",
    "get_task",
    "parse_instruction",
    "score_responses",
]
