"""Probabilities (and pooled encoder features) of a folder of chest X-rays, one row per image.

Examples:
  python -m train.predict
  python -m train.predict --checkpoint outputs/finetune/best.pth --data /data/new_images --out preds.csv
  python -m train.predict --checkpoint best.pth --data list.csv --embeddings feats.npy
  python -m train.predict --checkpoint outputs/pretrain/checkpoint-00100000.pth --data /data/images \\
      --embeddings feats.parquet

--data is a folder (DICOM, PNG, JPEG, searched recursively) or a CSV with a `path` column
(relative paths resolve against the CSV's folder). DICOM goes through the display pipeline
(VOI, MONOCHROME1), as in training. The image size, channels, pooling and normalisation come
from the checkpoint; a config its weights contradict is an error.

--out gets one row per readable image: `path`, then one probability column per label of the
checkpoint. An unreadable image has no row: it is listed in `<out stem>.errors.csv` beside
--out (path, error; rewritten on every run) and counted in the summary line. --embeddings
writes the pooled features the classifier head sees (fc_norm of the mean patch token, or the
CLS token, as the checkpoint was trained) as a float32 (N, D) .npy with `<stem>.index.csv`
beside it (row, path), or as a .parquet with a `path` and an `embedding` column (needs
pyarrow). A pretraining (MAE) checkpoint has no classifier head: it gives embeddings only, and
no probabilities are written. Every file is written atomically. With no arguments it runs the
demo fine-tuning result (`outputs/finetune_demo/best.pth`) on `outputs/demo_dicom`.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from cxrfast import atomic, cli
from cxrfast.data.direct import ImageDataset

from . import checkpoints, config, inference, logs, runtime
from .config import opt

DEMO_DATA = Path("outputs") / "demo_dicom"
EMBEDDING_SUFFIXES = (".npy", ".parquet")


@dataclass
class PredictConfig:
    checkpoint: Optional[str] = opt(None, "fine-tuned model (best.pth), or a pretraining checkpoint with "
                                          "--embeddings; none: the demo fine-tuning result")
    data: Optional[str] = opt(None, "folder of images (DICOM, PNG, JPEG) or a CSV with a 'path' column; "
                                    "none: the demo images")
    out: str = opt("outputs/predict/predictions.csv", "probabilities CSV (errors go to <out stem>.errors.csv)")
    embeddings: Optional[str] = opt(None, "also write the pooled encoder features: a .npy (+ <stem>.index.csv) "
                                          "or a .parquet (needs pyarrow)")
    batch_size: int = opt(64, "inference batch size", minimum=1)
    num_workers: int = opt(0, "data loader workers", minimum=0)
    device: str = opt("auto", "cuda, cpu or auto", choices=runtime.DEVICES)

    def validate(self) -> None:
        inference.check_output(self.out, "--out")
        if self.embeddings is not None:
            check_embeddings_path(self.embeddings)


def check_embeddings_path(path: str) -> Path:
    """--embeddings: a writable .npy or .parquet path, and pyarrow importable for .parquet."""
    p = inference.check_output(path, "--embeddings")
    if p.suffix not in EMBEDDING_SUFFIXES:
        raise config.UsageError(f"--embeddings {path}: must end in .npy or .parquet")
    if p.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise config.UsageError(f"--embeddings {path}: .parquet needs pyarrow (pip install pyarrow); "
                                    "or write a .npy") from None
    return p


def errors_path(out: Path) -> Path:
    """``preds.csv`` -> ``preds.errors.csv`` (beside it, named after it)."""
    return out.with_name(f"{out.stem}.errors.csv")


def index_path(embeddings: Path) -> Path:
    """``feats.npy`` -> ``feats.index.csv``: row -> path of the embedding rows."""
    return embeddings.with_name(f"{embeddings.stem}.index.csv")


def main(argv: list[str] | None = None) -> dict:
    with config.user_errors():
        cfg, _ = config.parse(PredictConfig, argv, "python -m train.predict", __doc__)
        path = checkpoints.given_or_demo(cfg.checkpoint)
        data = cfg.data if cfg.data is not None else str(DEMO_DATA)
        rt = runtime.setup(cfg.device)
        try:
            return predict(cfg, path, data, rt)
        finally:
            runtime.teardown()


def predict(cfg: PredictConfig, path: Path, data: str, rt: runtime.Runtime) -> dict:
    """Scores and/or embeds every image of ``data`` with the checkpoint at ``path``."""
    model, spec = inference.load_model(path)
    if not spec.has_head and cfg.embeddings is None:
        raise config.UsageError(f"--checkpoint {path}: a pretraining checkpoint (no classifier head) gives no "
                                "probabilities; pass --embeddings FILE.npy for its encoder features, or fine-tune it "
                                "first (python -m train.finetune)")
    files = cli.image_files(data, "--data")
    out = Path(cfg.out)
    emb = Path(cfg.embeddings) if cfg.embeddings else None
    errors = errors_path(out if spec.has_head else emb)
    for target, option in ((out, "--out"), (emb, "--embeddings")):
        if target is not None:
            inference.make_parent(target, option)
    dataset = ImageDataset(files, img_size=spec.img_size, in_chans=spec.in_chans, train=False,
                           decode_size=spec.decode_size, substitute=False)  # a bad file is dropped, never replaced
    outputs = (["scores"] if spec.has_head else []) + (["features"] if emb else [])
    model.to(rt.device)
    pred = inference.predict(model, inference.for_spec(dataset, spec), rt.device, cfg.batch_size,
                             num_workers=cfg.num_workers, outputs=outputs, progress="predict")
    paths = [str(files[i]) for i in pred.indices]
    written = []
    if rt.main:
        inference.write_errors(errors, pred.failed)  # always rewritten: no stale rows from an earlier run
    if not len(pred.indices):
        raise SystemExit(f"error: none of the {len(files)} images of --data {data} could be read; see {errors}")
    if rt.main:
        if spec.has_head:
            written.append(write_probabilities(out, paths, spec.label_names, pred.outputs["scores"]))
        if emb is not None:
            written += write_embeddings(emb, paths, pred.outputs["features"], {
                "checkpoint": str(path), "pooling": "mean" if spec.global_pool else "cls"})
    line = (f"predicted {len(pred.indices)} of {len(files)} images"
            + (f"; {pred.unreadable} unreadable, see {errors}" if pred.unreadable else ""))
    if not spec.has_head:
        line += "; no probabilities written (a pretraining checkpoint has no classifier head)"
    logs.announce(f"{line}\nwritten: {', '.join(map(str, written + [errors]))}", rt.main)
    return {"checkpoint": str(path), "images": len(files), "predicted": len(pred.indices),
            "unreadable": pred.unreadable, "errors": str(errors), "written": [str(w) for w in written],
            "label_names": spec.label_names, "probabilities": spec.has_head}


def write_probabilities(out: Path, paths: list[str], names: list[str], scores: np.ndarray) -> Path:
    """path, then one probability column per label name (6 significant digits), atomically."""
    with atomic.atomic_open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", *names])
        for p, row in zip(paths, scores):
            writer.writerow([p, *(f"{v:.6g}" for v in row)])
    return out


def write_embeddings(path: Path, paths: list[str], features: np.ndarray, meta: dict) -> list[Path]:
    """A float32 (N, D) .npy plus its row -> path index CSV, or one .parquet (path, embedding)."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        flat = pa.array(features.reshape(-1), type=pa.float32())
        column = pa.FixedSizeListArray.from_arrays(flat, features.shape[1])
        table = pa.table({"path": pa.array(paths, type=pa.string()), "embedding": column})
        table = table.replace_schema_metadata({"cxrfast": json.dumps(meta)})
        with atomic.atomic_path(path) as tmp:
            pq.write_table(table, str(tmp))
        return [path]
    with atomic.atomic_open(path, "wb") as f:
        np.save(f, features)
    index = index_path(path)
    with atomic.atomic_open(index, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "path"])
        writer.writerows(enumerate(paths))
    return [path, index]


if __name__ == "__main__":
    main()
