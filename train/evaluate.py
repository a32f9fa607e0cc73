"""Evaluate a fine-tuned CXRBase classifier, or linear-probe a pretrained encoder.

Writes into --output_dir: predictions.csv (one row per scored image: path, patient id, a
probability p_<label> and the label y_<label> of each class, blank = unknown), per-class
AUROC and AUPRC with seeded 95% bootstrap intervals, prevalence, counts and Brier score
(a table on screen, metrics.json, metrics.md), and roc.png, pr.png, calibration.png. A class
with no positives (or no negatives) in the split is reported as such, and the means are over
the other classes. With no arguments it evaluates the demo fine-tuning result
(`outputs/finetune_demo/best.pth`) on the demo test split.

Examples:
  python -m train.evaluate
  python -m train.evaluate --checkpoint outputs/finetune/best.pth --split test --bootstrap 2000 --seed 1
  python -m train.evaluate --linear_probe true --checkpoint outputs/pretrain/checkpoint-00100000.pth \\
      --data /data/nih/images --labels Data_Entry_2017.csv
  python -m train.evaluate --checkpoint outputs/finetune/best.pth --data /data/nih/images \\
      --labels Data_Entry_2017.csv --split_files train_val_list.txt,test_list.txt --view PA

The data, labels and split default to those the checkpoint was fine-tuned with, so the test
split is the same patient-level split the fine-tuning run held out. Another dataset's labels
(--labels) are matched to the checkpoint's by name through a shared vocabulary (NIH Effusion =
CheXpert Pleural Effusion, ...; --labels_map for more): the labels both share are scored, the
others are named and left out, never counted as negatives. An image that cannot be
read is left out together with its labels and listed in errors.csv; the summary says how
many were evaluated ("evaluated 19 of 22 images; 3 unreadable, see .../errors.csv"). Under
torchrun the images are shared out across the ranks and the scores gathered.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cxrfast import atomic, cli, dicom
from cxrfast.data.direct import ImageDataset
from cxrfast.data import label_formats
from cxrfast.data.label_formats import UNCERTAIN_HELP, VOTES, vocabulary
from cxrfast.data.labels import FORMATS
from cxrfast.data.shards import PreparedDataset, is_prepared
from cxrfast.models import PRESETS, classifier
from cxrfast.models.checkpoints import CheckpointError, load_file, load_pretrained, unwrap

from . import checkpoints, config, engine, inference, labelled, logs, metrics, pictures, report, runtime
from .config import opt



@dataclass
class EvaluateConfig:
    checkpoint: Optional[str] = opt(None, "fine-tuned model (best.pth / final.pth), or a pretrained checkpoint "
                                          "with --linear_probe; none: the demo fine-tuning result")
    data: Optional[str] = opt(None, "images (default: those the checkpoint was fine-tuned on)")
    labels: Optional[str] = opt(None, "label CSV (default: the checkpoint's)")
    label_format: Optional[str] = opt(None, f"{label_formats.help_text()} (default: the checkpoint's)",
                                      choices=FORMATS)
    uncertain: Optional[str] = opt(None, f"{UNCERTAIN_HELP} (default: the checkpoint's)")
    label_set: Optional[str] = opt(None, labelled.HELP["label_set"] + " (default: the checkpoint's)")
    labels_map: Optional[str] = opt(None, labelled.HELP["labels_map"] + " (default: the checkpoint's)")
    split_files: Optional[tuple[str, ...]] = opt(None, labelled.HELP["split_files"] + " (default: the checkpoint's)")
    test_labels: Optional[str] = opt(None, labelled.HELP["test_labels"] + " (default: the checkpoint's)")
    view: Optional[str] = opt(None, labelled.HELP["view"] + " (default: the checkpoint's)")
    rad_vote: Optional[str] = opt(None, labelled.HELP["rad_vote"] + " (default: the checkpoint's)", choices=VOTES)
    split: str = opt("test", "which split to evaluate: train, val or test", choices=("train", "val", "test"))
    split_fractions: Optional[tuple[float, ...]] = opt(None, "patient split fractions (default: the checkpoint's)",
                                                       minimum=0, maximum=1)
    output_dir: str = opt("outputs/evaluate", "where predictions.csv, metrics.json, metrics.md, errors.csv and "
                                              "roc.png, pr.png, calibration.png go")
    bootstrap: int = opt(1000, "bootstrap resamples of the images for the 95 percent intervals (0: no intervals)",
                         minimum=0)
    linear_probe: bool = opt(False, "fit a logistic-regression probe on frozen encoder features of the train split")
    probe_l2: float = opt(1e-3, "L2 penalty of the linear probe", minimum=0)
    model: Optional[str] = opt(None, "encoder preset when the checkpoint does not say", choices=sorted(PRESETS))
    img_size: Optional[int] = opt(None, "input size when the checkpoint does not say", minimum=1)
    batch_size: int = opt(64, "inference batch size", minimum=1)
    num_workers: int = opt(0, "data loader workers", minimum=0)
    seed: int = opt(0, "seed of the bootstrap resamples (the same seed gives the same intervals)")
    device: str = opt("auto", "cuda, cpu or auto", choices=runtime.DEVICES)

    def validate(self) -> None:
        if self.img_size is not None:
            engine.check_patch(self.model or "vit_base", self.img_size)
        if self.split_fractions is not None:
            cli.check_fractions(self.split_fractions, "--split_fractions")
        labelled.check_options(self.uncertain, self.label_set, self.labels_map, self.view)


def main(argv: list[str] | None = None) -> dict:
    with config.user_errors():
        cfg, _ = config.parse(EvaluateConfig, argv, "python -m train.evaluate", __doc__)
        path = checkpoints.given_or_demo(cfg.checkpoint)
        rt = runtime.setup(cfg.device)
        try:
            return evaluate(cfg, path, rt)
        finally:
            runtime.teardown()


def _pick(value, saved: dict, key: str, default=None):
    return value if value is not None else saved.get(key, default)


# label options that describe one dataset: taken from the checkpoint only when --labels is not
# given (another CSV is another dataset); --view is about the model, so it is always taken
DATASET_OPTIONS = ("label_format", "uncertain", "label_set", "labels_map", "split_files", "test_labels", "rad_vote")


def label_options(cfg: EvaluateConfig, saved: dict) -> dict:
    """The label options to read the data with: given ones, else the checkpoint's (see DATASET_OPTIONS)."""
    inherit = saved if cfg.labels is None else {}
    options = {k: _pick(getattr(cfg, k), inherit, k) for k in DATASET_OPTIONS}
    options["view"] = _pick(cfg.view, saved, "view")
    return options


def evaluate(cfg: EvaluateConfig, path: Path, rt: runtime.Runtime) -> dict:
    ckpt = load_file(path)  # data only: a checkpoint cannot run code
    saved = ckpt.get("config", {}) if isinstance(ckpt, dict) else {}
    data_src, labels_src = _pick(cfg.data, saved, "data"), _pick(cfg.labels, saved, "labels")
    prepared = is_prepared(data_src)
    if not data_src or not (labels_src or prepared):
        raise config.UsageError("--data and --labels are needed (the checkpoint does not name them)")
    if prepared:
        label_names, parts = labelled.load_prepared(data_src)
        data = labelled.LabelledData(label_names, {})
        split, train_part = parts[cfg.split], parts["train"]
        size = len(split)
    else:
        fractions = tuple(_pick(cfg.split_fractions, saved, "split_fractions", (0.7, 0.1, 0.2)))
        opts = label_options(cfg, saved)
        data = labelled.load(data_src, labels_src, opts["label_format"] or "auto", opts["uncertain"] or "ones", 1.0,
                             fractions, cfg.seed,
                             labelled.protocol(opts["label_set"], opts["labels_map"], opts["split_files"],
                                               opts["test_labels"], opts["view"], opts["rad_vote"]))
        split, train_part = data.splits[cfg.split], data.splits["train"]
        size = len(split.files)
    if not size:
        raise config.UsageError(f"--split {cfg.split}: no image of {data_src} is in the {cfg.split} split")
    model_name = _pick(cfg.model, saved, "model", "vit_base")
    img_size = _pick(cfg.img_size, saved, "img_size", 224)
    in_chans = saved.get("in_chans", 1)
    names = list(ckpt.get("label_names", data.names)) if not cfg.linear_probe else list(data.names)
    where = f"--data {data_src}" if prepared else f"--labels {labels_src}"
    pairs, dropped, ignored = label_columns(names, list(data.names), where)
    model = classifier(model_name, img_size=img_size, in_chans=in_chans, num_classes=len(names),
                       global_pool=saved.get("global_pool", True), drop_path_rate=0.0)
    if cfg.linear_probe:
        load_pretrained(model, ckpt, name=str(path))
    else:
        load_classifier(model, ckpt, path, model_name)
    model.to(rt.device)

    def ds(part):
        if prepared:
            return PreparedDataset(part, img_size=img_size, in_chans=in_chans, train=False, with_labels=True)
        return ImageDataset(part.files, img_size=img_size, in_chans=in_chans, train=False, labels=part.labels,
                            substitute=False)  # a bad file is dropped with its labels, never replaced

    out = Path(cfg.output_dir)
    errors_csv = out / "errors.csv"
    failed: list = []
    if cfg.linear_probe:
        feats_train = inference.predict(model, ds(train_part), rt.device, cfg.batch_size, features=True,
                                        num_workers=cfg.num_workers)
        pred = inference.predict(model, ds(split), rt.device, cfg.batch_size, features=True,
                                 num_workers=cfg.num_workers)
        failed += feats_train.failed
        if len(pred.indices) and len(feats_train.indices):
            scores = linear_probe(feats_train.values, train_part.labels[feats_train.indices], pred.values,
                                  cfg.probe_l2)
    else:
        pred = inference.predict(model, ds(split), rt.device, cfg.batch_size, num_workers=cfg.num_workers)
        scores = pred.values
    failed = pred.failed + failed
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        inference.write_errors(errors_csv, failed)  # always rewritten: no stale rows from an earlier run
    if not len(pred.indices) or (cfg.linear_probe and not len(feats_train.indices)):
        which = f"the {cfg.split} split" if not len(pred.indices) else "the train split (for the probe)"
        raise SystemExit(f"error: no image of {which} could be read; see {errors_csv}")
    # the labels of exactly the images that were scored, for the labels both sides share, in the
    # checkpoint's order (a checkpoint label the data lacks is dropped, never scored as negative)
    keep, cols = [m for m, _ in pairs], [d for _, d in pairs]
    labels = np.asarray(split.labels)[pred.indices][:, cols]
    scores, names = scores[:, keep], [names[m] for m in keep]
    try:
        metrics.check_finite(scores)
    except ValueError as exc:  # NaN/inf scores: a diverged model, not a user mistake; every rank stops
        if rt.main:
            print(f"error: {path}: {exc}", file=sys.stderr)
        raise SystemExit(3) from None
    counted = summary_line(len(pred.indices), size, pred.unreadable, errors_csv)
    if cfg.linear_probe and feats_train.unreadable:
        counted += f" (and {feats_train.unreadable} of the probe's train split)"
    if ignored:
        counted += f"; label columns not in the checkpoint, ignored: {', '.join(ignored)}"
    if dropped:
        counted += f"; checkpoint labels not in the data, dropped: {', '.join(dropped)}"
    for note in data.notes:
        counted += f"; {note}"
    facts = dict(checkpoint=str(path), split=cfg.split, images=len(pred.indices), images_in_split=size,
                 unreadable=pred.unreadable, errors=str(errors_csv), ignored_labels=ignored, dropped_labels=dropped,
                 mode="linear_probe" if cfg.linear_probe else "classifier", model=model_name)
    if not rt.main:  # rank 0 alone computes the intervals and writes the report
        return facts
    result = report.build(labels, scores, names, cfg.split, cfg.bootstrap, cfg.seed)
    result.update(facts)
    sources, patients = identities(split, pred.indices, prepared)
    written = write_report(out, result, counted, scores, labels, sources, patients)
    logs.announce(f"{result['mode']} on the {cfg.split} split: {counted}\n{report.screen_table(result)}\n"
                  f"written: {', '.join(map(str, written))}, {errors_csv}", rt.main)
    return result


def identities(split, indices: np.ndarray, prepared: bool) -> tuple[list[str], list[Optional[str]]]:
    """(source path, patient id or None) of each scored image: the prepared index's columns,
    or the label CSV's patient column with the DICOM header's PatientID where the CSV has none."""
    if prepared:
        root = Path(split.meta.get("source", ""))
        patients = split.column("patient_id", indices) if "patient_id" in split.table.columns else [""] * len(indices)
        return [str(root / s) for s in split.sources(indices)], [p or None for p in patients]
    files = [split.files[i] for i in indices]
    given = [split.patients[i] for i in indices] if split.patients else [None] * len(files)
    return [str(f) for f in files], [pid or _header_patient(f) for pid, f in zip(given, files)]


def _header_patient(path: Path) -> Optional[str]:
    """PatientID (0010,0020) of a DICOM file; None for other files or when it is empty."""
    try:
        return dicom.read_header(path).get("patient_id") or None
    except (dicom.DicomError, OSError):
        return None


def write_report(out: Path, result: dict, counted: str, scores: np.ndarray, labels: np.ndarray,
                 sources: list[str], patients: list[Optional[str]]) -> list[Path]:
    """predictions.csv, metrics.json, metrics.md and the three figures, each atomically."""
    names = list(result["classes"])
    heading = f"{result['mode']} on the {result['split']} split"
    written = [report.write_predictions(out / "predictions.csv", sources, patients, names, scores, labels),
               atomic.write_text(out / "metrics.json", json.dumps(result, indent=2, allow_nan=False)),
               atomic.write_text(out / "metrics.md", report.markdown(result, heading, counted))]
    return written + figures(out, result, scores, labels)


def figures(out: Path, result: dict, scores: np.ndarray, labels: np.ndarray) -> list[Path]:
    """roc.png, pr.png and calibration.png, titled with the checkpoint and split; a class
    without a curve is a legend line that says why."""
    ckpt = Path(result["checkpoint"])
    title = (f"{result['mode']} {ckpt.parent.name}/{ckpt.name} ({result['model']}), "
             f"{result['split']} split, {result['images']} images")
    roc, pr, calibration = {}, {}, {}
    for j, (name, c) in enumerate(result["classes"].items()):
        y, s = labels[:, j], scores[:, j]
        if c["status"] == "ok":
            roc[name] = (*metrics.roc_curve(y, s), c["auroc"])
            pr[name] = (*metrics.pr_curve(y, s), c["auprc"], c["prevalence"])
        if c["brier"] is not None:
            calibration[name] = (*metrics.reliability(y, s), c["brier"])
    undefined = result["undefined"]
    no_labels = {n: why for n, why in undefined.items() if result["classes"][n]["brier"] is None}
    return [pictures.roc_figure(roc, out / "roc.png", f"ROC: {title}", undefined),
            pictures.pr_figure(pr, out / "pr.png", f"precision-recall: {title}", undefined),
            pictures.reliability_figure(calibration, out / "calibration.png", f"calibration: {title}", no_labels)]


def label_columns(names: list[str], columns: list[str], source: str) -> tuple[list[tuple[int, int]], list[str], list[str]]:
    """Pairs each of the model's label ``names`` with the data's column of the same label (by
    name, never by position, through the shared vocabulary: NIH Effusion = CheXpert Pleural
    Effusion). Returns (model index, data column) pairs, the model's labels the data lacks
    (dropped from the evaluation) and the data columns left over. No shared label is a UsageError."""
    pairs, dropped = [], []
    for m, n in enumerate(names):
        d = vocabulary.find(n, columns)
        if d is None or d in [c for _, c in pairs]:
            dropped.append(n)
        else:
            pairs.append((m, d))
    if not pairs:
        raise config.UsageError(f"{source}: shares no label with the checkpoint (its labels: {', '.join(names)}; "
                                f"the data's: {', '.join(columns)}); rename with --labels_map")
    used = {d for _, d in pairs}
    return pairs, dropped, [c for i, c in enumerate(columns) if i not in used]


def load_classifier(model: torch.nn.Module, ckpt, path: Path, model_name: str) -> None:
    """Loads a fine-tuned classifier's weights exactly (every key, every shape).

    A pretraining (MAE) checkpoint has an encoder and a decoder but no classifier head: it is
    a UsageError that points to ``--linear_probe true``. Any other misfit is a CheckpointError
    naming the file."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, not a dict of tensors)")
    state = unwrap(ckpt)
    mae = any(k.startswith("decoder") or k == "mask_token" for k in state) and "head.weight" not in state
    if ckpt.get("kind") == "pretrain" or mae:
        raise config.UsageError(f"--checkpoint {path}: a pretraining checkpoint (no classifier head); evaluate its "
                                "encoder with --linear_probe true, or fine-tune it first (python -m train.finetune)")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # missing / unexpected keys or other shapes
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: does not fit a {model_name} classifier with {model.head.out_features} "
                              f"labels ({first})") from None


def summary_line(evaluated: int, total: int, unreadable: int, errors_csv: Path) -> str:
    """``evaluated 19 of 22 images; 3 unreadable, see errors.csv`` (the counts every report gives)."""
    line = f"evaluated {evaluated} of {total} images"
    return line + (f"; {unreadable} unreadable, see {errors_csv}" if unreadable else "")


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, l2: float) -> np.ndarray:
    """Multi-label logistic regression on standardised features (full-batch L-BFGS)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x = torch.tensor((train_x - mean) / std, dtype=torch.float64)
    y = torch.tensor(np.nan_to_num(train_y), dtype=torch.float64)
    valid = torch.tensor(~np.isnan(train_y), dtype=torch.float64)
    w = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    opt_ = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt_.zero_grad()
        bce = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")
        loss = (bce * valid).sum() / valid.sum().clamp(min=1) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt_.step(closure)
    with torch.no_grad():
        logits = torch.tensor((eval_x - mean) / std, dtype=torch.float64) @ w + b
    return torch.sigmoid(logits).numpy()




if __name__ == "__main__":
    main()
