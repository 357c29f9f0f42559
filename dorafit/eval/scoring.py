"""Model outputs turned into per-choice scores and summed losses, for training and evaluation.

Four ways a model answers (``kind``):

- ``causal-lm``: next-token logits (B, T, V); the loss is the summed cross-entropy over the
  response tokens (labels != -100), one unit per token.
- ``multiple-choice``: a ``...ForMultipleChoice`` cross-encoder scores each (question, choice)
  pair: logits (B, C).
- ``similarity``: an encoder embeds question and choices separately (mean pooling over the
  attention mask, then L2 normalisation, as sentence-transformers models are trained) and the
  score is ``SIMILARITY_SCALE * cos(q, c)``: logits (B, C). No new parameters, so an
  embedding model starts from its zero-shot ability.
- ``sequence-classification``: logits (B, num_labels).

For the choice kinds the loss is the summed cross-entropy over the rows, one unit per row;
padded choices (``choice_mask`` False) get -inf before the softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Temperature of the cosine scores: the value sentence-transformers trains its
# MultipleNegativesRankingLoss with, so the softmax is neither flat nor saturated.
SIMILARITY_SCALE = 20.0


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where mask is 1: (B, T, H), (B, T) -> (B, H)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _embed(model, prefix: str, batch: dict) -> torch.Tensor:
    inputs = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
    hidden = model(**inputs).last_hidden_state  # (N, T, H)
    return F.normalize(mean_pool(hidden.float(), inputs["attention_mask"]), dim=-1)  # (N, H)


def choice_logits(model, batch: dict, kind: str) -> torch.Tensor:
    """Scores (B, C) of every choice (or class) for one batch; padded choices are -inf."""
    if kind == "multiple-choice":
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = model(**inputs).logits.float()  # (B, C)
    elif kind == "similarity":
        questions = _embed(model, "question_", batch)  # (B, H)
        choices = _embed(model, "choice_", batch)  # (B*C, H)
        choices = choices.view(questions.shape[0], -1, questions.shape[-1])  # (B, C, H)
        logits = SIMILARITY_SCALE * torch.einsum("bh,bch->bc", questions, choices)  # (B, C)
    elif kind == "sequence-classification":
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return model(**inputs).logits.float()  # (B, num_labels)
    else:
        raise ValueError(f"choice_logits does not handle kind {kind!r}")
    return logits.masked_fill(~batch["choice_mask"], float("-inf"))


def count_units(batch: dict, kind: str) -> int:
    """How many loss terms a batch holds: response tokens (causal LM) or rows."""
    if kind == "causal-lm":
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return int(batch["labels"].shape[0])


def loss_sum(model, batch: dict, kind: str) -> torch.Tensor:
    """Summed (not averaged) cross-entropy of a batch, in float32.

    Summing lets the trainer divide by the number of units of the whole optimizer step, so the
    gradient does not depend on how that step is split into micro-batches or processes.
    """
    if kind == "causal-lm":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
        targets = batch["labels"][:, 1:]  # (B, T-1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    logits = choice_logits(model, batch, kind)
    return F.cross_entropy(logits, batch["labels"], reduction="sum")
