"""Prompts: the paper's template and the model's chat template, built in one place for training and generation."""

from __future__ import annotations

import pytest

from dorafit.eval.examples import PROMPT_TEMPLATES, build_prompt, format_prompt

# A chat template in the form of SmolLM2's (ChatML): the turns between <|im_start|> and <|im_end|>.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chat_tokenizer(template: str | None = CHATML):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<|im_end|>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>")
    fast.chat_template = template
    return fast


def test_paper_template_is_format_prompt():
    assert build_prompt("paper", "Say hi.") == format_prompt("Say hi.")
    assert build_prompt("paper", "Say hi.", "ctx") == format_prompt("Say hi.", "ctx")


def test_chat_template_puts_the_instruction_in_the_user_turn_and_ends_at_the_assistant_turn():
    prompt = build_prompt("chat", "Which is a gas?", tokenizer=_chat_tokenizer())
    assert prompt == "<|im_start|>user\nWhich is a gas?<|im_end|>\n<|im_start|>assistant\n"
    with_input = build_prompt("chat", "Which is a gas?", "iron or oxygen", tokenizer=_chat_tokenizer())
    assert "<|im_start|>user\nWhich is a gas?\n\niron or oxygen<|im_end|>" in with_input


def test_chat_template_needs_a_tokenizer_with_one():
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        build_prompt("chat", "Which is a gas?", tokenizer=_chat_tokenizer(None))


def test_unknown_template_is_refused():
    assert PROMPT_TEMPLATES == ("auto", "paper", "chat", "plain")
    with pytest.raises(ValueError, match="unknown prompt template 'alpaca'"):
        build_prompt("alpaca", "Which is a gas?")


def test_auto_template_is_chat_only_for_a_tokenizer_with_a_chat_template():
    from types import SimpleNamespace

    from dorafit.eval.examples import resolve_template

    assert resolve_template("auto", SimpleNamespace(chat_template="{{ messages }}")) == "chat"
    assert resolve_template("auto", SimpleNamespace(chat_template=None)) == "paper"
    assert resolve_template("paper", SimpleNamespace(chat_template="{{ messages }}")) == "paper"
