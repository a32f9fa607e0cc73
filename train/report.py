"""The evaluation report: per-class AUROC / AUPRC with bootstrap intervals, prevalence,
counts and Brier score, and its three renderings (metrics.json's dict, a markdown table, a
compact screen table), plus predictions.csv.

A class with one value only in the split (no positives, or no negatives) has no AUROC or
AUPRC: its metrics are None and its ``status`` says why ("no positives in test") in every
rendering. The means are over the classes that have both values, and say how many, so an
undefined class is never averaged in as NaN nor silently dropped.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cxrfast import atomic

from . import bootstrap, metrics

LEVEL = 0.95
_METRICS = ("auroc", "auprc")


def build(labels: np.ndarray, scores: np.ndarray, names: list[str], split: str, resamples: int = 1000,
          seed: int = 0) -> dict:
    """The report of (N, K) labels (NaN = ignored) and probabilities: see the module docstring.
    ``resamples`` 0 gives point estimates without intervals (their bounds are None)."""
    metrics.check_finite(scores)
    classes = {}
    for j, name in enumerate(names):
        c = metrics.counts(labels[:, j])
        b = metrics.brier(labels[:, j], scores[:, j])
        classes[name] = {"status": metrics.status(c, split), **{f"{m}{s}": None for m in _METRICS
                                                                for s in ("", "_low", "_high")},
                         "brier": None if np.isnan(b) else b, **c}
    defined = [j for j, name in enumerate(names) if classes[name]["status"] == "ok"]
    result = {"classes": classes, "mean_over": len(defined), "classes_total": len(names),
              "undefined": {n: c["status"] for n, c in classes.items() if c["status"] != "ok"},
              "bootstrap": {"resamples": resamples, "seed": seed, "level": LEVEL, "method": "percentile"}}
    for m in _METRICS:
        per, mean = _intervals(labels[:, defined], scores[:, defined], m, resamples, seed)
        for j, interval in zip(defined, per):
            classes[names[j]].update(_named(m, interval))
        result.update(_named(f"mean_{m}", mean))
    briers = [classes[names[j]]["brier"] for j in defined]
    result["mean_brier"] = float(np.mean(briers)) if briers else None
    return result


def _intervals(labels: np.ndarray, scores: np.ndarray, metric: str, resamples: int,
               seed: int) -> tuple[list[Optional[bootstrap.Interval]], Optional[bootstrap.Interval]]:
    """bootstrap.intervals over the defined classes; no interval without resamples or classes."""
    if labels.shape[1] == 0:
        return [], None
    if resamples == 0:
        est = bootstrap.point(labels, scores, metric)
        nan = float("nan")
        return ([bootstrap.Interval(float(v), nan, nan) for v in est],
                bootstrap.Interval(float(np.mean(est)), nan, nan))
    return bootstrap.intervals(labels, scores, metric, resamples, seed, LEVEL)


def _named(key: str, interval: Optional[bootstrap.Interval]) -> dict:
    """{key, key_low, key_high} of an interval, None for what is undefined or not computed."""
    if interval is None:
        return {key: None, f"{key}_low": None, f"{key}_high": None}
    finite = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
    return {key: finite(interval.value), f"{key}_low": finite(interval.low), f"{key}_high": finite(interval.high)}


def _num(v: Optional[float], digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ci(row: dict, key: str) -> str:
    """'0.812-0.934', or '-' when not computed."""
    lo, hi = row.get(f"{key}_low"), row.get(f"{key}_high")
    return "-" if lo is None or hi is None else f"{lo:.3f}-{hi:.3f}"


def mean_label(result: dict) -> str:
    """'mean (2 of 3 classes)': the means are over the classes with both values only."""
    return f"mean ({result['mean_over']} of {result['classes_total']} classes)"


MD_COLUMNS = ("class", "AUROC", "AUROC 95% CI", "AUPRC", "AUPRC 95% CI", "prevalence", "positives", "negatives",
              "ignored", "Brier")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_md_cell(c) for c in cells) + " |"


def markdown_table(result: dict) -> str:
    """A GitHub-flavoured markdown table: one row per class and the mean row; an undefined
    class's AUROC cell says why ("no positives in test")."""
    lines = [_md_row(MD_COLUMNS), "|" + "|".join(["---"] + ["---:"] * (len(MD_COLUMNS) - 1)) + "|"]
    for name, c in result["classes"].items():
        auroc = _num(c["auroc"]) if c["status"] == "ok" else c["status"]
        lines.append(_md_row([name, auroc, _ci(c, "auroc"), _num(c["auprc"]), _ci(c, "auprc"),
                              _num(c["prevalence"]), str(c["positives"]), str(c["negatives"]), str(c["ignored"]),
                              _num(c["brier"], 4)]))
    lines.append(_md_row([f"**{mean_label(result)}**", _num(result["mean_auroc"]), _ci(result, "mean_auroc"),
                          _num(result["mean_auprc"]), _ci(result, "mean_auprc"), "", "", "", "",
                          _num(result["mean_brier"], 4)]))
    return "\n".join(lines)


def markdown(result: dict, heading: str, counted: str) -> str:
    """metrics.md: heading, the image counts, checkpoint, how the intervals were drawn, the table."""
    b = result["bootstrap"]
    how = (f"{b['level']:.0%} {b['method']} bootstrap intervals, {b['resamples']} resamples of the images, "
           f"seed {b['seed']}" if b["resamples"] else "no bootstrap intervals (--bootstrap 0)")
    undefined = "".join(f"- {n}: {s}, no AUROC or AUPRC; left out of the means\n"
                        for n, s in result["undefined"].items())
    return (f"# {heading}\n\n{counted}\n\ncheckpoint: `{result['checkpoint']}`\n\n{how}; the means are over "
            f"the {result['mean_over']} of {result['classes_total']} classes with both positives and "
            f"negatives.\n\n{markdown_table(result)}\n\n{undefined}")


def screen_table(result: dict) -> str:
    """A compact fixed-width table for the terminal."""
    width = max([len(n) for n in result["classes"]] + [len(mean_label(result)), 5])
    head = (f"{'class':<{width}}  {'AUROC':>5} {'95% CI':<11}  {'AUPRC':>5} {'95% CI':<11}  {'prev':>5} "
            f"{'pos':>5} {'neg':>5} {'ign':>5}  {'Brier':>6}")
    lines = [head]
    for name, c in result["classes"].items():
        counts = f"{_num(c['prevalence']):>5} {c['positives']:>5} {c['negatives']:>5} {c['ignored']:>5}"
        brier = f"{_num(c['brier'], 4):>6}"
        if c["status"] != "ok":
            lines.append(f"{name:<{width}}  {c['status']:<38}{counts}  {brier}")
            continue
        lines.append(f"{name:<{width}}  {_num(c['auroc']):>5} {_ci(c, 'auroc'):<11}  {_num(c['auprc']):>5} "
                     f"{_ci(c, 'auprc'):<11}  {counts}  {brier}")
    lines.append(f"{mean_label(result):<{width}}  {_num(result['mean_auroc']):>5} {_ci(result, 'mean_auroc'):<11}  "
                 f"{_num(result['mean_auprc']):>5} {_ci(result, 'mean_auprc'):<11}  {'':>23}  "
                 f"{_num(result['mean_brier'], 4):>6}")
    return "\n".join(lines)


def _label_cell(v: float) -> str:
    return "" if np.isnan(v) else f"{v:g}"


def write_predictions(path: Path, sources: Sequence[str], patients: Sequence[Optional[str]], names: list[str],
                      scores: np.ndarray, labels: np.ndarray) -> Path:
    """predictions.csv, atomically: path, patient_id, p_<name> (exact float repr, so the file
    reproduces the metrics), y_<name> (blank = unknown or ignored); one row per scored image."""
    with atomic.atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "patient_id", *(f"p_{n}" for n in names), *(f"y_{n}" for n in names)])
        for src, pid, p, y in zip(sources, patients, scores.astype(np.float64).tolist(), labels.tolist()):
            w.writerow([src, pid or "", *map(repr, p), *map(_label_cell, y)])
    return path
