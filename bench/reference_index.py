"""The index and sampler as cxrfast had them before the columnar index (the benchmark's anchor):
index.csv into a list of dicts, locations and labels from the dicts, (shard, offset) as Python
lists, and the sampler's permutation as a Python list sliced per rank."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch


class OldPreparedData:
    def __init__(self, folder):
        folder = Path(folder)
        self.meta = json.loads((folder / "meta.json").read_text())
        self.shards = [np.load(folder / name, mmap_mode="r") for name in self.meta["shards"]]
        with open(folder / "index.csv", newline="") as f:
            self.rows = list(csv.DictReader(f))
        names = list(self.meta.get("label_names", []))
        self.locations = np.array([(int(r["shard"]), int(r["offset"])) for r in self.rows], np.int64).reshape(-1, 2)
        self.labels = np.array([[float(r[f"label_{n}"]) if r[f"label_{n}"] != "" else np.nan for n in names]
                                for r in self.rows], np.float32).reshape(len(self.rows), -1) if names else None
        self.patients = [r["patient_id"] or r["source"] for r in self.rows]
        self._arrays = [np.asarray(s) for s in self.shards]
        self._where = self.locations.tolist()

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices) -> np.ndarray:
        size = self.meta["size"]
        out = np.empty((len(indices), size, size), np.dtype(self.meta["dtype"]))
        for k, i in enumerate(indices):
            shard, offset = self._where[i]
            out[k] = self._arrays[shard][offset]
        return out


def old_indices(size: int, rank: int, world_size: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(size, generator=g).tolist()
    per_rank = -(-size // world_size)
    order = (order * (per_rank * world_size // size + 1))[: per_rank * world_size]
    return order[rank::world_size]
