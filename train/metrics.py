"""Multi-label classification metrics in numpy: AUROC, AUPRC, ROC curves (NaN labels ignored).

A NaN or infinite score is an error (ValueError), never ranked: sorted like a number, the
scores of a diverged model would still give a plausible-looking AUROC.
"""
from __future__ import annotations

import numpy as np


def check_finite(scores: np.ndarray) -> None:
    """Raises ValueError saying how many scores are NaN or infinite."""
    bad = int(np.size(scores) - np.count_nonzero(np.isfinite(scores)))
    if bad:
        raise ValueError(f"{bad} of {np.size(scores)} scores are non-finite (NaN or infinite): the model "
                         "produced non-finite outputs, so no metric can be computed")


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _by_threshold(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The labelled images' labels (bool) sorted by falling score, and the last position of
    each distinct score (one curve point per threshold); NaN labels dropped."""
    check_finite(score)
    keep = ~np.isnan(y)
    y, score = y[keep] > 0.5, score[keep]
    order = np.argsort(-score, kind="mergesort")
    s = score[order]
    return y[order], np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); NaN when one class is absent."""
    check_finite(score)
    keep = ~np.isnan(y)
    y, score = y[keep] > 0.5, score[keep]
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    r = _ranks(score)
    return float((r[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (step interpolation)."""
    y, last = _by_threshold(y, score)
    if y.sum() == 0:
        return float("nan")
    tp = np.cumsum(y)
    precision = tp[last] / (last + 1)
    recall = tp[last] / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates), one point per distinct threshold."""
    y, last = _by_threshold(y, score)
    tpr = np.r_[0.0, np.cumsum(y)[last] / max(1, y.sum())]
    fpr = np.r_[0.0, np.cumsum(~y)[last] / max(1, (~y).sum())]
    return fpr, tpr


def counts(y: np.ndarray) -> dict:
    """{positives, negatives, ignored, prevalence} of one class's labels (NaN = ignored);
    prevalence is over the labelled images (None when none is labelled)."""
    known = ~np.isnan(y)
    pos = int(np.count_nonzero(y[known] > 0.5))
    neg = int(np.count_nonzero(known)) - pos
    return {"positives": pos, "negatives": neg, "ignored": int(len(y) - np.count_nonzero(known)),
            "prevalence": pos / (pos + neg) if pos + neg else None}


def status(c: dict, split: str) -> str:
    """'ok', or why AUROC/AUPRC are undefined for a class of ``counts``: 'no positives in test'."""
    if c["positives"] and c["negatives"]:
        return "ok"
    if not c["positives"] and not c["negatives"]:
        return f"no labels in {split}"
    return f"no {'positives' if not c['positives'] else 'negatives'} in {split}"


def brier(y: np.ndarray, score: np.ndarray) -> float:
    """Mean squared error of the probabilities against the 0/1 labels (NaN labels ignored);
    NaN when no image is labelled. 0 is perfect; always answering the prevalence p scores p(1-p)."""
    check_finite(score)
    keep = ~np.isnan(y)
    if not keep.any():
        return float("nan")
    return float(np.mean((score[keep].astype(np.float64) - (y[keep] > 0.5)) ** 2))  # float32 scores: sum in float64


def pr_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision), one point per distinct threshold, high scores first; the step
    curve whose area is ``average_precision``."""
    y, last = _by_threshold(y, score)
    tp = np.cumsum(y)[last]
    return tp / max(1, y.sum()), tp / (last + 1)


def reliability(y: np.ndarray, score: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean probability, observed frequency, images) of each non-empty equal-width bin of [0, 1]."""
    check_finite(score)
    keep = ~np.isnan(y)
    y, score = (y[keep] > 0.5).astype(np.float64), score[keep].astype(np.float64)
    which = np.clip((score * bins).astype(np.int64), 0, bins - 1)
    n = np.bincount(which, minlength=bins)
    full = n > 0
    mean_p = np.bincount(which, score, bins)[full] / n[full]
    observed = np.bincount(which, y, bins)[full] / n[full]
    return mean_p, observed, n[full]


def per_class(labels: np.ndarray, scores: np.ndarray, names: list[str]) -> dict:
    """{'classes': {name: {auroc, auprc, positives}}, 'mean_auroc', 'mean_auprc'}: point
    estimates only (validation during fine-tuning); NaN where a class has one value only."""
    check_finite(scores)  # all of them at once, so the message counts them all
    classes = {}
    for j, name in enumerate(names):
        y = labels[:, j]
        classes[name] = {"auroc": auroc(y, scores[:, j]), "auprc": average_precision(y, scores[:, j]),
                         "positives": int(np.nansum(y > 0.5))}
    aurocs = [c["auroc"] for c in classes.values() if not np.isnan(c["auroc"])]
    auprcs = [c["auprc"] for c in classes.values() if not np.isnan(c["auprc"])]
    return {"classes": classes, "mean_auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
            "mean_auprc": float(np.mean(auprcs)) if auprcs else float("nan")}
