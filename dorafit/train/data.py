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

Nothing is dropped or cut without a word: examples cut inside their response or dropped because
the prompt alone fills ``max_length`` are counted and reported (``LengthReport``); a test answer
that is not among the row's choices, a classification set with one class, a prompt longer than
the model's context, a chat template or pad token the tokenizer lacks are errors naming the file
and row. JSON nested too deeply for the parser is an error naming the file, not a traceback.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
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
from dorafit.files import brief, clip

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
            except RecursionError:
                return f"line {number}: JSON nests too deeply to be read; rows are flat objects"
            if not isinstance(value, dict):
                return f"line {number}: expected a JSON object, got {type(value).__name__}"
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return f"line {err.lineno}: invalid JSON ({err.msg}, column {err.colno})"
    except RecursionError:
        return "JSON nests too deeply to be read; rows are flat objects"
    if isinstance(value, list):
        if not value:
            return "the data set is empty"
        for number, row in enumerate(value, start=1):
            if not isinstance(row, dict):
                return f"row {number}: expected a JSON object, got {type(row).__name__}"
    return None


def read_rows(path: str | os.PathLike, split: str = "") -> list[dict]:
    """Read every row of a JSON / JSONL / CSV / parquet file as a dict, via ``datasets``.

    A folder (``datasets.save_to_disk`` output or a folder of data files) or a hub dataset (``hf://owner/name``),
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
        from dorafit.remote import HUB_PREFIX, looks_like_repo_id
        from dorafit.train.datasets_io import split_source

        name = split_source(str(path))[0]
        hint = f" (a dataset on the Hugging Face hub is written {HUB_PREFIX}{path})" if looks_like_repo_id(name) else ""
        raise DataError(f"{path}: no such file{hint}")
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
                    f"{path}: row {number}: answer {brief(answer)} is not one of {clip('/'.join(words))}"
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
                raise DataError(f"{path}: row {number}: 'label' must be an index into 'choices', got {brief(label)}")
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
    found = labels is None
    if found:
        labels = sorted({row.get("label") for row in rows if row.get("label") is not None}, key=str)
        if len(labels) == 1:  # a classifier trained on one class learns nothing but that class
            raise DataError(f"{path}: every labelled row has the label {brief(labels[0])}: a classification set needs "
                            "at least two classes")
    index = {label: i for i, label in enumerate(labels)}
    examples = []
    for number, row in enumerate(rows, start=1):
        text = require_text(row, "text", path, number)
        pair = require_text(row, "text_pair", path, number, required=False) or None
        if row.get("label") not in index:
            raise DataError(f"{path}: row {number}: label {brief(row.get('label'))} is not one of {brief(labels)}")
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


@dataclass
class LengthReport:
    """What ``max_length`` did to the examples of one file: cut inside their response (the loss sees
    only the start of it) or dropped (the prompt alone fills max_length: no response token left)."""

    path: str
    examples: int
    max_length: int
    cut: int = 0
    dropped: int = 0

    def __str__(self) -> str:
        parts = []
        if self.cut:
            parts.append(f"{self.cut} cut inside their response")
        if self.dropped:
            parts.append(f"{self.dropped} dropped (the prompt alone fills it)")
        return (f"{self.path}: max length {self.max_length} tokens: {' and '.join(parts)} of {self.examples} examples; "
                "raise --max-length to keep them whole")


def chars_to_tokenize(tokenizer, max_length: int) -> int:
    """How many leading characters of a text decide its first ``max_length`` tokens, with room
    to spare: no token spells more characters than the longest entry of the vocabulary, so this
    many characters make more than ``2 * max_length`` tokens, and a cut that far away cannot
    change the first ``max_length``. Texts are cut here before they are tokenized, so that a
    huge row costs no more than a row of the model's length."""
    longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1)
    return 2 * (max_length + 1) * max(longest, 1) + 64


def tokenize_instruction_pairs(pairs, tokenizer, max_length: int, path, report: list | None = None) -> list[dict]:
    """Token ids and labels with the prompt masked out (loss on the response only).

    The response is followed by the tokenizer's end-of-sequence token (for a chat model, the
    end of the assistant turn), so that the model learns to stop. Every example is cut at
    ``max_length`` tokens. If that cut leaves no response token in
    ANY example the max length is too small for this data, which is an error; examples that
    lose their whole response individually are dropped (they would add nothing to the loss).
    Examples cut inside their response and dropped ones are counted in a ``LengthReport``,
    appended to ``report`` when given, else issued as a warning.
    """
    eos = tokenizer.eos_token or ""
    examples, too_long, shortest = [], 0, None
    counts = LengthReport(str(path), len(pairs), max_length)
    keep = chars_to_tokenize(tokenizer, max_length)
    for prompt, response in pairs:
        prompt_ids = tokenizer(prompt[:keep], add_special_tokens=True)["input_ids"]
        full_ids = tokenizer((prompt + response + eos)[:keep], add_special_tokens=True)["input_ids"]
        shortest = len(full_ids) if shortest is None else min(shortest, len(full_ids))
        if len(full_ids) > max_length:
            too_long += 1
        ids = full_ids[:max_length]
        labels = [IGNORE_INDEX] * min(len(prompt_ids), len(ids)) + ids[len(prompt_ids):]
        if any(label != IGNORE_INDEX for label in labels):
            examples.append({"input_ids": ids, "labels": labels})
            counts.cut += len(full_ids) > max_length
        else:
            counts.dropped += 1
    if too_long == len(pairs) or not examples:
        raise DataError(
            f"{path}: max length {max_length} truncates every example (the shortest has "
            f"{shortest} tokens); raise --max-length"
        )
    if counts.cut or counts.dropped:
        if report is not None:
            report.append(counts)
        else:
            warnings.warn(str(counts), stacklevel=2)
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


# ---------------------------------------------------------------------------- test answers, the tokenizer, the context


def check_test_answers(rows: list[dict], path, task: Task) -> None:
    """Every test row's answer is one of its choices (the words of its "Answer format:" line, else
    the task's answer words): a row that cannot be scored is an error naming it."""
    for number, row in enumerate(rows, start=1):
        instruction = require_text(row, "instruction", path, number)
        answer = str(require_text(row, "answer", path, number)).strip()
        try:
            words = parse_instruction(instruction)[2]
        except ValueError:  # no "Answer format:" line: the task's answer words are the choices
            words = list(task.answer_words)
        if answer not in words:
            raise DataError(f"{path}: row {number}: answer {brief(answer)} is not one of its choices "
                            f"{clip('/'.join(words))}; the row cannot be scored")


def check_tokenizer(tokenizer, template: str, model: str) -> None:
    """Refuse a chat prompt template the tokenizer does not have, and a tokenizer with no token to
    pad batches with (not even end-of-sequence or unknown), before any row is formatted."""
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"--prompt-template chat: the tokenizer of {model} has no chat template; use "
                        "--prompt-template paper (or auto, which picks paper for it)")
    if getattr(tokenizer, "pad_token", None) is None:
        raise DataError(f"the tokenizer of {model} has no pad token, nor an end-of-sequence or unknown token to pad "
                        "with; set pad_token in its tokenizer_config.json")


def model_context(model_config) -> int | None:
    """The number of positions the model can attend to, from its config (None when it does not say)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(max_length: int, model_config, model: str) -> None:
    """Refuse a --max-length longer than the model's context (its position table would overflow)."""
    context = model_context(model_config)
    if context is not None and max_length > context:
        raise DataError(f"--max-length {max_length} is longer than the context of {model} ({context} positions); "
                        f"use --max-length {context} or less")


def check_prompt_lengths(rows: list[dict], tokenizer, template: str, max_new_tokens: int, model_config,
                         path, model: str) -> None:
    """Refuse a test row whose prompt plus ``max_new_tokens`` generated tokens exceeds the model's
    context, naming the row (generation would run past the position table)."""
    context = model_context(model_config)
    if context is None:
        return
    # A token spans at least one byte of text, so a row whose text bytes plus the template's own
    # tokens fit needs no tokenizing.
    overhead = len(tokenizer(build_prompt(template, "x", "", tokenizer))["input_ids"])
    for number, row in enumerate(rows, start=1):
        text_bytes = len((row.get("instruction") or "").encode()) + len((row.get("input") or "").encode())
        if text_bytes + overhead + max_new_tokens <= context:
            continue
        prompt = build_prompt(template, row["instruction"], row.get("input") or "", tokenizer)
        length = len(tokenizer(prompt)["input_ids"])
        if length + max_new_tokens > context:
            raise DataError(f"{path}: row {number}: its prompt has {length:,} tokens; with {max_new_tokens} generated "
                            f"tokens that passes the context of {model} ({context} positions)")
