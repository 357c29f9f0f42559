"""Likelihood scoring of multiple-choice rows, as lm-evaluation-harness (0.4) scores them.

A row is a context and C choices. Each choice k is a continuation x_k of its context c_k, scored
by its summed log-probability under the model, zero-shot:

    ll_k      = Σ_t log p(x_k,t | c_k, x_k,<t)            (over the continuation's tokens)
    acc       = [argmax_k ll_k == gold]
    acc_norm  = [argmax_k ll_k / len(choice_k) == gold]    (len: characters of the choice's text,
                                                           as lm-eval's code divides; its bytes for ASCII)

Argmax ties go to the first choice (numpy's argmax, as lm-eval). Contexts and continuations per
task follow lm-eval's task YAMLs, parsed from the LLM-Adapters rows (``TASK_FORMATS``):

    ARC-Easy, ARC-Challenge   "Question: {question}\\nAnswer:"   " {choice}"
    piqa                      "Question: {goal}\\nAnswer:"       " {solution}"
    openbookqa                "{question_stem}"                  " {choice}"
    social_i_qa               "Q: {context} {question}\\nA:"     " {answer}"
    boolq                     "Question: {question}?\\nAnswer:"  " no" / " yes"   (the rows hold no passage,
                              so lm-eval's "{passage}\\n" line is left out)
    winogrande                "{sentence up to _}{option}"       " {sentence after _}"   (partial scoring:
                              one context per option, one shared continuation; acc_norm divides by
                              the context's length, as lm-eval's code does for it)
    hellaswag                 "{activity: context}"              " {ending}"   (lm-eval's bracket clean-up)

Tokenization follows lm-eval's HFLM: trailing spaces of the context move to the continuation;
the continuation's tokens are those of ``encode(context + continuation)`` after the first
``len(encode(context))``; the model reads ``(context + continuation)[:-1]``, cut from the left
to the model's length.

Fast path (``score_rows``): the choices of a row share their context's tokens, so the shared
prefix runs once per row (batched over rows, right-padded, its keys and values cached) and only
the choices' own tokens run after it (all choices of a batch in one forward, left-padded so
that every continuation ends at the last position and only those positions reach the output
layer). ``score_rows_reference`` runs each (context, continuation) alone, the plain way; a test
holds the two equal.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass

import torch

from dorafit.eval.evaluate import EvalResult, _progress
from dorafit.eval.tasks import Task, parse_instruction


class LoglikError(ValueError):
    """A row that likelihood scoring cannot read; the message names the file and row."""


@dataclass
class ChoiceRow:
    """One row as lm-eval scores it: per choice a context and a continuation."""

    row: int  # 1-based position in its file
    contexts: list[str]  # (C,) the same string for every choice except in partial scoring
    continuations: list[str]  # (C,)
    norm_lengths: list[int]  # (C,) what acc_norm divides by
    gold: int


# ---------------------------------------------------------------------------- task formats


def _question_answer(question: str, choices: list[str]) -> tuple[list[str], list[str], list[str]]:
    context = f"Question: {question}\nAnswer:"
    return [context] * len(choices), [f" {c}" for c in choices], choices


def _bare(question: str, choices: list[str]):
    return [question] * len(choices), [f" {c}" for c in choices], choices


def _q_a(question: str, choices: list[str]):
    context = f"Q: {question}\nA:"
    return [context] * len(choices), [f" {c}" for c in choices], choices


def _boolq(question: str, choices: list[str]):
    # The rows answer true/false; lm-eval's choices are no/yes (see BOOLQ_GOLD).
    if choices != ["true", "false"]:
        raise ValueError(f"BoolQ rows answer true/false, this one {'/'.join(choices)}")
    context = f"Question: {question.rstrip().rstrip('?')}?\nAnswer:"
    return [context, context], [" no", " yes"], ["no", "yes"]


def _winogrande(sentence: str, options: list[str]):
    if sentence.count("_") < 1:
        raise ValueError("the sentence has no blank '_' to put an option into")
    blank = sentence.index("_")
    contexts = [sentence[:blank] + option for option in options]
    return contexts, [" " + sentence[blank + 1:].strip()] * len(options), contexts


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(question: str, choices: list[str]):
    clean = [_hellaswag_clean(c) for c in choices]
    return [_hellaswag_clean(question)] * len(choices), [f" {c}" for c in clean], clean


TASK_FORMATS = {
    "ARC-Easy": _question_answer,
    "ARC-Challenge": _question_answer,
    "piqa": _question_answer,
    "openbookqa": _bare,
    "social_i_qa": _q_a,
    "boolq": _boolq,
    "winogrande": _winogrande,
    "hellaswag": _hellaswag,
}


# BoolQ: the rows' answer words (true, false) as the index of lm-eval's choices (no, yes).
BOOLQ_GOLD = (1, 0)


def parse_choice_row(row: dict) -> tuple[str, list[str], int]:
    """(question, choices, index of the right choice) of an LLM-Adapters instruction row (its
    choices parsed from the text, ``parse_instruction``) or a {question, choices, label} row;
    ValueError when the row is no multiple choice."""
    if "instruction" in row:
        question, choices, words = parse_instruction(str(row["instruction"]))
        answer = str(row.get("answer") or "").strip()
        if answer not in words:
            raise ValueError(f"answer {answer!r} is not one of its choices {'/'.join(words)}")
        gold = words.index(answer)
    elif {"question", "choices", "label"} <= set(row):
        question, choices, gold = str(row["question"]), list(row["choices"]), row["label"]
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise ValueError(f"label {gold!r} is not an index into its {len(choices)} choices")
    else:
        raise ValueError(f"keys {sorted(row)}: neither an instruction row nor {{question, choices, label}}")
    if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError("fewer than two choices, or an empty one")
    return question, choices, gold


def choice_rows(rows: list[dict], path, task: Task) -> list[ChoiceRow]:
    """Rows (LLM-Adapters instruction rows, or {question, choices, label}) as lm-eval's requests;
    a row that cannot be read as multiple choice is a LoglikError naming the file and row."""
    fmt = TASK_FORMATS.get(task.name, _question_answer)
    out = []
    for number, row in enumerate(rows, start=1):
        try:
            question, choices, gold = parse_choice_row(row)
            contexts, continuations, normed = fmt(question, choices)
        except ValueError as err:
            raise LoglikError(f"{path}: row {number}: cannot be scored by likelihood as {task.name} multiple "
                              f"choice: {err}") from None
        if fmt is _boolq:
            gold = BOOLQ_GOLD[gold]
        out.append(ChoiceRow(number, contexts, continuations, [len(t) for t in normed], gold))
    return out


# ---------------------------------------------------------------------------- tokens


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's HFLM splits them: trailing spaces of
    the context go to the continuation, whose tokens are the whole text's after the context's."""
    if not context:  # lm-eval conditions an empty context on the BOS (else EOS) token
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


@dataclass
class _Sequence:
    """One choice as tokens: the model reads ``tokens[:-1]``; the last ``n_cont`` are scored."""

    tokens: list[int]
    n_cont: int


def _sequences(tokenizer, row: ChoiceRow, max_length: int) -> list[_Sequence]:
    out = []
    for context, continuation in zip(row.contexts, row.continuations):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise LoglikError(f"row {row.row}: the continuation {continuation!r} has no tokens of its own")
        out.append(_Sequence((ctx + cont)[-(max_length + 1):], min(len(cont), max_length)))
    return out


def _shared_prefix(seqs: list[_Sequence]) -> int:
    """Tokens every choice reads alike before the first scored position: the prefix run once."""
    first_scored = min(len(s.tokens) - s.n_cont - 1 for s in seqs)  # the earliest position whose logits count
    inputs = [s.tokens[:-1] for s in seqs]
    shared = 0
    while shared < first_scored and all(len(x) > shared and x[shared] == inputs[0][shared] for x in inputs):
        shared += 1
    return shared


def model_max_length(model, default: int = 2048) -> int:
    """The longest sequence the model reads, from its config (as lm-eval looks it up)."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


# ---------------------------------------------------------------------------- scoring


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _cache_argument(model) -> str | None:
    """The forward's name for a key/value cache: ``cache`` (transformers >= 5.25), else
    ``past_key_values``; None for a model that takes neither."""
    return next((name for name in ("cache", "past_key_values") if _accepts(model, name)), None)


def _continuation_logprob(logits: torch.Tensor, targets: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """Σ log p(target) over positions: logits (N, K, V), targets (N, K) with -1 where unscored -> (N,).
    log p = logit − logsumexp(logits), a few rows at a time (no second (N, K, V) tensor)."""
    out = []
    for start in range(0, logits.shape[0], rows):
        part, wanted = logits[start:start + rows].float(), targets[start:start + rows]  # (n, K, V), (n, K)
        picked = part.gather(-1, wanted.clamp_min(0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(part, -1)
        out.append(picked.masked_fill(wanted < 0, 0.0).sum(-1))
    return torch.cat(out)


@torch.no_grad()
def _score_alone(model, seq: _Sequence, device) -> float:
    """The reference: one choice in one forward, every position's logits."""
    ids = torch.tensor([seq.tokens[:-1]], device=device)  # (1, T)
    logits = model(input_ids=ids, use_cache=False).logits[:, -seq.n_cont:]  # (1, n_cont, V)
    targets = torch.tensor([seq.tokens[-seq.n_cont:]], device=device)
    return float(_continuation_logprob(logits, targets)[0])


def score_rows_reference(model, tokenizer, rows: list[ChoiceRow], device="cpu") -> list[list[float]]:
    """ll_k of every choice of every row, each (context, continuation) run alone (slow, plain)."""
    was_training = model.training
    model.eval()
    length = model_max_length(model)
    try:
        return [[_score_alone(model, s, device) for s in _sequences(tokenizer, row, length)] for row in rows]
    finally:
        model.train(was_training)


@torch.no_grad()
def _score_batch(model, batch: list[list[_Sequence]], pad_id: int, device) -> list[list[float]]:
    """ll_k of the choices of several rows: shared prefixes in one forward (cached), then every
    choice's remaining tokens in one forward over that cache."""
    prefixes = [_shared_prefix(seqs) for seqs in batch]  # (B,) every one >= 1
    width = max(prefixes)
    prefix_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, P) right-padded
    prefix_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, (seqs, p) in enumerate(zip(batch, prefixes)):
        prefix_ids[b, :p] = torch.tensor(seqs[0].tokens[:p])
        prefix_mask[b, :p] = 1
    keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device), use_cache=True, **keep)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    # Every choice continues its row's cached prefix; left-padded, so that all continuations end
    # at the last position and only the last ``scored`` positions need logits.
    choices = [(b, s) for b, seqs in enumerate(batch) for s in seqs]
    owner = [b for b, _ in choices]
    n = len(choices)
    span = max(len(s.tokens) - 1 - prefixes[b] for b, s in choices)
    scored = max(s.n_cont for _, s in choices)
    ids = torch.full((n, span), pad_id, dtype=torch.long)  # (N, S)
    mask = torch.zeros((n, width + span), dtype=torch.long)  # (N, P + S): the prefix's keys, then the suffix's
    positions = torch.zeros((n, span), dtype=torch.long)
    targets = torch.full((n, scored), -1, dtype=torch.long)  # (N, K): the scored tokens, right-aligned
    for i, (b, s) in enumerate(choices):
        suffix = s.tokens[prefixes[b]:-1]
        pad = span - len(suffix)
        ids[i, pad:] = torch.tensor(suffix)
        mask[i, :width] = prefix_mask[b]
        mask[i, width + pad:] = 1
        positions[i, pad:] = prefixes[b] + torch.arange(len(suffix))
        targets[i, scored - s.n_cont:] = torch.tensor(s.tokens[-s.n_cont:])
    cache.batch_select_indices(torch.tensor(owner, device=device))
    keep = {"logits_to_keep": scored} if _accepts(model, "logits_to_keep") else {}
    keep[_cache_argument(model)] = cache
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   use_cache=True, **keep).logits[:, -scored:]  # (N, K, V)
    lls = _continuation_logprob(logits, targets.to(device)).tolist()
    out, start = [], 0
    for seqs in batch:
        out.append(lls[start:start + len(seqs)])
        start += len(seqs)
    return out


# At most this many scored positions per forward (choices x the longest continuation): their
# logits are a (positions, vocabulary) float tensor, 200 MB at SmolLM2's 49,152 tokens.
SCORED_PER_FORWARD = 1024


def _batches(order: list[int], seqs: list[list[_Sequence]], batch_size: int) -> list[list[int]]:
    """Rows in order, cut into batches of at most ``batch_size`` rows and SCORED_PER_FORWARD
    scored positions (a row alone may exceed it)."""
    batches, current, choices, longest = [], [], 0, 0
    for i in order:
        n, k = len(seqs[i]), max(s.n_cont for s in seqs[i])
        if current and (len(current) == batch_size or (choices + n) * max(longest, k) > SCORED_PER_FORWARD):
            batches.append(current)
            current, choices, longest = [], 0, 0
        current.append(i)
        choices, longest = choices + n, max(longest, k)
    return batches + ([current] if current else [])


def score_rows(model, tokenizer, rows: list[ChoiceRow], batch_size: int = 16, device="cpu",
               progress: bool = False, desc: str = "loglik") -> list[list[float]]:
    """ll_k of every choice of every row (the fast path of the module docstring); rows are
    batched in order of length, at most ``batch_size`` rows (all their choices) and
    SCORED_PER_FORWARD scored positions per forward."""
    was_training = model.training
    model.eval()
    length = model_max_length(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = [_sequences(tokenizer, row, length) for row in rows]
    cached = _cache_argument(model) is not None
    lls: list = [None] * len(rows)
    alone = [i for i, s in enumerate(seqs) if not cached or _shared_prefix(s) == 0]
    together = [i for i in range(len(rows)) if i not in set(alone)]
    together.sort(key=lambda i: max(len(s.tokens) for s in seqs[i]))
    try:
        for i in alone:  # nothing to share (or no cache to share it with): each choice alone
            lls[i] = [_score_alone(model, s, device) for s in seqs[i]]
        for ids in _progress(_batches(together, seqs, batch_size), progress, desc):
            for i, scores in zip(ids, _score_batch(model, [seqs[i] for i in ids], pad_id, device)):
                lls[i] = scores
    finally:
        model.train(was_training)
    return lls


# ---------------------------------------------------------------------------- accuracy


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))  # the first of equal maxima


def loglik_result(task_name: str, rows: list[ChoiceRow], lls: list[list[float]]) -> EvalResult:
    """acc and acc_norm of scored rows, with every row's prediction."""
    predictions, correct, correct_norm = [], 0, 0
    for row, ll in zip(rows, lls):
        pred = _argmax(ll)
        pred_norm = _argmax([v / max(n, 1) for v, n in zip(ll, row.norm_lengths)])
        correct += pred == row.gold
        correct_norm += pred_norm == row.gold
        predictions.append({"row": row.row, "gold": row.gold, "pred": pred, "pred_norm": pred_norm,
                            "loglik": [round(v, 6) for v in ll]})
    return EvalResult(task_name, len(rows), correct, scoring="loglik", correct_norm=correct_norm,
                      predictions=predictions)


def evaluate_loglik(model, tokenizer, task: Task, rows: list[ChoiceRow], batch_size: int = 16, device="cpu",
                    progress: bool = False) -> EvalResult:
    """lm-eval's zero-shot acc and acc_norm of a causal LM on ``rows`` (see ``choice_rows``)."""
    lls = score_rows(model, tokenizer, rows, batch_size, device, progress, desc=f"loglik {task.name}")
    if any(not all(math.isfinite(v) for v in ll) for ll in lls):
        raise ValueError(f"{task.name}: the model gave a non-finite log-likelihood")
    return loglik_result(task.name, rows, lls)
