"""Before and after a fine-tune, under both scorings: what moved, with standard errors.

Generation accuracy (the paper's protocol) measures the answer format as much as the answer;
likelihood accuracy (lm-evaluation-harness's) measures what the model knows among the choices.
On the same test rows the change of each is a paired difference: with d_i = after_i − before_i
(1 if row i is right, else 0),

    change = mean(d)        standard error = sd(d) / sqrt(n)   (sample sd, n − 1)

which is far smaller than the two accuracies' own errors when most rows keep their outcome.
A change counts as moved when it exceeds two standard errors.
"""

from __future__ import annotations

import math

from dorafit.eval.evaluate import EvalResult, standard_error


def row_outcomes(result: EvalResult, norm: bool = False) -> list[int]:
    """1 for each row the result got right, else 0, in row order (``norm``: by acc_norm)."""
    key = "pred_norm" if norm else "pred"
    return [int(p[key] == p["gold"]) for p in result.predictions]


def paired_change(before: EvalResult, after: EvalResult, norm: bool = False) -> tuple[float, float]:
    """(after − before, its paired standard error) as shares of the rows both scored."""
    a, b = row_outcomes(before, norm), row_outcomes(after, norm)
    if len(a) != len(b) or not a:
        raise ValueError(f"paired change needs the same rows before and after ({len(a)} vs {len(b)})")
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else 0.0
    return mean, math.sqrt(var / len(d))


def _moved(change: float, error: float) -> bool:
    return abs(change) > 2 * error and change != 0


def _points(change: float, error: float) -> str:
    return f"{100 * change:+.1f} points (± {100 * error:.1f})"


def change_sentence(generate: tuple[EvalResult, EvalResult] | None,
                    loglik: tuple[EvalResult, EvalResult] | None) -> str:
    """One plain sentence on which accuracy moved (beyond two paired standard errors)."""
    parts, moved = [], {}
    if generate:
        change, error = paired_change(*generate)
        moved["generate"] = _moved(change, error)
        parts.append(f"generation accuracy {_points(change, error)}")
    if loglik:
        change, error = paired_change(*loglik)
        moved["loglik"] = _moved(change, error)
        parts.append(f"likelihood accuracy {_points(change, error)}")
    if not parts:
        return ""
    said = "Change on the same rows, paired: " + ", ".join(parts) + ". "
    if moved.get("generate") and "loglik" in moved and not moved["loglik"]:
        return said + ("Only generation moved: the fine-tune taught the model to state its answer in the "
                       "expected format, not what it knows about the choices.")
    if moved.get("generate") and moved.get("loglik"):
        return said + "Both moved: the fine-tune changed how the model answers and which choice it finds likeliest."
    if moved.get("loglik"):
        return said + "Only likelihood moved: the model ranks the choices differently but does not say so."
    if moved.get("generate"):
        return said + "Generation accuracy moved beyond two standard errors."
    return said + "Neither moved beyond two standard errors."


def summary(result: EvalResult | None) -> dict | None:
    """The figures of a result that results.json keeps (no per-row predictions)."""
    if result is None:
        return None
    out = {"scoring": result.scoring, "rows": result.rows, "acc": result.accuracy,
           "acc_stderr": standard_error(result.accuracy, result.rows)}
    if result.correct_norm is not None:
        out.update(acc_norm=result.accuracy_norm, acc_norm_stderr=standard_error(result.accuracy_norm, result.rows))
    if result.scoring == "generate":
        out.update(unparseable=result.unparseable_share)
    return out


def predictions_record(**pairs: tuple[EvalResult | None, EvalResult | None]) -> dict:
    """{"<scoring>_before": [...], "<scoring>_after": [...]}: every row's prediction, for paired
    comparisons across runs (a missing evaluation is left out)."""
    out = {}
    for scoring, (before, after) in pairs.items():
        for when, result in (("before", before), ("after", after)):
            if result is not None:
                out[f"{scoring}_{when}"] = result.predictions
    return out


def with_error(share: float | None, rows: int) -> str:
    """"38.0 % ± 3.4" (one standard error)."""
    if share is None:
        return "-"
    return f"{100 * share:.1f}% ± {100 * standard_error(share, rows):.1f}"
