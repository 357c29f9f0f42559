"""Likelihood scoring as lm-evaluation-harness does it (dorafit.eval.loglik).

The formats are checked against lm-eval 0.4's task files written out by hand; the fast path
(shared prefix cached, all choices of a batch in one forward) against the plain one (each
choice alone); the agreement with lm-eval itself is benchmarks/lmeval_check.py's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dorafit.eval import loglik as L
from dorafit.eval.tasks import get_task

DATA = Path(__file__).resolve().parents[2] / "dorafit" / "data"


def first_row(folder: str) -> dict:
    return json.loads((DATA / folder / "test.json").read_text())[0]


def test_arc_piqa_obqa_siqa_contexts_and_continuations_are_lm_evals():
    arc = L.choice_rows([first_row("ARC-Easy")], "t.json", get_task("ARC-Easy"))[0]
    question = ("In the first step of making some ceramic cups, the following manufacturing process is used. "
                "Liquid clay is poured into a mold, allowed to solidify, then removed from the mold. What is the "
                "name of this manufacturing process?")
    assert arc.contexts == [f"Question: {question}\nAnswer:"] * 4  # arc_easy.yaml's doc_to_text
    assert arc.continuations == [" casting", " milling", " finishing", " refining"]  # " " + choices.text
    assert arc.norm_lengths == [7, 7, 9, 8] and arc.gold == 0 and arc.row == 1
    obqa = L.choice_rows([first_row("openbookqa")], "t.json", get_task("obqa"))[0]
    assert not obqa.contexts[0].startswith("Question:") and "\n" not in obqa.contexts[0]  # question_stem alone
    siqa = L.choice_rows([first_row("social_i_qa")], "t.json", get_task("siqa"))[0]
    assert siqa.contexts[0].startswith("Q: ") and siqa.contexts[0].endswith("\nA:") and len(siqa.continuations) == 3
    piqa = L.choice_rows([first_row("piqa")], "t.json", get_task("piqa"))[0]
    assert piqa.contexts[0].startswith("Question: ") and piqa.contexts[0].endswith("\nAnswer:")
    assert all(c.startswith(" ") and not c.startswith("  ") for c in piqa.continuations)


def test_boolq_answers_no_or_yes_without_a_passage():
    rows = [{"instruction": "Please answer the following question with true or false, question: is the sky blue?"
                            "\n\nAnswer format: true/false", "answer": answer} for answer in ("true", "false")]
    true, false = L.choice_rows(rows, "b.json", get_task("boolq"))
    assert true.contexts == ["Question: is the sky blue?\nAnswer:"] * 2  # one "?", as lm-eval adds it
    assert true.continuations == [" no", " yes"] and true.norm_lengths == [2, 3]
    assert (true.gold, false.gold) == (1, 0)


def test_winogrande_is_scored_partially():
    row = {"instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
                          "Sarah was a much better surgeon than Maria so _ always got the easier cases.\n\n"
                          "Option1: Sarah Option2: Maria Answer format: option1/option2", "answer": "option2"}
    wino = L.choice_rows([row], "w.json", get_task("winogrande"))[0]
    # preprocess_winogrande.py: the option in the blank is the context, the rest the continuation.
    assert wino.contexts == ["Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria"]
    assert wino.continuations == [" always got the easier cases."] * 2
    assert wino.norm_lengths == [len(c) for c in wino.contexts] and wino.gold == 1


def test_hellaswag_gets_lm_evals_clean_up():
    row = {"question": "Baking cookies: A woman [header] puts dough on a tray.", "label": 1,
           "choices": ["She bakes it. [title] Step two", "She eats  it."]}
    hella = L.choice_rows([row], "h.json", get_task("hellaswag"))[0]
    assert hella.contexts[0] == "Baking cookies: A woman puts dough on a tray."
    assert hella.continuations == [" She bakes it.. Step two", " She eats it."]


@pytest.mark.parametrize("row, needle", [
    ({"instruction": "Say something nice.", "answer": "hello"}, "no 'Answer format: ...' line"),
    ({"instruction": "Pick: Answer1: a Answer2: b\n\nAnswer format: answer1/answer2/answer3", "answer": "answer1"},
     "do not match the answer format"),
    ({"instruction": "Pick one: Answer1: a Answer2: b\n\nAnswer format: answer1/answer2", "answer": "answer3"},
     "answer 'answer3' is not one of its choices"),
    ({"question": "q", "choices": ["a", "b"], "label": 2}, "label 2 is not an index"),
    ({"text": "free text", "label": "x"}, "neither an instruction row nor"),
])
def test_a_row_that_is_no_multiple_choice_is_one_line_naming_file_and_row(row, needle):
    good = first_row("ARC-Easy")
    with pytest.raises(L.LoglikError) as err:
        L.choice_rows([good, row], "data/test.json", get_task("ARC-Easy"))
    message = str(err.value)
    assert message.startswith("data/test.json: row 2: cannot be scored by likelihood as ARC-Easy") and needle in message
    assert "\n" not in message


def test_winogrande_row_without_a_blank_is_refused():
    row = {"question": "No blank here.", "choices": ["a", "b"], "label": 0}
    with pytest.raises(L.LoglikError, match="row 1: .* no blank '_'"):
        L.choice_rows([row], "w.json", get_task("winogrande"))


class _WordTokenizer:
    """Words with their leading space as one token, as a BPE tokenizer splits " yes"."""

    bos_token_id, eos_token_id, pad_token_id = None, 0, 0

    def __init__(self):
        self.vocab = {}

    def encode(self, text, add_special_tokens=True):
        import re

        return [self.vocab.setdefault(piece, len(self.vocab) + 1) for piece in re.findall(r" ?[^ ]+| +", text)]


def test_encode_pair_splits_as_lm_eval():
    tok = _WordTokenizer()
    context, cont = L.encode_pair(tok, "Answer:", " yes")
    assert [tok.encode("Answer:")] == [context] and cont == tok.encode(" yes")
    # A trailing space of the context moves to the continuation: " yes" stays one token.
    moved = L.encode_pair(tok, "Answer: ", "yes")
    assert moved == (context, cont)
    # The continuation's tokens are the whole text's after the context's (not encode(continuation)).
    whole = tok.encode("Answer: yes")
    assert moved[0] + moved[1] == whole


def test_acc_and_acc_norm_from_logliks():
    rows = [L.ChoiceRow(1, ["c"] * 2, [" a", " bbbb"], [1, 4], gold=1),
            L.ChoiceRow(2, ["c"] * 2, [" a", " bb"], [1, 2], gold=0)]
    result = L.loglik_result("t", rows, [[-2.0, -4.0], [-1.0, -1.0]])
    # Row 1: acc picks choice 0 (-2 > -4); per character -2 < -1, so acc_norm picks choice 1.
    # Row 2: a tie goes to the first choice for acc; per character -1 < -0.5 picks choice 1.
    assert [p["pred"] for p in result.predictions] == [0, 0]
    assert [p["pred_norm"] for p in result.predictions] == [1, 1]
    assert (result.correct, result.correct_norm) == (1, 1) and result.accuracy_norm == 0.5
    d = result.to_dict()
    assert d["acc"] == 0.5 and d["acc_norm"] == 0.5 and d["rows"] == 2 and len(d["predictions"]) == 2
    assert d["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 1))  # sample variance, n - 1


def _tiny(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256)).eval()
    return GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=4, n_positions=256)).eval()


class _CappedTokenizer(_WordTokenizer):
    """The word tokenizer with ids kept below the tiny models' vocabulary."""

    def encode(self, text, add_special_tokens=True):
        return [i % 397 + 2 for i in super().encode(text, add_special_tokens)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prefix_path_equals_each_choice_alone(arch):
    model, tok = _tiny(arch), _CappedTokenizer()
    assert L._cache_argument(model) is not None  # the fast path runs, not the plain one
    rows = []
    for folder, task in (("ARC-Easy", "ARC-Easy"), ("winogrande", "winogrande"), ("boolq", "boolq"),
                         ("piqa", "piqa")):
        rows += L.choice_rows(json.loads((DATA / folder / "test.json").read_text())[:6], folder, get_task(task))
    rows.append(L.ChoiceRow(99, ["x"] * 3, [" a b", " c", " d e f"], [3, 1, 5], 0))  # a one-token context: no prefix
    fast = L.score_rows(model, tok, rows, batch_size=5)
    slow = L.score_rows_reference(model, tok, rows)
    assert len(fast) == len(rows) and all(len(f) == len(r.continuations) for f, r in zip(fast, rows))
    for f, s in zip(fast, slow):
        assert f == pytest.approx(s, abs=2e-4)
    assert len({round(v, 3) for ll in fast for v in ll}) > len(rows)  # real, varied scores


def test_the_prefix_is_computed_once_per_row():
    model, tok = _tiny("llama"), _CappedTokenizer()
    rows = L.choice_rows(json.loads((DATA / "ARC-Easy" / "test.json").read_text())[:4], "a", get_task("ARC-Easy"))
    seen = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    L.score_rows(model, tok, rows, batch_size=4)
    seqs = [L._sequences(tok, r, 256) for r in rows]
    prefixes = [L._shared_prefix(s) for s in seqs]
    assert min(prefixes) >= 5  # the question's tokens
    # One forward of the 4 prefixes, one of all 4 x 4 choices' remaining tokens, padding included:
    # fewer tokens than the 16 (context, continuation) sequences one by one.
    assert len(seen) == 2 and seen[0] == (4, max(prefixes)) and seen[1][0] == 16
    assert seen[0][0] * seen[0][1] + seen[1][0] * seen[1][1] < sum(len(x.tokens) - 1 for s in seqs for x in s)


def test_chunked_logprob_equals_log_softmax_gather():
    torch.manual_seed(0)
    logits, targets = torch.randn(19, 5, 50), torch.randint(0, 50, (19, 5))
    targets[3, 2:] = -1  # unscored positions
    want = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    want = want.masked_fill(targets < 0, 0.0).sum(-1)
    assert L._continuation_logprob(logits, targets, rows=4) == pytest.approx(want.tolist(), abs=1e-5)


def test_batches_keep_scored_positions_under_the_cap(monkeypatch):
    monkeypatch.setattr(L, "SCORED_PER_FORWARD", 40)
    seqs = [[L._Sequence([1] * 9, k)] * 4 for k in (2, 2, 3, 5, 20)]  # 4 choices each, continuation k tokens
    batches = L._batches(list(range(5)), seqs, batch_size=16)
    assert batches == [[0, 1, 2], [3], [4]]  # 12 x 3 = 36 <= 40; 16 x 5 > 40; row 4 alone exceeds it
    assert L._batches(list(range(3)), seqs, batch_size=2) == [[0, 1], [2]]
    assert sorted(i for b in L._batches([4, 2, 0, 3, 1], seqs, 16) for i in b) == list(range(5))
