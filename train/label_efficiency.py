"""Label efficiency in one command: test AUROC against the fraction of labelled training images.

Three arms, each at every label fraction and seed: the MAE-pretrained encoder fine-tuned
(``mae_finetune``), the same encoder frozen with a logistic-regression probe on its pooled
features (``linear_probe``, as ``python -m train.evaluate --linear_probe true`` does) and the
same model from random initialisation fine-tuned (``random_finetune``; layer-wise lr decay is
off for it, since no layer is pretrained). The seed picks the label subset and the
initialisation and shuffle. Every run is scored on the same patient-level test split (and
fine-tuning picks its best epoch on the same validation split): the split is a hash of the
patient id, so it does not depend on the seed or the fraction.

With no arguments it runs a small study on the demo data (run `python -m train.pretrain`
first). Every finished run is written atomically under OUTPUT_DIR/runs/<arm>_f<fraction>_s<seed>/
(result.json last), so a killed study continues at the next unfinished run (an unfinished
fine-tuning run resumes from its last checkpoint); OUTPUT_DIR/study.json records the settings,
and a rerun with other ones is an error rather than a mix.

Examples:
  python -m train.label_efficiency
  python -m train.label_efficiency --data /data/nih/images --labels Data_Entry_2017.csv \\
      --pretrained outputs/pretrain/checkpoint-00100000.pth --fractions 0.01,0.1,1 --seeds 0,1,2 \\
      --epochs 30 --output_dir outputs/label_efficiency

How seeds and the bootstrap combine: each cell is the mean over seeds of the test mean AUROC
(mean over the classes with positives and negatives in the test split); its 95% interval is
the percentile interval of the bootstrap replicates of all seeds' runs pooled (the same
resampled test images for every run), so it covers the test-set sampling and the variation
between seeds (label subset, initialisation). Writes label_efficiency.md (tables),
label_efficiency.json (every run's numbers) and label_efficiency.png (AUROC vs fraction).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from cxrfast import atomic, cli
from cxrfast.data.shards import is_prepared
from cxrfast.models import PRESETS, classifier
from cxrfast.models.checkpoints import CheckpointError, load_file, load_pretrained, saved_config

from . import bootstrap, checkpoints, config, engine, evaluate, finetune, inference, labelled, runtime
from .config import opt
from .dataset_options import DatasetOptions

PROG = "python -m train.label_efficiency"
ARMS = {"mae_finetune": "MAE fine-tuned", "linear_probe": "MAE linear probe",
        "random_finetune": "random init fine-tuned"}
# settings that do not change any run's numbers: they may differ between a study and its resumption
FREE_SETTINGS = ("output_dir", "num_workers", "device", "resamples", "bootstrap_seed", "keep_models",
                 "threads")


@dataclass
class StudyConfig(DatasetOptions):
    data: Optional[str] = opt(None, "a prepared folder, a folder of images, or a CSV with a 'path' column; "
                                    "none: the demo dataset")
    labels: Optional[str] = opt(None, "label CSV (not needed for a prepared folder); none: the demo labels")
    pretrained: Optional[str] = opt(None, "the MAE pretraining checkpoint; none: the demo's newest")
    output_dir: str = opt("outputs/label_efficiency", "where runs/, study.json and the report go")
    fractions: tuple[float, ...] = opt((0.01, 0.1, 1.0), "label fractions of the training split", maximum=1)
    seeds: tuple[int, ...] = opt((0, 1, 2), "seeds: each picks the label subset and the init/shuffle", minimum=0)
    arms: tuple[str, ...] = opt(tuple(ARMS), "which arms to run", choices=tuple(ARMS))
    split_fractions: tuple[float, ...] = opt((0.7, 0.1, 0.2), "patient-level train,val,test fractions",
                                             minimum=0, maximum=1)
    model: Optional[str] = opt(None, "encoder preset (default: the checkpoint's)", choices=sorted(PRESETS))
    img_size: Optional[int] = opt(None, "input size (default: the checkpoint's)", minimum=1)
    epochs: int = opt(50, "fine-tuning epochs of every run", minimum=1)
    min_steps: int = opt(0, "fine-tune a small fraction for more epochs, so that it makes at least this many "
                            "optimizer steps (0: the same epochs for every fraction)", minimum=0)
    warmup_epochs: float = opt(5, "fine-tuning warmup epochs", minimum=0)
    batch_size: int = opt(64, "fine-tuning batch size (lowered to the training images of a small fraction)",
                          minimum=1)
    blr: float = opt(5e-4, "fine-tuning base lr: lr = blr * batch / 256", minimum=0)
    lr: Optional[float] = opt(None, "fine-tuning absolute lr (overrides blr)", minimum=0)
    probe_l2: float = opt(1e-3, "L2 penalty of the linear probe", minimum=0)
    resamples: int = opt(1000, "bootstrap resamples of the test split", minimum=10)
    bootstrap_seed: int = opt(0, "seed of the bootstrap resamples (the same for every run)")
    keep_models: bool = opt(False, "keep each fine-tuning run's best.pth (else only its numbers and logs)")
    num_workers: int = opt(4, "data loader workers", minimum=0)
    device: str = opt("auto", "cuda, cpu or auto", choices=runtime.DEVICES)
    threads: Optional[int] = opt(None, "torch CPU threads (default: torch's, one per core); 1 is much faster on a "
                                       "CPU that other jobs share, where waiting threads spin", minimum=1)

    def validate(self) -> None:
        super().validate()
        for option, values in (("--fractions", self.fractions), ("--seeds", self.seeds), ("--arms", self.arms)):
            if not values:
                raise config.UsageError(f"{option}: give at least one")
            if len(set(values)) != len(values):
                raise config.UsageError(f"{option} {','.join(map(str, values))}: a value is repeated")
        for f in self.fractions:
            if not f > 0:
                raise config.UsageError(f"--fractions {f}: a label fraction must be in (0, 1]")
        cli.check_fractions(self.split_fractions, "--split_fractions")
        if self.model is not None and self.img_size is not None:
            engine.check_patch(self.model, self.img_size)


DEMO_OUTPUT = Path("outputs") / "label_efficiency_demo"
# sized to finish in a few minutes on 2 CPU cores: 27 runs of vit_tiny at the checkpoint's 128 px; one
# thread, since a tiny model gains little from two and a shared CPU makes waiting OpenMP threads spin; no
# warmup, since an epoch of a 1% subset is one step and warmup's first step has lr 0
DEMO = dict(output_dir=str(DEMO_OUTPUT), epochs=6, warmup_epochs=0, batch_size=8, lr=5e-4, num_workers=0, threads=1,
            resamples=500, split_fractions=finetune.DEMO["split_fractions"])


@dataclass(frozen=True)
class Arch:
    """The model every arm builds: the pretrained checkpoint's preset, size and channels."""

    model: str
    img_size: int
    in_chans: int


@dataclass(frozen=True)
class Run:
    arm: str
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}_f{self.fraction:g}_s{self.seed}"


@dataclass
class Labelled:
    """Label names and the train/val/test parts of one (fraction, seed), files or prepared shards."""

    names: list[str]
    prepared: bool
    parts: dict[str, Any]

    def count(self, split: str) -> int:
        part = self.parts[split]
        return len(part) if self.prepared else len(part.files)

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self.parts[split].labels, np.float64)

    def dataset(self, split: str, arch: Arch):
        from cxrfast.data.direct import ImageDataset
        from cxrfast.data.shards import PreparedDataset

        part = self.parts[split]
        if self.prepared:
            return PreparedDataset(part, img_size=arch.img_size, in_chans=arch.in_chans, train=False,
                                   with_labels=True)
        return ImageDataset(part.files, img_size=arch.img_size, in_chans=arch.in_chans, train=False,
                            labels=part.labels, substitute=False)  # a bad file is dropped with its labels


def main(argv: list[str] | None = None) -> dict:
    with config.user_errors():
        return _main(argv)


def _main(argv: list[str] | None) -> dict:
    cfg, explicit = config.parse(StudyConfig, argv, PROG, __doc__)
    cfg = with_demo(cfg, explicit)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise config.UsageError("run the study as one process (not under torchrun); each run uses this process")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    arch = architecture(cfg)
    study = Study(cfg, arch, runtime.setup(cfg.device).device)
    check_settings(Path(cfg.output_dir), settings(cfg, arch))
    results = study.run_all()
    return write_report(cfg, study, results)


def with_demo(cfg: StudyConfig, explicit: set[str]) -> StudyConfig:
    """No --data: the demo data, its labels and the demo pretraining's newest checkpoint."""
    if cfg.data is not None:
        if cfg.pretrained is None:
            raise config.UsageError("--pretrained: needed with --data (the MAE checkpoint the study is about)")
        return cfg
    latest = checkpoints.latest(finetune.DEMO_PRETRAIN) if cfg.pretrained is None else Path(cfg.pretrained)
    labels = finetune.DEMO_DATA / "labels.csv"
    if latest is None or not labels.is_file():
        raise config.UsageError(f"no demo pretraining checkpoint in {finetune.DEMO_PRETRAIN} (or no demo data in "
                                f"{finetune.DEMO_DATA}); run `python -m train.pretrain` first, or pass --data, "
                                "--labels and --pretrained")
    updates = {k: v for k, v in DEMO.items() if k not in explicit}
    updates.update(data=str(finetune.DEMO_DATA), labels=cfg.labels or str(labels), pretrained=str(latest))
    return dataclasses.replace(cfg, **updates)


def architecture(cfg: StudyConfig) -> Arch:
    """Preset, size and channels from the checkpoint's saved config (or the options)."""
    path = Path(cfg.pretrained)
    if not path.is_file():
        raise config.UsageError(f"--pretrained {path}: no such file")
    saved = saved_config(load_file(path))  # data only; CheckpointError names the file
    if cfg.model and saved.get("model") and saved["model"] != cfg.model:
        raise config.UsageError(f"--model {cfg.model} does not fit --pretrained {path}, a {saved['model']} "
                                "checkpoint; leave --model out")
    model = cfg.model or saved.get("model")
    if model is None:
        raise config.UsageError(f"--pretrained {path}: does not record its preset; pass --model")
    img_size = cfg.img_size or saved.get("img_size") or 224
    engine.check_patch(model, img_size)
    return Arch(model, int(img_size), int(saved.get("in_chans", 1)))


def settings(cfg: StudyConfig, arch: Arch) -> dict:
    """What decides every run's numbers: recorded in study.json, compared on a rerun."""
    out = {k: v for k, v in config.to_dict(cfg).items() if k not in FREE_SETTINGS}
    for key in ("data", "labels", "pretrained"):
        if out[key] is not None:
            out[key] = str(Path(out[key]).resolve())
    out.update(model=arch.model, img_size=arch.img_size, in_chans=arch.in_chans)
    return out


def check_settings(out: Path, current: dict) -> None:
    """Writes study.json for a new study; for an existing one, any other setting is an error."""
    path = out / "study.json"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(current, indent=2) + "\n")
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise config.UsageError(f"--output_dir {out}: cannot read {path}: {exc}") from None
    differ = [k for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    if differ:
        said = "; ".join(f"{k} {_show(recorded.get(k))} (now {_show(current.get(k))})" for k in differ)
        raise config.UsageError(f"--output_dir {out} holds a study with other settings: {said}; use another "
                                "--output_dir, or delete that folder to start over")


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


class Study:
    """The runs of one study, in order (seed, then fraction, then arm), each done once."""

    def __init__(self, cfg: StudyConfig, arch: Arch, device):
        self.cfg, self.arch, self.device = cfg, arch, device
        self.out = Path(cfg.output_dir)
        self._data: dict[tuple[float, int], Labelled] = {}
        self._probe: tuple[Any, Any] | None = None  # (encoder, test features), made on first use
        full = self.data(1.0, 0)
        self.names, self.train_total = full.names, full.count("train")
        self.test_labels_all = full.labels("test")
        if not self.train_total:
            raise config.UsageError(f"--data {cfg.data}: no image is in the training split")
        if not full.count("test"):
            raise config.UsageError(f"--split_fractions {_show(list(cfg.split_fractions))}: the test split of "
                                    f"{cfg.data} is empty")
        defined = [n for k, n in enumerate(self.names) if _two_values(self.test_labels_all[:, k])]
        if not defined:
            raise config.UsageError(f"--data {cfg.data}: no label has both positives and negatives in the test "
                                    f"split ({full.count('test')} images), so no AUROC is defined")
        self.runs = [Run(arm, f, s) for s in cfg.seeds for f in cfg.fractions for arm in cfg.arms]

    def data(self, fraction: float, seed: int) -> Labelled:
        """The parts with the training split subset to ``fraction`` by ``seed``, as fine-tuning makes them."""
        key = (fraction, seed)
        if key not in self._data:
            c = self.cfg
            if is_prepared(c.data):
                names, parts = labelled.load_prepared(c.data, fraction, seed)
                self._data[key] = Labelled(list(names), True, parts)
            else:
                if c.labels is None:
                    raise config.UsageError(f"--data {c.data}: --labels is required (unless --data is a prepared "
                                            "folder)")
                d = labelled.load(c.data, c.labels, c.label_format, c.uncertain, fraction,
                                  tuple(c.split_fractions), seed, labelled.protocol_of(c))
                self._data[key] = Labelled(list(d.names), False, d.splits)
        return self._data[key]

    def run_all(self) -> list[dict]:
        results = []
        for k, run in enumerate(self.runs, 1):
            results.append(self.run_once(run, k))
        return results

    def run_once(self, run: Run, k: int) -> dict:
        """A run's result: read back when finished before, else made and written (result.json last)."""
        folder = self.out / "runs" / run.name
        done = folder / "result.json"
        where = f"[{k}/{len(self.runs)}] {run.arm:<15} fraction {run.fraction:<5g} seed {run.seed}"
        if done.is_file():
            result = json.loads(done.read_text())
            print(f"{where}: test AUROC {_num(result['mean_auroc'])} (finished before)", flush=True)
            return result
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        data = self.data(run.fraction, run.seed)
        if run.arm == "linear_probe":
            labels, scores, unreadable = self.probe(data)
        else:
            labels, scores, unreadable = self.fine_tune(run, data, folder, where)
        result = self.record(run, data, labels, scores, unreadable, folder, time.perf_counter() - start)
        self.tidy(folder)  # after result.json: a study killed in between retrains nothing
        print(f"{where}: test AUROC {_num(result['mean_auroc'])} [{_num(result['mean_low'])}, "
              f"{_num(result['mean_high'])}], {_count(result['train_images'], 'training image')}, "
              f"{result['seconds']:.1f} s" + "".join(f"; {n}" for n in result["notes"]), flush=True)
        return result

    def batch_size(self, train_images: int) -> int:
        return max(1, min(self.cfg.batch_size, train_images))

    def epochs(self, train_images: int) -> int:
        """--epochs, or more where --min_steps asks for more steps than a small subset makes in them."""
        per_epoch = max(1, train_images // self.batch_size(train_images))
        return max(self.cfg.epochs, math.ceil(self.cfg.min_steps / per_epoch))

    def finetune_argv(self, run: Run, folder: Path, train_images: int) -> list[str]:
        c, a = self.cfg, self.arch
        argv = ["--data", c.data, "--label_format", c.label_format, "--uncertain", c.uncertain,
                "--label_fraction", repr(run.fraction), "--split_fractions", _show(list(c.split_fractions)),
                "--seed", str(run.seed), "--model", a.model, "--img_size", str(a.img_size), "--in_chans",
                str(a.in_chans), "--epochs", str(self.epochs(train_images)), "--warmup_epochs", repr(c.warmup_epochs),
                "--batch_size", str(self.batch_size(train_images)), "--blr", repr(c.blr),
                "--num_workers", str(c.num_workers), "--device", c.device, "--output_dir", str(folder),
                "--resume", "auto", "--keep_last", "1"]
        if c.labels is not None:
            argv += ["--labels", c.labels] + labelled.protocol_argv(c)
        if c.lr is not None:
            argv += ["--lr", repr(c.lr)]
        if run.arm == "mae_finetune":
            argv += ["--pretrained", c.pretrained]
        else:
            argv += ["--layer_decay", "1.0"]  # every layer is random: no reason to slow the early ones
        return argv

    def fine_tune(self, run: Run, data: Labelled, folder: Path, where: str):
        """train.finetune in this process (its output goes to the run's log.txt), then its
        best.pth scored on the test split."""
        log = folder / "log.txt"
        argv = self.finetune_argv(run, folder, data.count("train"))
        with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            print(f"$ python -m train.finetune {' '.join(argv)}", flush=True)
            try:
                finetune.main(argv)
            except SystemExit as exc:
                code = exc.code
            else:
                code = 0
        if code:
            print(_failed(where, log, code), file=sys.stderr)
            raise SystemExit(code if isinstance(code, int) else 1)
        return self.score_classifier(folder / "best.pth")

    def tidy(self, folder: Path) -> None:
        """A finished run keeps its numbers, logs and config; its checkpoints go (best.pth with --keep_models)."""
        for path in checkpoints.list_checkpoints(folder) + [folder / "final.pth"]:  # none for the probe
            path.unlink(missing_ok=True)
        if not self.cfg.keep_models:
            (folder / "best.pth").unlink(missing_ok=True)

    def test_dataset(self):
        return self.data(1.0, 0).dataset("test", self.arch)

    def score_classifier(self, path: Path):
        """(labels, scores, unreadable) of the test split under the fine-tuned model."""
        ckpt = load_file(path)
        names = list(ckpt.get("label_names", []))
        if names != self.names:
            raise CheckpointError(f"{path}: predicts {names}, the study's labels are {self.names}")
        saved = ckpt.get("config", {})
        model = classifier(self.arch.model, img_size=self.arch.img_size, in_chans=self.arch.in_chans,
                           num_classes=len(names), global_pool=saved.get("global_pool", True), drop_path_rate=0.0)
        evaluate.load_classifier(model, ckpt, path, self.arch.model)
        pred = inference.predict(model.to(self.device), self.test_dataset(), self.device, self.cfg.batch_size,
                                 num_workers=self.cfg.num_workers)
        return self._scored(pred, pred.values)

    def _scored(self, pred, scores: np.ndarray):
        if not len(pred.indices):
            raise config.UsageError(f"--data {self.cfg.data}: no image of the test split could be read")
        return self.test_labels_all[pred.indices], scores, pred.unreadable

    def probe(self, data: Labelled):
        """A logistic-regression probe on the frozen encoder's pooled features of this subset."""
        if self._probe is None:
            model = classifier(self.arch.model, img_size=self.arch.img_size, in_chans=self.arch.in_chans,
                               num_classes=len(self.names), global_pool=True, drop_path_rate=0.0)
            load_pretrained(model, self.cfg.pretrained, name=self.cfg.pretrained)
            model.to(self.device)
            test = inference.predict(model, self.test_dataset(), self.device, self.cfg.batch_size, features=True,
                                     num_workers=self.cfg.num_workers)
            self._probe = (model, test)
        model, test = self._probe
        train = inference.predict(model, data.dataset("train", self.arch), self.device, self.cfg.batch_size,
                                  features=True, num_workers=self.cfg.num_workers)
        if not len(train.indices):
            raise config.UsageError(f"--data {self.cfg.data}: no training image of the subset could be read")
        y = data.labels("train")[train.indices]
        labels, _, unreadable = self._scored(test, test.values)
        return labels, evaluate.linear_probe(train.values, y, test.values, self.cfg.probe_l2), unreadable

    def record(self, run: Run, data: Labelled, labels: np.ndarray, scores: np.ndarray, unreadable: int,
               folder: Path, seconds: float) -> dict:
        """Writes the run's test scores (scores.npz) and then its numbers (result.json), atomically."""
        with atomic.atomic_open(folder / "scores.npz") as f:
            np.savez(f, labels=labels, scores=scores)
        per_class, mean = bootstrap.intervals(labels, scores, "auroc", self.cfg.resamples, self.cfg.bootstrap_seed)
        train_images = data.count("train")
        tuned = run.arm != "linear_probe"
        result = {"arm": run.arm, "fraction": run.fraction, "seed": run.seed, "train_images": train_images,
                  "batch_size": self.batch_size(train_images) if tuned else None,
                  "epochs": self.epochs(train_images) if tuned else None,
                  "test_images": len(labels), "test_unreadable": unreadable, "mean_auroc": mean.value,
                  "mean_low": mean.low, "mean_high": mean.high, "resamples": self.cfg.resamples,
                  "bootstrap_seed": self.cfg.bootstrap_seed,
                  "classes": {n: iv.as_dict() for n, iv in zip(self.names, per_class)},
                  "notes": few_labels_notes(run.fraction, self.train_total, data.labels("train"), self.names),
                  "seconds": round(seconds, 2)}
        atomic.write_text(folder / "result.json", json.dumps(_clean(result), indent=2) + "\n")
        return _clean(result)


def _failed(where: str, log: Path, code: Any) -> str:
    """The error line of a failed run: its own last error line and where its log is."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    said = code if isinstance(code, str) else next((ln for ln in reversed(lines) if ln.startswith("error:")),
                                                     lines[-1] if lines else f"exit {code}")
    return (f"error: {' '.join(where.split())} failed: {said.removeprefix('error: ')} (log: {log}); fix it and rerun the "
            "same command to continue")


def _two_values(y: np.ndarray) -> bool:
    y = y[~np.isnan(y)]
    return bool((y > 0.5).any() and (y <= 0.5).any())


def few_labels_notes(fraction: float, total: int, train_labels: np.ndarray, names: list[str]) -> list[str]:
    """What a small subset lacks: a rounded-up image count, labels without positives (or negatives)."""
    notes = []
    if total * fraction < 0.5:
        notes.append(f"{fraction:g} of {total} training images is {total * fraction:.2f}: trained on 1 image "
                     "(the minimum)")
    lacking = [n for k, n in enumerate(names) if not _two_values(train_labels[:, k])]
    if lacking:
        notes.append(f"no positive or no negative training label for {', '.join(lacking)}")
    return notes


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN becomes null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


# ---- summary: seeds pooled, tables, figure ----

def _mean_of_defined(reps: np.ndarray, defined: np.ndarray) -> np.ndarray:
    """(R,) mean over the classes defined in the test split, per replicate (NaN where none is)."""
    cols = reps[:, defined]
    count = np.isfinite(cols).sum(1)
    total = np.where(np.isfinite(cols), cols, 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def summarise(cfg: StudyConfig, out: Path, runs: list[dict], names: list[str]) -> list[dict]:
    """One cell per arm and fraction: the seed mean and the pooled-replicate interval."""
    cells = []
    for arm in cfg.arms:
        for fraction in cfg.fractions:
            group = [r for r in runs if r["arm"] == arm and r["fraction"] == fraction]
            pooled, pooled_classes = [], []
            for r in group:
                with np.load(out / "runs" / Run(arm, fraction, r["seed"]).name / "scores.npz") as z:
                    labels, scores = z["labels"], z["scores"]
                reps = bootstrap.replicates(labels, scores, "auroc", cfg.resamples, cfg.bootstrap_seed)
                defined = np.isfinite(bootstrap.point(labels, scores, "auroc"))
                pooled.append(_mean_of_defined(reps, defined))
                pooled_classes.append(reps)
            means = np.array([np.nan if r["mean_auroc"] is None else r["mean_auroc"] for r in group])
            low, high = bootstrap.percentile_interval(np.concatenate(pooled))
            reps_all = np.concatenate(pooled_classes)
            classes = {}
            for k, n in enumerate(names):
                vals = np.array([np.nan if r["classes"][n]["value"] is None else r["classes"][n]["value"]
                                 for r in group])
                lo, hi = bootstrap.percentile_interval(reps_all[:, k])
                classes[n] = {"value": float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan"),
                              "low": lo, "high": hi}
            cells.append({"arm": arm, "fraction": fraction, "seeds": [r["seed"] for r in group],
                          "train_images": sorted({r["train_images"] for r in group}),
                          "mean_auroc": float(np.nanmean(means)), "low": low, "high": high,
                          "seed_sd": float(np.nanstd(means, ddof=1)) if len(group) > 1 else float("nan"),
                          "classes": classes})
    return cells


def markdown(cfg: StudyConfig, cells: list[dict], runs: list[dict], names: list[str], test_images: int) -> str:
    fr = list(cfg.fractions)
    images = {f: next(c["train_images"] for c in cells if c["fraction"] == f) for f in fr}
    head = [f"{f:.0%}" if f >= 0.01 else f"{f:g}" for f in fr]
    lines = ["# Label efficiency: test mean AUROC", "",
             f"Pretrained `{cfg.pretrained}`; data `{cfg.data}`, labels `{cfg.labels}`; test split: {test_images} "
             f"images (patient-level, the same for every run); seeds {_show(list(cfg.seeds))}; fine-tuning "
             f"{cfg.epochs} epochs" + (f" (at least {cfg.min_steps} steps)" if cfg.min_steps else "") + ".", "",
             "| arm | " + " | ".join(f"{h} ({'/'.join(map(str, images[f]))} image{'' if images[f] == [1] else 's'})" for h, f in zip(head, fr)) + " |",
             "|---|" + "---|" * len(fr)]
    for arm in cfg.arms:
        row = [c for c in cells if c["arm"] == arm]
        lines.append(f"| {ARMS[arm]} | " + " | ".join(f"{_num(c['mean_auroc'])} [{_num(c['low'])}, "
                                                      f"{_num(c['high'])}]" for c in row) + " |")
    lines += ["", "Each cell: the mean over seeds of the test mean AUROC (over the classes with positives and "
              "negatives in the test split) and its 95% interval: the percentile interval of the pooled bootstrap "
              f"replicates of every seed's run ({cfg.resamples} resamples of the test images each, the same "
              "resamples for every run), so it spans the test-set sampling and the seed-to-seed variation (label "
              "subset, initialisation). The seed standard deviation and every run's own interval are in "
              "label_efficiency.json.", "", "## Per-class test AUROC (mean over seeds)", "",
              "| arm | fraction | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for c in cells:
        lines.append(f"| {ARMS[c['arm']]} | {c['fraction']:g} | "
                     + " | ".join(_num(c["classes"][n]["value"]) for n in names) + " |")
    notes = sorted({f"fraction {r['fraction']:g}, seed {r['seed']}: {n}" for r in runs for n in r["notes"]})
    if notes:
        lines += ["", "## Too few labels", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def figure(cfg: StudyConfig, cells: list[dict], path: Path) -> Path:
    """Mean test AUROC against the label fraction (log x axis), one line per arm, the intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    for arm in cfg.arms:
        row = [c for c in cells if c["arm"] == arm]
        x = np.array([c["fraction"] for c in row])
        y = np.array([c["mean_auroc"] for c in row])
        err = np.array([[c["mean_auroc"] - c["low"] for c in row], [c["high"] - c["mean_auroc"] for c in row]])
        ax.errorbar(x, y, yerr=np.nan_to_num(np.clip(err, 0, None)), marker="o", capsize=4, label=ARMS[arm])
    ax.set_xscale("log")
    ax.set_xticks(list(cfg.fractions), [f"{f:.0%}" if f >= 0.01 else f"{f:g}" for f in cfg.fractions])
    ax.set_xlabel("fraction of training labels (log scale)")
    ax.set_ylabel("test mean AUROC")
    ax.set_title(f"Label efficiency ({len(cfg.seeds)} seeds, 95% bootstrap intervals)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    with atomic.atomic_open(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def write_report(cfg: StudyConfig, study: Study, runs: list[dict]) -> dict:
    out = Path(cfg.output_dir)
    cells = summarise(cfg, out, runs, study.names)
    report = _clean({"settings": settings(cfg, study.arch), "label_names": study.names,
                     "train_images_total": study.train_total, "test_images": len(study.test_labels_all),
                     "method": "cell = mean over seeds of the run's test mean AUROC; interval = 95% percentile "
                               "interval of all seeds' bootstrap replicates pooled (same resamples per run)",
                     "summary": cells, "runs": runs})
    atomic.write_text(out / "label_efficiency.json", json.dumps(report, indent=2) + "\n")
    text = markdown(cfg, cells, runs, study.names, len(study.test_labels_all))
    atomic.write_text(out / "label_efficiency.md", text)
    figure(cfg, cells, out / "label_efficiency.png")
    print(f"\n{text}\nwritten: {out / 'label_efficiency.md'}, {out / 'label_efficiency.json'}, "
          f"{out / 'label_efficiency.png'}", flush=True)
    return report


if __name__ == "__main__":
    main()
