"""Whether a job's result is better than its base: each score measured on both (the
validation data's ``eval_loss``, ``perplexity``, preference accuracy and margin, and
each evaluation task's metrics), read in the direction that metric improves.  The job's
last event and ``cyllm train status`` say it; a result worse than its base is still
served (it is the user's to judge), and the promotion gate reads ``eval_loss``."""

from __future__ import annotations

import math
from dataclasses import dataclass

# the metrics where less is better (the harness's perplexities, bits per byte and
# translation error rate among them); every other score is better higher
LOWER_IS_BETTER = {
    "eval_loss",
    "perplexity",
    "word_perplexity",
    "byte_perplexity",
    "bits_per_byte",
    "ter",
    "brier_score",
}


@dataclass(frozen=True)
class Comparison:
    metric: str
    base: float
    result: float

    @property
    def better(self) -> bool | None:
        """None when equal."""
        if self.result == self.base:
            return None
        lower = (
            self.metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER or self.metric.split(".")[0] in LOWER_IS_BETTER
        )
        return (self.result < self.base) == lower


def compare(evaluation: dict[str, float]) -> list[Comparison]:
    """The scores the base and the result both have (``base.<m>``, ``result.<m>``)."""
    found = [
        Comparison(key.removeprefix("result."), evaluation[f"base.{key.removeprefix('result.')}"], value)
        for key, value in sorted(evaluation.items())
        if key.startswith("result.") and f"base.{key.removeprefix('result.')}" in evaluation
    ]
    return [c for c in found if math.isfinite(c.base) and math.isfinite(c.result)]  # NaN: not a score


def verdict(evaluation: dict[str, float]) -> str:
    """'better than the base on ...; worse on ...', or '' without scores of both."""
    found = compare(evaluation)
    if not found:
        return ""
    better = [c for c in found if c.better]
    worse = [c for c in found if c.better is False]

    def listed(cs: list[Comparison]) -> str:
        return ", ".join(f"{c.metric} {c.result:.4g} vs {c.base:.4g}" for c in cs)

    if worse and not better:
        return f"the result is worse than the base: {listed(worse)}"
    if better and not worse:
        return f"the result is better than the base: {listed(better)}"
    if not better and not worse:
        return "the result scores as the base does"
    return f"the result is better than the base on {listed(better)}; worse on {listed(worse)}"
