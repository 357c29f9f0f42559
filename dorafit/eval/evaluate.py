"""Accuracy of a (possibly adapted) model on a commonsense task.

Causal LMs follow the paper's protocol: each row's instruction goes through the training
prompt (the same template, ``dorafit.eval.examples.build_prompt``), the model continues it
greedily for ``max_new_tokens`` tokens, and the first match of the task's answer regex in the
continuation is the prediction; a continuation with no match is wrong and is counted as
unparseable. A row stops generating as soon as its continuation holds a match: later tokens
cannot change the first match, so the prediction is the same as with all ``max_new_tokens``
and the evaluation costs only the tokens up to the answer. Encoders pick the highest-scoring
choice (the scores of their kind, ``dorafit.train.kinds``). Rows are batched in order of length
so that little compute goes into padding; the result does not depend on the order. Likelihood
scoring, as lm-evaluation-harness does it, is ``dorafit.eval.loglik``'s.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch

from dorafit.eval.examples import build_prompt
from dorafit.eval.tasks import Task, extract_answer


@dataclass
class EvalResult:
    """Counts of one evaluation and every row's prediction.

    ``scoring`` says how the rows were scored: "generate" (the paper's protocol: ``unparseable``
    counts outputs with no answer word, ``predicted`` how often each answer word was generated),
    "loglik" (lm-evaluation-harness's: ``correct_norm`` counts the rows right by length-normalised
    likelihood) or "choice" (an encoder's best-scored choice or class).
    """

    task: str
    rows: int
    correct: int
    unparseable: int = 0
    predicted: dict = field(default_factory=dict)
    scoring: str = "choice"
    correct_norm: int | None = None
    predictions: list = field(default_factory=list)  # one dict per row

    @property
    def accuracy(self) -> float:
        return self.correct / self.rows if self.rows else 0.0

    @property
    def accuracy_norm(self) -> float | None:
        return None if self.correct_norm is None else self.correct_norm / self.rows if self.rows else 0.0

    @property
    def unparseable_share(self) -> float:
        return self.unparseable / self.rows if self.rows else 0.0

    def to_dict(self) -> dict:
        out = {"task": self.task, "scoring": self.scoring, "rows": self.rows, "acc": self.accuracy,
               "acc_stderr": standard_error(self.accuracy, self.rows)}
        if self.correct_norm is not None:
            out.update(acc_norm=self.accuracy_norm, acc_norm_stderr=standard_error(self.accuracy_norm, self.rows))
        if self.scoring == "generate":
            out.update(unparseable=self.unparseable, unparseable_share=self.unparseable_share,
                       predicted=self.predicted)
        # "accuracy" and "correct": the names of earlier versions, kept for readers of those files
        return {**out, "accuracy": self.accuracy, "correct": self.correct, "correct_norm": self.correct_norm,
                "predictions": self.predictions}


def standard_error(share: float, rows: int) -> float:
    """The standard error of a mean of ``rows`` 0/1 outcomes with mean ``share``, with the sample
    variance (n − 1), as lm-evaluation-harness reports it: sqrt(p (1 − p) / (n − 1))."""
    return math.sqrt(share * (1 - share) / (rows - 1)) if rows > 1 else 0.0


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate_choices(model, examples, collate, logits, task_name: str, batch_size: int = 32, device="cpu",
                     progress: bool = False) -> EvalResult:
    """Accuracy of an encoder on ``examples``: the highest of ``logits(model, batch)`` (B, C) per
    row, batches made by ``collate`` (both from the model's kind, ``dorafit.train.kinds``)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: _length_key(examples[i]))
    correct = 0
    starts = range(0, len(order), batch_size)
    for start in _progress(starts, progress, f"eval {task_name}"):
        batch = _to(collate([examples[i] for i in order[start:start + batch_size]]), device)
        predictions = logits(model, batch).argmax(-1)  # (B,)
        correct += int((predictions == batch["labels"]).sum())
    model.train(was_training)
    return EvalResult(task_name, len(examples), correct)


def _length_key(example) -> int:
    text = getattr(example, "question", None) or getattr(example, "text", "")
    return len(text) + sum(len(c) for c in getattr(example, "choices", []))


def _first_match_stop(tokenizer, pattern: re.Pattern, prompt_length: int):
    """A transformers stopping criterion that ends a row once its decoded continuation (the
    tokens after ``prompt_length``) contains a match of ``pattern``."""
    from transformers import StoppingCriteria

    class FirstMatch(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, prompt_length:], skip_special_tokens=True)
            return torch.tensor([pattern.search(t) is not None for t in texts], device=input_ids.device)

    return FirstMatch()


def stops_at_first_match(task: Task) -> bool:
    """Whether generation may stop at the first match of the task's answer words: only when no
    answer word lies inside another, so that no later token can make an earlier match."""
    words = task.answer_words
    return not any(a != b and a in b for a in words for b in words)


@torch.no_grad()
def generate_responses(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                       device="cpu", progress: bool = False, desc: str = "generate",
                       stop_pattern: re.Pattern | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without the prompt.
    With ``stop_pattern`` a row stops at the first token after which its continuation matches."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow each prompt directly
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: list[str] = [""] * len(prompts)
    try:
        for start in _progress(range(0, len(order), batch_size), progress, desc):
            ids = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in ids], return_tensors="pt", padding=True)
            enc = _to(dict(enc), device)
            enc.pop("token_type_ids", None)
            prompt_length = enc["input_ids"].shape[1]
            stopping = [_first_match_stop(tokenizer, stop_pattern, prompt_length)] if stop_pattern else None
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, stopping_criteria=stopping)
            new_tokens = out[:, prompt_length:]  # (B, new)
            for i, text in zip(ids, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                responses[i] = text
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return responses


def score_responses(task: Task, responses: list[str], answers: list[str]) -> EvalResult:
    """The paper's scoring: first regex match of the task's answer words vs the gold answer."""
    correct = unparseable = 0
    counts: Counter = Counter()
    predictions = []
    for number, (response, answer) in enumerate(zip(responses, answers), start=1):
        predicted = extract_answer(task, response)
        if predicted is None:
            unparseable += 1
        else:
            counts[predicted] += 1
            correct += int(predicted == answer)
        predictions.append({"row": number, "gold": answer, "pred": predicted, "response": response})
    return EvalResult(task.name, len(answers), correct, unparseable, dict(sorted(counts.items())),
                      scoring="generate", predictions=predictions)


def evaluate_generation(model, tokenizer, task: Task, rows: list[dict], max_new_tokens: int = 32,
                        batch_size: int = 8, device="cpu", progress: bool = False,
                        prompt_template: str = "paper") -> EvalResult:
    """Commonsense accuracy of a causal LM on instruction rows {instruction, input, answer},
    prompted with ``prompt_template`` (the one it was trained with)."""
    prompts = [build_prompt(prompt_template, r["instruction"], r.get("input") or "", tokenizer) for r in rows]
    answers = [str(r.get("answer") or "").strip() for r in rows]
    stop = task.pattern if stops_at_first_match(task) else None
    responses = generate_responses(model, tokenizer, prompts, max_new_tokens, batch_size, device,
                                   progress, desc=f"eval {task.name}", stop_pattern=stop)
    return score_responses(task, responses, answers)
