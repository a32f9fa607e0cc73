"""Batched inference for evaluation: class scores and pooled encoder features."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cxrfast.data.shards import collate

from . import runtime


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 64,
            features: bool = False, num_workers: int = 0) -> np.ndarray:
    """Sigmoid scores (N, K), or pooled features (N, D) with ``features``, in dataset order."""
    was_training = model.training
    model.eval()
    out = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    for batch in loader:
        x = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device)
        with runtime.autocast(device):
            y = model.forward_features(x) if features else torch.sigmoid(model(x))
        out.append(y.float().cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)
