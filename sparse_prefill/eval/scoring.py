"""Scoring generated answers against reference strings.

`contains` is RULER's string_match_all: the share of references found in the output, ignoring case
(1.0 when all are there). `exact` is stricter: the first non-empty line, as a list of words and
numbers, must be the references in order and nothing else (punctuation and "and" aside).
"""

from __future__ import annotations

import math
import re
import statistics

METRICS = ("contains", "exact")


def score_contains(output: str, answers) -> float:
    """Share of `answers` that occur in `output`, case-insensitively."""
    answers = list(answers)
    if not answers:
        raise ValueError("score_contains needs at least one reference answer.")
    text = output.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[\w-]+", text.lower()) if w != "and"]


def score_exact(output: str, answers) -> float:
    """1.0 when the first non-empty line of `output` says exactly the answers, in order; else 0.0."""
    answers = list(answers)
    if not answers:
        raise ValueError("score_exact needs at least one reference answer.")
    first_line = next((line for line in output.splitlines() if line.strip()), "")
    return float(_words(first_line) == _words(" ".join(answers)))


def score(output: str, answers, metric: str = "contains") -> float:
    if metric == "contains":
        return score_contains(output, answers)
    if metric == "exact":
        return score_exact(output, answers)
    raise ValueError(f"Unknown metric {metric!r}; choose one of: {', '.join(METRICS)}.")


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion; partial scores count as fractional successes."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(diffs: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """(mean, low, high): the mean of paired differences (sparse - dense on the same prompts) and its 95 %
    normal interval. Pairing removes the prompts' own difficulty, so it is far tighter than two intervals."""
    n = len(diffs)
    mean = sum(diffs) / n
    half = z * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else 0.0
    return mean, mean - half, mean + half
