"""What a model kind means: one object per way a model answers a task.

Everything that depends on how a model answers lives on its kind, so that the trainer, the
evaluator and the commands ask the kind instead of comparing its name:

    kind                      transformers class                   example          loss unit  chance
    causal-lm                 AutoModelForCausalLM                 prompt+response  token      1 / choices
    multiple-choice           AutoModelForMultipleChoice           ChoiceExample    row        1 / choices
    similarity                AutoModel                            ChoiceExample    row        1 / choices
    sequence-classification   AutoModelForSequenceClassification   TextExample      row        1 / labels

Each kind answers: which transformers class to build (``model_class``) and which of its modules
must train in full (``trained_heads``); how rows become training examples (``loss_examples``)
and test examples (``accuracy_examples``); how examples are batched (``collate``); the summed
loss of a batch and its number of loss units (``loss_sum``, ``count_units``); the accuracy on
test examples (``accuracy``, with the scoring an ``EvalSettings`` asks for); the accuracy of a
uniform guess (``chance``); and the tensors of one prompt (``prompt_inputs``).

A causal LM is scored by generation (the DoRA paper's protocol: greedy continuation, first
answer word) or by likelihood (lm-evaluation-harness's: the choice whose text is the most
likely continuation; ``dorafit.eval.loglik``). The encoder kinds pick their best-scored
choice or class; the two scorings are for causal LMs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from dorafit.eval.evaluate import EvalResult, evaluate_choices, evaluate_generation
from dorafit.eval.examples import collate_causal, collate_choices, collate_texts
from dorafit.eval.scoring import count_response_tokens, response_loss_sum, similarity_logits
from dorafit.eval.tasks import Task, parse_instruction
from dorafit.train import data as D

SCORINGS = ("generate", "loglik")


@dataclass
class EvalSettings:
    """How test accuracy is measured: batching, device, and for causal LMs the scoring
    ("generate": the paper's protocol; "loglik": lm-evaluation-harness's), the generation
    length and the prompt template."""

    batch_size: int = 32
    device: object = "cpu"
    progress: bool = False
    max_length: int = 128  # encoders: token limit per text
    max_new_tokens: int = 32  # causal LMs, generation
    prompt_template: str = "paper"  # causal LMs, generation
    scoring: str | None = None  # causal LMs: "generate" (the default) or "loglik"


class ModelKind:
    """The base of the four kinds; see the module docstring for what each method means."""

    name: str = ""
    model_class: str = ""  # the transformers auto class
    generates: bool = False  # scored by generating its answer (accuracy then counts unparseable outputs)
    head_names: tuple[str, ...] = ()  # a task head that trains in full even when the checkpoint has one

    def __repr__(self) -> str:
        return f"<model kind {self.name}>"

    def load(self, path: str, **kwargs):
        """``model_class.from_pretrained(path, output_loading_info=True, **kwargs)``."""
        import transformers

        return getattr(transformers, self.model_class).from_pretrained(path, output_loading_info=True, **kwargs)

    def trained_heads(self, model, fresh: list[str]) -> list[str]:
        """Modules that train in full: the newly initialised ones and this kind's task head."""
        children = dict(model.named_children())
        return list(fresh) + [n for n in self.head_names if n in children and n not in fresh]

    def loss_examples(self, rows: list[dict], path, tokenizer, max_length: int, *, task: Task | None = None,
                      labels: list | None = None, prompt_template: str = "paper",
                      response_format: str = "paper", report: list | None = None) -> tuple[list, list | None]:
        """(examples, labels): rows as the examples this kind computes its loss on (examples cut or
        dropped by ``max_length`` are counted into ``report``: ``dorafit.train.data.LengthReport``)."""
        raise NotImplementedError

    def accuracy_examples(self, rows: list[dict], path, task: Task, labels: list | None = None,
                          scoring: str | None = None) -> list:
        """Rows as the test examples this kind is scored on (with ``scoring``, for a causal LM)."""
        raise NotImplementedError

    def likelihood_rows(self, rows: list[dict], path, task: Task) -> tuple[list, str | None]:
        """(test rows for likelihood scoring, why there are none): a second view of a causal LM's
        test rows beside generation; other kinds have one scoring only."""
        return [], None

    def check_scoring(self, scoring: str | None) -> None:
        """Refuse a scoring this kind does not have (one line naming both)."""
        if scoring is not None:
            raise ValueError(f"scoring {scoring!r} is for causal LMs; a {self.name} model is scored by its own "
                             "choice scores (leave --scoring out)")

    def collate(self, tokenizer, max_length: int, pad_id: int = 0) -> Callable[[list], dict]:
        """The function that batches a list of this kind's examples."""
        raise NotImplementedError

    def loss_sum(self, model, batch: dict) -> torch.Tensor:
        """Summed (not averaged) cross-entropy of a batch, in float32: the trainer divides by the
        units of the whole optimizer step, so the gradient does not depend on how the step is
        split into micro-batches or processes."""
        return F.cross_entropy(self.logits(model, batch), batch["labels"], reduction="sum")

    def count_units(self, batch: dict) -> int:
        """How many loss terms a batch holds (rows, for every kind but causal-lm)."""
        return int(batch["labels"].shape[0])

    def logits(self, model, batch: dict) -> torch.Tensor:
        """Scores (B, C) of every choice (or class) of one batch; padded choices are -inf."""
        raise NotImplementedError

    def accuracy(self, model, tokenizer, task: Task, examples: list, settings: EvalSettings) -> EvalResult:
        """Accuracy on test examples: the best-scored choice or class of every row."""
        self.check_scoring(settings.scoring)
        collate = self.collate(tokenizer, settings.max_length)
        return evaluate_choices(model, examples, collate, self.logits, task.name, settings.batch_size,
                                settings.device, settings.progress)

    def chance(self, examples: list, labels: list | None) -> float | None:
        """The mean over the test examples of 1 / (number of choices)."""
        if not examples:
            return None
        return sum(1 / len(ex.choices) for ex in examples) / len(examples)

    def prompt_inputs(self, tokenizer, prompt: str) -> dict:
        """The model inputs of one text prompt (a batch of one)."""
        return dict(tokenizer(prompt, return_tensors="pt"))


class CausalLM(ModelKind):
    """A decoder LM tuned on prompt + response, loss on the response tokens (one unit per token)."""

    name = "causal-lm"
    model_class = "AutoModelForCausalLM"
    generates = True

    def load(self, path: str, **kwargs):
        # In training the key/value cache is pure cost (built on every forward, never read);
        # ``generate`` turns it on for itself.
        model, info = super().load(path, **kwargs)
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        return model, info

    def loss_examples(self, rows, path, tokenizer, max_length, *, task=None, labels=None,
                      prompt_template="paper", response_format="paper", report=None):
        pairs = D.to_instruction_pairs(rows, D.detect_format(rows, path), path, prompt_template, tokenizer,
                                       response_format, task)
        return D.tokenize_instruction_pairs(pairs, tokenizer, max_length, path, report), None

    def check_scoring(self, scoring):
        if scoring is not None and scoring not in SCORINGS:
            raise ValueError(f"unknown scoring {scoring!r}; use one of {', '.join(SCORINGS)}")

    def accuracy_examples(self, rows, path, task, labels=None, scoring=None):
        # Generation prompts the rows themselves (each answer must be among its row's choices);
        # likelihood scoring reads each as lm-eval's context and continuations (a row that is no
        # multiple choice is an error naming it).
        self.check_scoring(scoring)
        if scoring == "loglik":
            from dorafit.eval.loglik import choice_rows

            return choice_rows(rows, path, task)
        D.check_test_answers(rows, path, task)
        return rows

    def likelihood_rows(self, rows, path, task):
        try:
            return self.accuracy_examples(rows, path, task, scoring="loglik"), None
        except ValueError as err:  # e.g. free-form rows: generation scores them, likelihood cannot
            return [], str(err)

    def collate(self, tokenizer, max_length, pad_id=0):
        return partial(collate_causal, pad_id=pad_id)

    def loss_sum(self, model, batch):
        return response_loss_sum(model, batch)

    def count_units(self, batch):
        return count_response_tokens(batch)

    def accuracy(self, model, tokenizer, task, examples, settings):
        self.check_scoring(settings.scoring)
        if settings.scoring == "loglik":
            from dorafit.eval.loglik import evaluate_loglik

            return evaluate_loglik(model, tokenizer, task, examples, settings.batch_size, settings.device,
                                   progress=settings.progress)
        return evaluate_generation(model, tokenizer, task, examples, settings.max_new_tokens, settings.batch_size,
                                   settings.device, progress=settings.progress,
                                   prompt_template=settings.prompt_template)

    def chance(self, examples, labels):
        # None where a row does not say (an instruction without an "Answer format:" line).
        if not examples:
            return None
        if not isinstance(examples[0], dict):  # likelihood rows
            return sum(1 / len(row.continuations) for row in examples) / len(examples)
        try:
            counts = [len(parse_instruction(row["instruction"])[1]) for row in examples]
        except ValueError:
            return None
        return sum(1 / n for n in counts) / len(counts)


class _ChoiceKind(ModelKind):
    """An encoder scoring each choice of a question (commonsense or multiple-choice rows)."""

    layout = "pair"  # how collate_choices lays out question and choices

    def loss_examples(self, rows, path, tokenizer, max_length, *, task=None, labels=None,
                      prompt_template="paper", response_format="paper", report=None):
        data_format = D.detect_format(rows, path)
        examples = D.to_choice_examples(rows, data_format, path, task if data_format == "commonsense" else None)
        D.check_encoder_lengths(examples, tokenizer, max_length, path)
        return examples, None

    def accuracy_examples(self, rows, path, task, labels=None, scoring=None):
        self.check_scoring(scoring)
        return D.to_choice_examples(rows, D.detect_format(rows, path), path, task)

    def collate(self, tokenizer, max_length, pad_id=0):
        return partial(collate_choices, tokenizer=tokenizer, max_length=max_length, layout=self.layout)


class MultipleChoice(_ChoiceKind):
    """A ``...ForMultipleChoice`` cross-encoder: each (question, choice) pair is one sequence."""

    name = "multiple-choice"
    model_class = "AutoModelForMultipleChoice"
    head_names = ("classifier", "score", "qa_outputs")

    def logits(self, model, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = model(**inputs).logits.float()  # (B, C)
        return logits.masked_fill(~batch["choice_mask"], float("-inf"))

    def prompt_inputs(self, tokenizer, prompt):
        return {k: v.unsqueeze(1) for k, v in super().prompt_inputs(tokenizer, prompt).items()}  # (B, C=1, T)


class Similarity(_ChoiceKind):
    """An embedding model comparing question and choice embeddings; no new parameters, so it
    starts from its zero-shot ability (``dorafit.eval.scoring.similarity_logits``)."""

    name = "similarity"
    model_class = "AutoModel"
    layout = "separate"

    def logits(self, model, batch):
        return similarity_logits(model, batch).masked_fill(~batch["choice_mask"], float("-inf"))


class SequenceClassification(ModelKind):
    """A text (or pair) classifier over the labels found in the training rows."""

    name = "sequence-classification"
    model_class = "AutoModelForSequenceClassification"
    head_names = ("classifier", "score", "qa_outputs")

    def loss_examples(self, rows, path, tokenizer, max_length, *, task=None, labels=None,
                      prompt_template="paper", response_format="paper", report=None):
        examples, labels = D.to_text_examples(rows, path, labels)
        D.check_encoder_lengths(examples, tokenizer, max_length, path)
        return examples, labels

    def accuracy_examples(self, rows, path, task, labels=None, scoring=None):
        self.check_scoring(scoring)
        return D.to_text_examples(rows, path, labels)[0]

    def collate(self, tokenizer, max_length, pad_id=0):
        return partial(collate_texts, tokenizer=tokenizer, max_length=max_length)

    def logits(self, model, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return model(**inputs).logits.float()  # (B, num_labels)

    def chance(self, examples, labels):
        return 1 / len(labels) if examples and labels else None


CAUSAL_LM = CausalLM()
MULTIPLE_CHOICE = MultipleChoice()
SIMILARITY = Similarity()
SEQUENCE_CLASSIFICATION = SequenceClassification()
KINDS: dict[str, ModelKind] = {k.name: k for k in (CAUSAL_LM, MULTIPLE_CHOICE, SIMILARITY, SEQUENCE_CLASSIFICATION)}


def get_kind(kind: str | ModelKind) -> ModelKind:
    """The kind object of a name (a kind object is returned as it is)."""
    if isinstance(kind, ModelKind):
        return kind
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}") from None
