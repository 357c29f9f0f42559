"""Rebuild the per-run records of reproduce_smollm2.py's first sitting from what was committed.

The first sitting's ``results/reproduction_smollm2/runs/*.json`` were never committed: the
repository's ignore rule ``runs/`` matched that folder too (it is now anchored to the two work
folders). What the records held is still in the committed report.json (accuracies and unparseable
shares per task, VeRA's validation averages, the detach memory), report.md (each run's seconds)
and sitting1.log (steps, training time, trainable parameters). This script puts them back
together, marks every rebuilt record with ``"recovered"``, and never touches a record that exists.

    PYTHONPATH=. python experiments/recover_smollm2_records.py

Lost for good: the full fine-tune's per-step loss log and VeRA's per-task validation accuracies
(only their averages were in the report).
"""

from __future__ import annotations

import json
import re
import statistics
import sys

import reproduce_smollm2 as R

NOTE = ("rebuilt by experiments/recover_smollm2_records.py from the committed report.json, report.md and "
        "sitting1.log; the run's own record was lost to an ignore rule")


def seconds_of(text: str) -> float:
    minutes, seconds = re.fullmatch(r"(?:(\d+)m)?([\d.]+)s", text).groups()
    return 60 * int(minutes or 0) + float(seconds)


def log_facts(log: str) -> dict[str, dict]:
    """Per run name: steps, training seconds and trainable parameters from the trainer's summaries
    (a run that was interrupted and resumed shows only its last, finishing part's time)."""
    facts: dict[str, dict] = {}
    name = None
    for line in log.splitlines():
        if m := re.match(r"^([a-z0-9.-]+): \{", line):
            name = m.group(1)
            facts.setdefault(name, {})
        elif name and (m := re.match(r"^(\d+) steps of \d+ rows", line)):
            facts[name]["steps"] = int(m.group(1))
        elif name and (m := re.match(r"^trainable params\s+([\d,]+)", line)):
            facts[name]["trainable"] = int(m.group(1).replace(",", ""))
        elif name and (m := re.match(r"^time\s+training (\S+),", line)):
            facts[name]["train_seconds"] = seconds_of(m.group(1))
    return facts


def table_seconds(report_md: str) -> dict[str, float]:
    out = {}
    for line in report_md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(R.TEST_TASKS) + 5 and re.fullmatch(r"\d+", cells[-1]):
            out[cells[0]] = float(cells[-1])
    return out


def main() -> int:
    summary = json.loads((R.RESULTS / "report.json").read_text())
    seconds = table_seconds((R.RESULTS / "report.md").read_text())
    facts = log_facts((R.RESULTS / "sitting1.log").read_text())
    plan = R.plan()
    written = 0
    for name, run in summary["runs"].items():
        path = R.result_path(name)
        if path.is_file():
            continue
        spec = plan[name]
        steps = 0 if spec["method"] == "untrained" else facts.get(name, {}).get("steps", 0)
        if spec["method"] == "ft":  # its own loop prints no summary: one epoch of the same 470 examples
            steps = facts.get("dora-r16-s0", {}).get("steps", 0)
        record = {k: v for k, v in facts.get(name, {}).items() if k != "steps"} | {
            "steps": steps, "tasks": run["tasks"], "spec": spec, "name": name, "seconds": seconds[name],
            "model": R.MODEL, "test_rows": R.TEST_ROWS, "train_rows": len(R.TRAIN_TASKS) * R.TRAIN_PER_TASK,
            "cpus": 2, "average": run["average"],
            "average_trained": statistics.mean(run["tasks"][t]["accuracy"] for t in R.TRAIN_TASKS),
            "recovered": NOTE}
        if spec["method"] == "untrained":
            record["chance"] = summary["pilot"]["chance"]
        if spec.get("validate"):
            record["average_validation"] = summary["vera"][spec["method"]]["tried"][f"{spec['lr']:g}"]
        R.write_json(path, record)
        written += 1
    if not R.result_path("detach-memory").is_file():
        memory = {k: summary["detach"][k] for k in ("on", "off")}
        R.write_json(R.result_path("detach-memory"), {"steps": 0, "memory": memory, "spec": plan["detach-memory"],
                                                      "name": "detach-memory", "recovered": NOTE})
        written += 1
    print(f"{written} records rebuilt in {R.RESULTS / 'runs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
