"""torch.library registration shared by the kernel files: every kernel is a ``cxrfast::`` op.

Why custom ops: ``torch.compile`` sees each op as one node (no graph break, no tracing into
Triton's launcher), fake tensors get exact output shapes, dtypes and strides without running
anything (``bench/step_model.py`` relies on that), and autograd comes from ``register_autograd``
instead of an ``autograd.Function`` that Dynamo would have to trace.

Every op takes a ``kernel: bool`` argument: True runs the Triton kernel (on CPU that needs
``TRITON_INTERPRET=1``), False runs the plain torch reference of the same math, on any device.
``cxrfast.ops`` passes False on CPU, so the compiled CPU graph is the same graph as on a GPU.

Uses ``torch.library.custom_op`` (torch >= 2.4). ``triton_op`` (torch >= 2.6) is not used:
it needs ``wrap_triton`` around JIT functions, which the interpreter does not provide, and an
opaque op already traces with 0 graph breaks. Registering is idempotent by name, because
``bench/gpu_static.py`` loads a second copy of a kernel module.
"""
from __future__ import annotations

import typing
from typing import Callable

import torch

NAMESPACE = "cxrfast"
_OPS: dict[str, object] = {}
# Memory traffic of the ops whose kernel path reads or writes more than its inputs and outputs
# once (several launches): name -> fn(args, outputs) -> (bytes read, bytes written).
# bench/step_model.py counts these instead of the op's operands.
TRAFFIC: dict[str, Callable] = {}


def nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the given tensors (None counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def define(name: str, impl: Callable, fake: Callable, backward: Callable | None = None,
           setup_context: Callable | None = None, traffic: Callable | None = None):
    """Registers ``cxrfast::<name>`` (schema from ``impl``'s type hints) with its fake
    implementation and, when given, its autograd formula and its kernel path's memory
    traffic (see TRAFFIC); returns the op (once per name)."""
    if traffic is not None:
        TRAFFIC[name] = traffic
    if name in _OPS:
        return _OPS[name]
    # Resolved here, not by torch: older torch reads only real (not stringified) annotations.
    impl.__annotations__ = typing.get_type_hints(impl)
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=())
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    _OPS[name] = op
    return op


def no_autocast(device: torch.device):
    """The references compute in the dtypes they choose, as the kernels do, whatever autocast
    is on around the op."""
    return torch.autocast(device_type=device.type, enabled=False)
