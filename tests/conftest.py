"""Test set-up: run Triton kernels in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at the
top of the test session, and only when CUDA is absent (GPU runs use the real compiler).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
