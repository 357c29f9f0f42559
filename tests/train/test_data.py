"""Reading data files, the paper's prompt, response-only loss masks, and clear data errors."""

from __future__ import annotations

import json

import pytest

from dorafit.train import data as D

ROW = {"instruction": "Please answer the following question with true or false, question: is it?\n\n"
                      "Answer format: true/false", "input": "", "output": "the correct answer is true",
       "answer": "true"}


def _write(path, rows, kind):
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif kind == "csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
def test_read_rows_every_format(kind, tmp_path):
    rows = [dict(ROW, answer=a, output=f"the correct answer is {a}") for a in ("true", "false", "true")]
    path = _write(tmp_path / f"d.{kind}", rows, kind)
    read = D.read_rows(path)
    assert D.detect_format(read, path) == "commonsense"
    examples = D.to_choice_examples(read, "commonsense", path)
    assert [e.label for e in examples] == [0, 1, 0] and examples[0].choices == ["true", "false"]


def test_prompt_template_is_the_papers():
    prompt = D.format_prompt("Say hi.")
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                      "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
    assert "### Input:\nctx\n\n### Response:\n" in D.format_prompt("Say hi.", "ctx")


def test_loss_only_on_response_tokens(tiny_llama):
    from conftest import arc_rows
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    row = arc_rows("train", 1)[0]
    pairs = D.to_instruction_pairs([row], "commonsense", "f.json")
    (example,) = D.tokenize_instruction_pairs(pairs, tok, 512, "f.json")
    n_prompt = len(tok(pairs[0][0])["input_ids"])
    assert example["labels"][:n_prompt] == [D.IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert tok.decode(example["input_ids"][n_prompt:]).startswith(row["output"])


def test_chat_template_loss_only_on_the_assistant_turn(tiny_llama):
    from conftest import arc_rows
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    row = arc_rows("train", 1)[0]
    (prompt, response), = D.to_instruction_pairs([row], "commonsense", "f.json", "chat", tok)
    assert prompt.startswith("user : " + row["instruction"]) and prompt.endswith("</s> assistant : ")
    (example,) = D.tokenize_instruction_pairs([(prompt, response)], tok, 512, "f.json")
    n_prompt = len(tok(prompt)["input_ids"])
    assert example["labels"][:n_prompt] == [D.IGNORE_INDEX] * n_prompt
    # The assistant turn: the response, then the end of the turn (the eos token) to learn stopping.
    assert example["labels"][n_prompt:] == tok(response)["input_ids"] + [tok.eos_token_id]


def test_choice_response_names_the_chosen_text_before_its_answer_word():
    from dorafit.eval.tasks import extract_answer, get_task

    arc = {"instruction": "Please choose the correct answer to the question: Which is a metal?\n\n"
                          "Answer1: wood Answer2: copper wire Answer3: glass\n\n"
                          "Answer format: answer1/answer2/answer3",
           "input": "", "output": "the correct answer is answer2", "answer": "answer2"}
    (_, response), = D.to_instruction_pairs([arc], "commonsense", "f.json", response_format="choice")
    assert response == "the correct answer is copper wire (answer2)"
    assert extract_answer(get_task("ARC-Easy"), response) == "answer2"  # scored like the paper's
    # Without an "answer" field the answer word comes from the output; BoolQ keeps its output.
    no_answer = {k: v for k, v in arc.items() if k != "answer"}
    (_, response), = D.to_instruction_pairs([no_answer], "commonsense", "f.json", response_format="choice",
                                            task=get_task("ARC-Easy"))
    assert response.endswith("copper wire (answer2)")
    (_, response), = D.to_instruction_pairs([ROW], "commonsense", "f.json", response_format="choice")
    assert response == ROW["output"]
    (_, response), = D.to_instruction_pairs([arc], "commonsense", "f.json")
    assert response == arc["output"]  # the default is the row's own output
    with pytest.raises(D.DataError, match=r"f.json: row 2: answer 'answer7' is not one of the answer words"):
        D.to_instruction_pairs([arc, dict(arc, answer="answer7")], "commonsense", "f.json",
                               response_format="choice")


def test_max_length_that_truncates_every_example(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    pairs = D.to_instruction_pairs([ROW, ROW], "commonsense", "f.json")
    with pytest.raises(D.DataError, match="max length 10 truncates every example"):
        D.tokenize_instruction_pairs(pairs, tok, 10, "f.json")


def test_missing_empty_and_malformed_files(tmp_path):
    with pytest.raises(D.DataError, match="nope.json: no such file"):
        D.read_rows(tmp_path / "nope.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(D.DataError, match="empty.json: the data set is empty"):
        D.read_rows(tmp_path / "empty.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n{\"instruction\": oops}\n")
    with pytest.raises(D.DataError, match=r"bad.jsonl: line 3: invalid JSON"):
        D.read_rows(bad)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(D.DataError, match="unknown file type"):
        D.read_rows(tmp_path / "d.txt")


def test_malformed_row_names_file_and_row(tmp_path):
    rows = [ROW, ROW, dict(ROW, instruction="")]
    path = _write(tmp_path / "rows.json", rows, "json")
    read = D.read_rows(path)
    with pytest.raises(D.DataError, match=r"rows.json: row 3: missing or empty 'instruction'"):
        D.to_instruction_pairs(read, "commonsense", path)
    rows = [ROW, dict(ROW, answer="maybe", output="maybe")]
    path = _write(tmp_path / "answers.json", rows, "json")
    with pytest.raises(D.DataError, match=r"answers.json: row 2: answer 'maybe' is not one of true/false"):
        D.to_choice_examples(D.read_rows(path), "commonsense", path)
    path = _write(tmp_path / "other.json", [{"prompt": "x"}], "json")
    with pytest.raises(D.DataError, match="other.json: row 1 has keys"):
        D.detect_format(D.read_rows(path), path)


def test_validation_split_is_seeded_and_disjoint():
    items = list(range(50))
    train, val = D.split_validation(items, 10, seed=3)
    assert len(val) == 10 and sorted(train + val) == items
    assert D.split_validation(items, 10, seed=3) == (train, val)
    assert len(D.split_validation(items, 0.2, seed=0)[1]) == 10
    with pytest.raises(D.DataError, match="leaves no training rows"):
        D.split_validation(items, 50, seed=0)


def test_a_huge_row_is_cut_before_it_is_tokenized(tiny_llama):
    """Only a bounded prefix of a row reaches the tokenizer, and its first max_length tokens are
    the uncut row's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    seen = []

    class Recording:
        eos_token = tok.eos_token

        def get_vocab(self):
            return tok.get_vocab()

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return tok(text, **kwargs)

    prompt = D.format_prompt("Which is a metal?")
    huge = "the correct answer is copper " + "wire, " * 2_000_000  # 12 MB of response
    short, example = D.tokenize_instruction_pairs([(prompt, "copper"), (prompt, huge)], Recording(), 64, "f.json",
                                                  report=[])
    bound = D.chars_to_tokenize(tok, 64)
    assert max(seen) <= bound < len(huge) // 100
    assert example["input_ids"] == tok(prompt + huge[:20_000])["input_ids"][:64]
