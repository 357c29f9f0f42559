"""Data files for training and evaluation: reading them, recognising row formats, rows -> examples.

Files (JSON array, JSONL, CSV, parquet) are read through the ``datasets`` library. Three row
formats are recognised:

- commonsense / instruction rows (the LLM-Adapters files the DoRA paper trains on):
  ``{instruction, input, output, answer}`` (``input`` and ``answer`` optional);
- multiple-choice rows: ``{question, choices: [str, ...], label: int}``;
- classification rows: ``{text, label}`` (optionally ``text_pair``).

For a causal LM a row becomes a prompt (the paper's template or the model's chat template,
``dorafit.eval.examples.build_prompt``) plus the response (the row's output, or the chosen
choice's text before its answer word: ``build_response``); the loss is taken on the
response tokens only (prompt positions carry label -100). For an encoder a commonsense row is
parsed into its question and choices (see ``dorafit.eval.tasks.parse_instruction``).
Which of these a model gets is its kind's choice (``dorafit.train.kinds``: ``loss_examples``,
``accuracy_examples``), for ``dorafit train`` and ``dorafit eval`` alike; the example types,
the prompt and the batching live in ``dorafit.eval.examples`` (evaluation needs them without
the trainer).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from dorafit.eval.examples import (  # noqa: F401  (the examples and batches, shared with evaluation)
    IGNORE_INDEX,
    PROMPT,
    PROMPT_WITH_INPUT,
    ChoiceExample,
    TextExample,
    build_prompt,
    build_response,
    collate_causal,
    collate_choices,
    collate_texts,
    format_prompt,
)
from dorafit.eval.tasks import Task, extract_answer, parse_instruction

# The commonsense subsets shipped with dorafit: <task folder>/{train,test}.json.
BUNDLED_DATA = Path(__file__).resolve().parent.parent / "data"

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class DataError(ValueError):
    """Bad training or evaluation data; the message names the file and, if known, the row."""


def _locate_json_error(path: Path) -> str | None:
    """Find the first syntax error of a JSON / JSONL file, as 'line N: message'."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number}: invalid JSON ({err.msg}, column {err.colno})"
            if not isinstance(value, dict):
                return f"line {number}: expected a JSON object, got {type(value).__name__}"
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return f"line {err.lineno}: invalid JSON ({err.msg}, column {err.colno})"
    if isinstance(value, list):
        if not value:
            return "the data set is empty"
        for number, row in enumerate(value, start=1):
            if not isinstance(row, dict):
                return f"row {number}: expected a JSON object, got {type(row).__name__}"
    return None


def read_rows(path: str | os.PathLike, split: str = "") -> list[dict]:
    """Read every row of a JSON / JSONL / CSV / parquet file as a dict, via ``datasets``.

    A folder (``datasets.save_to_disk`` output or a folder of data files) or a hub dataset id,
    optionally ending in ``:SPLIT``, is read by ``dorafit.train.datasets_io``; ``split`` picks
    the split there.
    """
    if Path(path).is_dir() or not Path(path).exists() or split:
        from dorafit.train.datasets_io import SourceError, looks_like_hub_id, read_source_rows, split_source

        name = split_source(str(path))[0]
        if Path(name).exists() or looks_like_hub_id(name) or split:
            try:
                return read_source_rows(str(path), split)
            except SourceError as err:
                raise DataError(str(err)) from None
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise DataError(f"{path}: not a readable file")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use one of {', '.join(_BUILDERS)}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if builder == "json":
        # The datasets error for a broken JSON file does not say where; find the line first.
        problem = _locate_json_error(path)
        if problem is not None:
            raise DataError(f"{path}: {problem}")
    import datasets

    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parser errors in several exception types
        cause = err.__cause__ or err
        raise DataError(f"{path}: could not be read as {builder}: {cause}") from err
    rows = dataset.to_list()
    if not rows:
        raise DataError(f"{path}: the data set is empty")
    return rows


def detect_format(rows: list[dict], path) -> str:
    """'commonsense', 'multiple_choice' or 'classification', from the first row's keys."""
    keys = set(rows[0])
    if {"instruction", "output"} <= keys:
        return "commonsense"
    if {"question", "choices", "label"} <= keys:
        return "multiple_choice"
    if {"text", "label"} <= keys:
        return "classification"
    raise DataError(
        f"{path}: row 1 has keys {sorted(keys)}; expected {{instruction, output[, input, answer]}}, "
        "{question, choices, label} or {text, label}"
    )


def require_text(row: dict, key: str, path, number: int, required: bool = True) -> str:
    """The string under ``key`` of row ``number`` (1-based), or a DataError naming file, row and key."""
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataError(f"{path}: row {number}: missing or empty {key!r}")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{path}: row {number}: {key!r} must be a string, got {type(value).__name__}")
    return value


def to_choice_examples(rows: list[dict], kind: str, path, task: Task | None = None) -> list[ChoiceExample]:
    """Multiple-choice examples from commonsense or multiple-choice rows (row numbers 1-based)."""
    examples = []
    for number, row in enumerate(rows, start=1):
        if kind == "commonsense":
            instruction = require_text(row, "instruction", path, number)
            try:
                question, choices, words = parse_instruction(instruction)
            except ValueError as err:
                raise DataError(f"{path}: row {number}: {err}") from None
            answer = row.get("answer")
            if isinstance(answer, bool):  # CSV readers turn "true"/"false" into booleans
                answer = str(answer).lower()
            answer = answer or _answer_from_output(row.get("output") or "", words)
            if answer not in words:
                raise DataError(
                    f"{path}: row {number}: answer {answer!r} is not one of {'/'.join(words)}"
                )
            if task is not None and not set(words) <= set(task.answer_words):
                raise DataError(
                    f"{path}: row {number}: answer words {'/'.join(words)} do not belong to task {task.name}"
                )
            examples.append(ChoiceExample(question, choices, words.index(answer)))
        elif kind == "multiple_choice":
            question = require_text(row, "question", path, number)
            choices = row.get("choices")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise DataError(f"{path}: row {number}: 'choices' must be a list of at least two strings")
            label = row.get("label")
            if not isinstance(label, int) or not 0 <= label < len(choices):
                raise DataError(f"{path}: row {number}: 'label' must be an index into 'choices', got {label!r}")
            examples.append(ChoiceExample(question, list(choices), label))
        else:
            raise DataError(f"{path}: {kind} rows cannot be read as multiple choice")
    return examples


def _answer_from_output(output: str, words: list[str]) -> str | None:
    """The answer word named in an output such as 'the correct answer is answer3'."""
    hits = [(output.find(w), w) for w in words if w in output]
    return min(hits)[1] if hits else None


def to_text_examples(rows: list[dict], path, labels: list | None = None) -> tuple[list[TextExample], list]:
    """Classification examples; string labels are mapped to ids in order of first appearance."""
    if labels is None:
        labels = sorted({row.get("label") for row in rows if row.get("label") is not None}, key=str)
    index = {label: i for i, label in enumerate(labels)}
    examples = []
    for number, row in enumerate(rows, start=1):
        text = require_text(row, "text", path, number)
        pair = require_text(row, "text_pair", path, number, required=False) or None
        if row.get("label") not in index:
            raise DataError(f"{path}: row {number}: label {row.get('label')!r} is not one of {labels}")
        examples.append(TextExample(text, pair, index[row["label"]]))
    return examples, labels


def to_instruction_pairs(rows: list[dict], kind: str, path, template: str = "paper",
                         tokenizer=None, response_format: str = "paper",
                         task: Task | None = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs for causal-LM tuning, prompted with ``template`` ("paper" or "chat"),
    the response in ``response_format`` ("paper": the row's output; "choice": see ``build_response``)."""
    if kind != "commonsense":
        raise DataError(f"{path}: a causal LM needs instruction rows {{instruction, output}}, not {kind} rows")
    pairs = []
    for number, row in enumerate(rows, start=1):
        instruction = require_text(row, "instruction", path, number)
        output = require_text(row, "output", path, number)
        inp = require_text(row, "input", path, number, required=False)
        if response_format != "paper":
            output = _choice_response(response_format, row, instruction, output, task, path, number)
        pairs.append((build_prompt(template, instruction, inp, tokenizer), output))
    return pairs


def _choice_response(response_format: str, row: dict, instruction: str, output: str, task: Task | None,
                     path, number: int) -> str:
    """The response of one row in a format other than its own output; the answer word is the
    row's ``answer`` or, without one, the first answer word in its output."""
    answer = str(row.get("answer") or "").strip()
    if not answer and task is not None:
        answer = extract_answer(task, output) or ""
    try:
        return build_response(response_format, instruction, output, answer)
    except ValueError as exc:
        raise DataError(f"{path}: row {number}: {exc}") from None


def tokenize_instruction_pairs(pairs, tokenizer, max_length: int, path) -> list[dict]:
    """Token ids and labels with the prompt masked out (loss on the response only).

    The response is followed by the tokenizer's end-of-sequence token (for a chat model, the
    end of the assistant turn), so that the model learns to stop. Every example is cut at
    ``max_length`` tokens. If that cut leaves no response token in
    ANY example the max length is too small for this data, which is an error; examples that
    lose their whole response individually are dropped (they would add nothing to the loss).
    """
    eos = tokenizer.eos_token or ""
    examples, too_long, shortest = [], 0, None
    for prompt, response in pairs:
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        full_ids = tokenizer(prompt + response + eos, add_special_tokens=True)["input_ids"]
        shortest = len(full_ids) if shortest is None else min(shortest, len(full_ids))
        if len(full_ids) > max_length:
            too_long += 1
        ids = full_ids[:max_length]
        labels = [IGNORE_INDEX] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]
        if any(label != IGNORE_INDEX for label in labels):
            examples.append({"input_ids": ids, "labels": labels})
    if too_long == len(pairs) or not examples:
        raise DataError(
            f"{path}: max length {max_length} truncates every example (the shortest has "
            f"{shortest} tokens); raise --max-length"
        )
    return examples


def check_encoder_lengths(examples, tokenizer, max_length: int, path) -> None:
    """Refuse a max length that would cut every encoder example."""
    shortest = None
    for ex in examples:
        if isinstance(ex, ChoiceExample):
            n = max(len(tokenizer(ex.question, c)["input_ids"]) for c in ex.choices)
        else:
            n = len(tokenizer(ex.text, ex.text_pair)["input_ids"])
        shortest = n if shortest is None else min(shortest, n)
        if n <= max_length:
            return
    raise DataError(
        f"{path}: max length {max_length} truncates every example (the shortest has {shortest} "
        "tokens); raise --max-length"
    )


def split_validation(items: list, size: float, seed: int) -> tuple[list, list]:
    """Hold out a validation split: ``size`` rows if >= 1, else that fraction of the rows."""
    if size <= 0:
        return items, []
    n_val = int(size) if size >= 1 else math.ceil(size * len(items))
    if n_val >= len(items):
        raise DataError(
            f"validation size {size} leaves no training rows (the data set has {len(items)})"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(items), generator=generator).tolist()
    val_ids = set(order[:n_val])
    train = [x for i, x in enumerate(items) if i not in val_ids]
    val = [x for i, x in enumerate(items) if i in val_ids]
    return train, val
