"""Learning rate: linear warmup, then half-cycle cosine decay, per iteration (as in
facebookresearch/mae's lr_sched, with the epoch as a fraction)."""
from __future__ import annotations

import math


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(1e-12, epochs - warmup_epochs)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def apply(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def effective_lr(blr: float, lr: float | None, batch_size: int, accum_iter: int, world_size: int) -> float:
    """lr = blr * effective batch / 256 unless an absolute lr is given."""
    return lr if lr is not None else blr * batch_size * accum_iter * world_size / 256
