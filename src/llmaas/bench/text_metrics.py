"""Text metrics for the KV-compression evaluation: ROUGE-L, chrF, label matching and a confidence interval.

Owns small, dependency-free reimplementations scored per item (sentence level), so every task reports a mean and a
95% interval over the same items. Ignores corpus-level aggregation, stemming and multiple references.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"[a-z0-9]+")
_SPACE = re.compile(r"\s+")


def words(text: str) -> list[str]:
    """Lowercased alphanumeric word tokens (the rouge-score package's default tokenizer, without stemming)."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1]: LCS of the word tokens over candidate length (P) and reference length (R)."""
    cand, ref = words(candidate), words(reference)
    lcs = lcs_length(cand, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(cand), lcs / len(ref)
    return 2 * p * r / (p + r)


def chrf(candidate: str, reference: str, order: int = 6, beta: float = 2.0) -> float:
    """chrF in [0, 100] (Popović 2015; sacreBLEU's defaults): character n-gram precision and recall for n = 1..order,
    whitespace removed, each averaged over the orders both strings have, combined as an F-beta score."""
    cand, ref = _SPACE.sub("", candidate), _SPACE.sub("", reference)
    precisions, recalls = [], []
    for n in range(1, order + 1):
        c = Counter(cand[i:i + n] for i in range(len(cand) - n + 1))
        r = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        if c and r:
            common = sum((c & r).values())
            precisions.append(common / sum(c.values()))
            recalls.append(common / sum(r.values()))
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p + r == 0:
        return 0.0
    b2 = beta * beta
    return 100 * (1 + b2) * p * r / (b2 * p + r)


def match_label(answer: str, labels: dict[str, Sequence[str]]) -> str | None:
    """The label whose keyword occurs first in the answer (case-insensitive, whole words), or None."""
    text = answer.lower()
    best: tuple[int, str] | None = None
    for label, keywords in labels.items():
        for kw in keywords:
            m = re.search(rf"(?<![a-z]){re.escape(kw.lower())}(?![a-z])", text)
            if m and (best is None or m.start() < best[0]):
                best = (m.start(), label)
    return best[1] if best else None


def mean_ci95(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): the normal-approximation 95% interval of the mean (0-width for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n < 2:
        return (mean, mean, mean)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return (mean, mean - half, mean + half)
