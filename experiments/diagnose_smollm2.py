"""Diagnostics of the untrained SmolLM2-135M-Instruct on a commonsense test file (not the protocol).

Prints, for the first N rows: prompt tokens per row in the paper's and the chat template; the
accuracy of picking the choice whose text has the highest mean log-likelihood after the
question (what the model knows, free of the answer format); and zero-shot greedy generation
in the model's chat template scored with the paper's first-match extraction (whether the
instruct model follows the format when asked in its own way), with the predicted answer words.

    PYTHONPATH=. python experiments/diagnose_smollm2.py ARC-Easy dorafit/data/ARC-Easy/test.json 100
"""

import collections
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from dorafit.eval.evaluate import generate_responses, score_responses
from dorafit.eval.examples import format_prompt
from dorafit.eval.tasks import extract_answer, get_task, parse_instruction
from dorafit.train.models import load_tokenizer, resolve_model_path

torch.manual_seed(0)
task_name = sys.argv[1]; path = sys.argv[2]; n = int(sys.argv[3])
t0 = time.perf_counter()
mp = resolve_model_path("smollm2-135m-instruct")
tok = load_tokenizer(mp, False)
model = AutoModelForCausalLM.from_pretrained(mp, dtype=torch.float32); model.eval()
print("load", time.perf_counter() - t0, flush=True)
rows = json.load(open(path))[:n]
task = get_task(task_name)
paper = [format_prompt(r["instruction"], r.get("input") or "") for r in rows]
chat = [tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False,
                                add_generation_prompt=True) for r in rows]
for name, ps in [("paper", paper), ("chat", chat)]:
    lens = [len(tok(p)["input_ids"]) for p in ps]; print(name, "prompt tokens mean", sum(lens) / len(lens), "max", max(lens))
print(repr(chat[0]))
answers = [r["answer"] for r in rows]
print("gold dist", collections.Counter(answers))
# Log-likelihood of each choice's text after the question (mean over its tokens).
t0 = time.perf_counter(); right = 0
with torch.no_grad():
    for r in rows:
        q, choices, words = parse_instruction(r["instruction"])
        ctx = tok(q + " Answer:")["input_ids"]
        scores = []
        for c in choices:
            ids = tok(" " + c)["input_ids"]
            x = torch.tensor([ctx + ids]); lp = model(x).logits.log_softmax(-1)[0, len(ctx) - 1:-1]
            scores.append(lp.gather(1, torch.tensor(ids)[:, None]).mean().item())
        right += words[max(range(len(scores)), key=scores.__getitem__)] == r["answer"]
print("loglik acc", right / len(rows), "time", time.perf_counter() - t0, flush=True)
t0 = time.perf_counter()
resp = generate_responses(model, tok, chat, 24, batch_size=25)
res = score_responses(task, resp, answers)
print("chat zero-shot", res.to_dict(), "time", time.perf_counter() - t0)
print("pred dist", collections.Counter(extract_answer(task, r) for r in resp))
for r in resp[:5]:
    print(repr(r))
