"""Rebuild the commonsense subsets shipped in this folder from the LLM-Adapters files.

    python dorafit/data/make_subset.py /path/to/LLM-Adapters/dataset

For each task below, the rows of the original train.json and test.json are shuffled with a
fixed seed (Python's random.Random(0)) and the first N are kept, unchanged, in the original
{instruction, input, output, answer} format.
"""

import json
import random
import sys
from pathlib import Path

# ARC-Easy: what `dorafit train` trains and tests on with no options. The others: test rows
# for `dorafit eval --task all` (LLM-Adapters ships no train.json for piqa, social_i_qa, winogrande).
SUBSETS = {
    "ARC-Easy": {"train": 256, "test": 200},
    **{task: {"test": 200} for task in ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Challenge",
                                        "openbookqa")},
}
SEED = 0


def main(source: str) -> None:
    here = Path(__file__).resolve().parent
    for task, sizes in SUBSETS.items():
        for split, n in sizes.items():
            rows = json.loads((Path(source) / task / f"{split}.json").read_text())
            random.Random(SEED).shuffle(rows)
            out = here / task / f"{split}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows[:n], indent=1, ensure_ascii=False) + "\n")
            print(f"{out}: {n} of {len(rows)} rows")


if __name__ == "__main__":
    main(sys.argv[1])
