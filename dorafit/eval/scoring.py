"""The tensor math of scores and losses, for training and evaluation (``dorafit.train.kinds`` picks
which applies to a model kind):

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

import inspect

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


# Texts are encoded in groups of similar length of at most this many tokens (padding
# included): a batch padded to its longest question would spend most of its compute on pad
# tokens. Each row's embedding does not depend on the grouping.
TOKENS_PER_FORWARD = 1024


def _length_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices sorted by length, cut into groups whose padded size stays within budget."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups, current = [], []
    for i in order:
        # Sorted ascending, so the newest row is the longest of its group.
        if current and (len(current) + 1) * lengths[i] > budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _embed(model, prefix: str, batch: dict) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings (N, H) of the texts under ``prefix``."""
    names = ("input_ids", "attention_mask", "token_type_ids")
    inputs = {name: batch[prefix + name] for name in names if prefix + name in batch}
    mask = inputs["attention_mask"]  # (N, T)
    lengths = mask.sum(1).clamp_min(1).tolist()
    pieces, rows = [], []
    for group in _length_groups(lengths, TOKENS_PER_FORWARD):
        index = torch.tensor(group, device=mask.device)
        width = max(lengths[i] for i in group)
        part = {k: v.index_select(0, index)[:, :width] for k, v in inputs.items()}  # (n, width)
        hidden = model(**part).last_hidden_state  # (n, width, H)
        pieces.append(mean_pool(hidden.float(), part["attention_mask"]))
        rows.append(index)
    pooled = torch.cat(pieces)[torch.argsort(torch.cat(rows))]  # back to the input order: (N, H)
    return F.normalize(pooled, dim=-1)


def similarity_logits(model, batch: dict) -> torch.Tensor:
    """``SIMILARITY_SCALE * cos(question, choice)`` for every choice: (B, C)."""
    questions = _embed(model, "question_", batch)  # (B, H)
    choices = _embed(model, "choice_", batch)  # (B*C, H)
    choices = choices.view(questions.shape[0], -1, questions.shape[-1])  # (B, C, H)
    return SIMILARITY_SCALE * torch.einsum("bh,bch->bc", questions, choices)  # (B, C)


def count_response_tokens(batch: dict) -> int:
    """The loss units of a causal-LM batch: its labelled (response) tokens that some position predicts."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def response_loss_sum(model, batch: dict) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled (response) tokens.

    Rows are right-padded, so every labelled token lies at or after the batch's earliest
    labelled position: the logits are computed for that tail of the sequence only
    (``logits_to_keep``). The prompt tokens before it still run through the model, but not
    through the output layer, which on a small LLM with a large vocabulary is a fifth of the
    forward (SmolLM2: 28M of 134M multiply-adds per token) and of its backward.
    """
    labels = batch["labels"]  # (B, T)
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
    # Position t predicts token t+1: logits from the position before the first labelled token.
    start = int(labelled[0]) if len(labelled) else labels.shape[1] - 1
    keep = labels.shape[1] - start  # positions start..T-1
    kwargs = {"logits_to_keep": keep} if accepts_logits_to_keep(model) else {}
    # No key/value cache: nothing is generated, and filling it copies every layer's keys and
    # values (which attention would otherwise keep as views of the projections' outputs).
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   **kwargs).logits
    logits = logits[:, -keep:-1].float()  # (B, T-1-start, V)
    targets = labels[:, start + 1:]  # (B, T-1-start)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward (under a DDP wrapper too) takes ``logits_to_keep``."""
    inner = getattr(model, "module", model)
    return "logits_to_keep" in inspect.signature(inner.forward).parameters
