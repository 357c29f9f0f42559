"""Run lm-evaluation-harness on custom tasks and write every row's log-likelihoods as JSON.

Runs inside lm-eval's own virtual environment (it never imports dorafit); ``lmeval_check.py``
starts it there with one JSON argument:

    {"include": TASK_YAML_DIR, "tasks": [...], "model_args": "pretrained=...,dtype=float32[,peft=...]",
     "batch_size": 8, "out": OUT_JSON}

OUT_JSON: {"versions": {...}, "results": {task: {metric: value}}, "samples": {task: [{"doc_id",
"loglik": [ll per choice], "acc", "acc_norm"}]}} in document order.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    import lm_eval
    import peft
    import torch
    import transformers
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    manager = TaskManager(include_path=spec["include"])
    out = lm_eval.simple_evaluate(model="hf", model_args=spec["model_args"], tasks=spec["tasks"], num_fewshot=0,
                                  batch_size=spec["batch_size"], device="cpu", log_samples=True,
                                  task_manager=manager, bootstrap_iters=0)
    samples = {}
    for task, rows in out["samples"].items():
        samples[task] = [{"doc_id": s["doc_id"], "loglik": [float(r[0]) for r in s["filtered_resps"]],
                          "acc": s.get("acc"), "acc_norm": s.get("acc_norm")}
                         for s in sorted(rows, key=lambda s: s["doc_id"])]
    results = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
               for task, metrics in out["results"].items()}
    record = {"versions": {"lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "?",
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__},
              "seconds": time.perf_counter() - started, "results": results, "samples": samples}
    with open(spec["out"], "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
