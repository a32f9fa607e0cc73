"""What a kernel launch decides at compile time, and the per-GPU limits it must fit.

Each kernel module computes its block sizes, warps and pipeline stages in one small pure
function returning a :class:`Config`; the launch code and ``bench/gpu_static.py`` (which
compiles every launch for sm_80/86/89/90 without a GPU) both call it, so the report sees
exactly what runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Largest shared memory one block may use (bytes, the opt-in maximum of CUDA's
# cudaDevAttrMaxSharedMemoryPerBlockOptin), and per SM, by compute capability
# (CUDA C Programming Guide, "Technical Specifications per Compute Capability").
SMEM_PER_BLOCK = {(7, 0): 96 * 1024, (7, 5): 64 * 1024, (8, 0): 163 * 1024, (8, 6): 99 * 1024,
                  (8, 7): 163 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024,
                  (12, 0): 99 * 1024}
SMEM_PER_SM = {(7, 0): 96 * 1024, (7, 5): 64 * 1024, (8, 0): 164 * 1024, (8, 6): 100 * 1024,
               (8, 7): 164 * 1024, (8, 9): 100 * 1024, (9, 0): 228 * 1024, (10, 0): 228 * 1024,
               (12, 0): 100 * 1024}
# Used when no GPU is there to ask and no target is named (CPU, the Triton interpreter):
# the H100/H200 the project targets, so the interpreter refuses what they would refuse.
DEFAULT_CAPABILITY = (9, 0)


@dataclass(frozen=True)
class Config:
    """Constexpr block sizes plus Triton's num_warps and num_stages for one launch."""

    blocks: dict[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict[str, int]:
        """Keyword arguments for ``kernel[grid](...)``."""
        return {**self.blocks, "num_warps": self.num_warps, "num_stages": self.num_stages}


def capability(device: torch.device | str | None = None) -> tuple[int, int]:
    """Compute capability of ``device`` (or the current CUDA device); DEFAULT_CAPABILITY
    when there is no CUDA device (CPU, the Triton interpreter)."""
    if device is not None and torch.device(device).type != "cuda":
        return DEFAULT_CAPABILITY
    if not torch.cuda.is_available():
        return DEFAULT_CAPABILITY
    return tuple(torch.cuda.get_device_capability(device))


def smem_per_block(cap: tuple[int, int] | None = None, device: torch.device | str | None = None) -> int:
    """Shared memory one block may use on compute capability ``cap`` (or on ``device``, asked
    from torch where it reports it, else looked up in SMEM_PER_BLOCK)."""
    if cap is None:
        if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(device)
            optin = getattr(props, "shared_memory_per_block_optin", None)
            if optin:
                return int(optin)
        cap = capability(device)
    return _by_capability(SMEM_PER_BLOCK, cap)


def _by_capability(table: dict[tuple[int, int], int], cap: tuple[int, int]) -> int:
    """The entry for ``cap``; else the nearest older one of the same major version; else the
    smallest in the table (a capability we do not know must not be assumed generous)."""
    if cap in table:
        return table[cap]
    same_major = [c for c in table if c[0] == cap[0] and c <= cap]
    return table[max(same_major)] if same_major else min(table.values())
