"""Examples and batches: what a data row becomes before a model sees it, for training and evaluation.

- ``ChoiceExample``: a question, its candidate answers and the right one's index (the encoder
  kinds multiple-choice and similarity; commonsense rows are parsed into this);
- ``TextExample``: a text (or pair) with a class label (sequence-classification);
- for a causal LM, a prompt followed by the response, tokenized with the prompt positions
  labelled ``IGNORE_INDEX`` (loss on the response only). ``build_prompt`` is the one place a
  prompt is made, for training and generation alike, in one of ``PROMPT_TEMPLATES``: "paper"
  (the LLM-Adapters template of the DoRA paper, ``format_prompt``), "chat" (the model's own
  chat template: the instruction as the user turn, the response as the assistant turn) or
  "plain" (the instruction as it is, the response right after it: rows already written as
  context and continuation, such as lm-evaluation-harness's); "auto" is chat for a tokenizer
  with a chat template, else paper (``resolve_template``).
  ``build_response`` makes the response a row is trained on, in one of ``RESPONSE_FORMATS``:
  "paper" (the row's own output, "the correct answer is answer1") or "choice" (the chosen
  choice's text before its answer word, "the correct answer is casting (answer1)").

``collate_*`` build the tensors (a model's kind picks which: ``dorafit.train.kinds``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The LLM-Adapters prompt, used by the DoRA paper's commonsense recipe for training and
# evaluation alike.
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
IGNORE_INDEX = -100
PROMPT_TEMPLATES = ("auto", "paper", "chat", "plain")
RESPONSE_FORMATS = ("paper", "choice")


def format_prompt(instruction: str, input: str = "") -> str:
    """The paper's prompt for one row, ending right where the response starts."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT.format(instruction=instruction)


def format_chat_prompt(tokenizer, instruction: str, input: str = "") -> str:
    """The tokenizer's chat template with the instruction (and input) as the one user turn,
    ending with the assistant header, where the response starts (``add_generation_prompt``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"prompt template 'chat' needs a tokenizer with a chat template; "
                         f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none (use 'paper')")
    user = f"{instruction}\n\n{input}" if input and input.strip() else instruction
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


def build_response(response_format: str, instruction: str, output: str, answer: str) -> str:
    """The training response of one row in ``response_format``.

    "choice" writes the text of the chosen choice before its answer word: a small model that
    cannot yet tie a bare label to what it knows about the choices can name the choice it
    means and then copy the label that stands before that text in the prompt. Scoring is the
    same first match of the answer words as for "paper". Rows without choice markers (BoolQ's
    true / false, whose answer word is itself the answer) and rows that are not multiple choice
    keep their output.
    """
    from dorafit.eval.tasks import parse_instruction

    if response_format == "paper":
        return output
    if response_format != "choice":
        raise ValueError(f"unknown response format {response_format!r}; use one of {RESPONSE_FORMATS}")
    try:
        _, choices, words = parse_instruction(instruction)
    except ValueError:
        return output  # not a multiple-choice row (no "Answer format:" line): nothing to name
    if choices == words:
        return output
    if answer not in words:
        raise ValueError(f"answer {answer!r} is not one of the answer words {'/'.join(words)}")
    return f"the correct answer is {choices[words.index(answer)]} ({answer})"


def resolve_template(template: str, tokenizer) -> str:
    """The template a run uses: "auto" becomes "chat" when the tokenizer has a chat template
    (an instruction-tuned model is prompted as it was tuned), else "paper"."""
    if template != "auto":
        return template
    return "chat" if getattr(tokenizer, "chat_template", None) else "paper"


def build_prompt(template: str, instruction: str, input: str = "", tokenizer=None) -> str:
    """The prompt of one row in ``template`` ("paper", "chat" or "plain"), ending where the response starts."""
    if template == "paper":
        return format_prompt(instruction, input)
    if template == "plain":
        return f"{instruction}\n\n{input}" if input and input.strip() else instruction
    if template == "chat":
        return format_chat_prompt(tokenizer, instruction, input)
    raise ValueError(f"unknown prompt template {template!r}; use one of {PROMPT_TEMPLATES}")


@dataclass
class ChoiceExample:
    """A question with its candidate answers and the index of the right one."""

    question: str
    choices: list[str]
    label: int


@dataclass
class TextExample:
    """A text (or text pair) with a class label, for sequence classification."""

    text: str
    text_pair: str | None
    label: int


def collate_causal(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized examples into (B, T) tensors."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_choices(examples: list[ChoiceExample], tokenizer, max_length: int,
                    layout: str = "pair") -> dict[str, torch.Tensor]:
    """Question/choice batches; rows with fewer choices are padded with empty choices.

    ``choice_mask`` (B, C) marks the real choices so that padded ones can be left out of the
    softmax. With ``layout="pair"`` (a cross-encoder such as ``...ForMultipleChoice``) each
    (question, choice) pair is one sequence: ``input_ids`` (B, C, T). With
    ``layout="separate"`` (an embedding model) the two texts are encoded separately:
    ``question_*`` (B, Tq) and ``choice_*`` (B*C, Tc).
    """
    n_choices = max(len(e.choices) for e in examples)
    mask = torch.zeros((len(examples), n_choices), dtype=torch.bool)  # (B, C)
    questions, choices = [], []
    for i, e in enumerate(examples):
        mask[i, : len(e.choices)] = True
        questions.append(e.question)
        choices += e.choices + [""] * (n_choices - len(e.choices))
    batch = {"choice_mask": mask, "labels": torch.tensor([e.label for e in examples])}
    if layout == "pair":
        firsts = [q for q in questions for _ in range(n_choices)]
        enc = tokenizer(firsts, choices, padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        batch.update({k: v.view(len(examples), n_choices, -1) for k, v in enc.items()})  # (B, C, T)
    elif layout == "separate":
        enc_q = tokenizer(questions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc_c = tokenizer(choices, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch.update({f"question_{k}": v for k, v in enc_q.items()})  # (B, Tq)
        batch.update({f"choice_{k}": v for k, v in enc_c.items()})  # (B*C, Tc)
    else:
        raise ValueError(f"unknown layout {layout!r}; use 'pair' or 'separate'")
    return batch


def collate_texts(examples: list[TextExample], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Texts (or text pairs) as (B, T) tensors with their labels."""
    pairs = [e.text_pair for e in examples]
    enc = tokenizer([e.text for e in examples], pairs if any(p is not None for p in pairs) else None,
                    padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = dict(enc)
    batch["labels"] = torch.tensor([e.label for e in examples])
    return batch
