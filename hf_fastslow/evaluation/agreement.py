"""Agreement between two labelings: Cohen's kappa, precision / recall / F1, and per-label (multi-label) summaries.

Shared by MAST (judge vs gold per failure mode) and K-Sort (judge vs human). Missing predictions (`None`: a judge
answer that could not be parsed) are never dropped: they count in `missing`, and for the binary metrics they are
scored as "no" (a judge that says nothing has not found a failure), which is also what agentdash does silently.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = ["BinaryAgreement", "binary_agreement", "cohen_kappa", "multilabel_agreement"]


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two raters over the same items (any label set). (p_o - p_e) / (1 - p_e); when both raters
    use one and the same label throughout (p_e = 1) the agreement is perfect and kappa is 1.0 by convention."""
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa: the raters labelled {len(a)} and {len(b)} items; they must rate the same "
                         "items.")
    if not a:
        raise ValueError("cohen_kappa: no items.")
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    labels = set(a) | set(b)
    p_e = sum((sum(x == lab for x in a) / n) * (sum(y == lab for y in b) / n) for lab in labels)
    if math.isclose(p_e, 1.0):
        return 1.0
    return (p_o - p_e) / (1.0 - p_e)


@dataclass(frozen=True)
class BinaryAgreement:
    """Confusion counts of predictions vs gold for one binary label, and the metrics derived from them."""

    tp: int
    fp: int
    fn: int
    tn: int
    missing: int  # predictions that were None (scored as "no")

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        """2TP / (2TP + FP + FN); 0.0 when there is nothing to find and nothing was found (scikit-learn's
        zero_division default), so a label without positives cannot lift a macro F1."""
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else 0.0

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else 0.0

    @property
    def kappa(self) -> float:
        pred = [True] * self.tp + [True] * self.fp + [False] * self.fn + [False] * self.tn
        gold = [True] * self.tp + [False] * self.fp + [True] * self.fn + [False] * self.tn
        return cohen_kappa(pred, gold) if self.n else math.nan

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall, "f1": self.f1,
                "accuracy": self.accuracy, "kappa": self.kappa}


def binary_agreement(pred: Sequence[bool | None], gold: Sequence[bool]) -> BinaryAgreement:
    """Counts for one binary label; a None prediction is scored "no" and counted in `missing`."""
    if len(pred) != len(gold):
        raise ValueError(f"binary_agreement: {len(pred)} predictions for {len(gold)} gold labels.")
    tp = fp = fn = tn = missing = 0
    for p, g in zip(pred, gold):
        if g is None:
            raise ValueError("binary_agreement: a gold label is None; gold must be complete.")
        if p is None:
            missing += 1
        p = bool(p)
        tp += p and g
        fp += p and not g
        fn += (not p) and g
        tn += (not p) and (not g)
    return BinaryAgreement(tp, fp, fn, tn, missing)


def multilabel_agreement(pred: Sequence[Mapping[str, bool | None]], gold: Sequence[Mapping[str, bool]],
                         labels: Sequence[str]) -> dict:
    """Per-label `BinaryAgreement` dicts, macro F1 (mean over labels), pooled kappa (all item x label decisions as
    one rater pair), accuracy and the number of missing decisions. A label absent from a prediction is missing."""
    if len(pred) != len(gold):
        raise ValueError(f"multilabel_agreement: {len(pred)} predictions for {len(gold)} gold items.")
    per_label = {}
    pooled_p: list[bool] = []
    pooled_g: list[bool] = []
    for lab in labels:
        p = [row.get(lab) for row in pred]
        g = [row[lab] for row in gold]
        per_label[lab] = binary_agreement(p, g)
        pooled_p += [bool(x) for x in p]
        pooled_g += [bool(x) for x in g]
    total = BinaryAgreement(*(sum(getattr(a, f) for a in per_label.values()) for f in ("tp", "fp", "fn", "tn",
                                                                                       "missing")))
    return {
        "per_label": {lab: a.as_dict() for lab, a in per_label.items()},
        "macro_f1": sum(a.f1 for a in per_label.values()) / len(per_label) if per_label else math.nan,
        "micro_f1": total.f1,
        "pooled_kappa": cohen_kappa(pooled_p, pooled_g) if pooled_p else math.nan,
        "accuracy": total.accuracy,
        "missing": total.missing,
        "decisions": total.n,
    }
