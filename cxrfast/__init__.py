"""cxrfast: fast MAE pretraining and fine-tuning of CXRBase, a chest X-ray ViT.

The main entry points, imported on first use so that ``import cxrfast`` stays cheap (no
torch, no native module):

- ``cxrfast.read(path)`` -> DicomImage (``.pixels``, ``.meta``); ``cxrfast.read_header``,
  ``cxrfast.read_many``; the whole reader is ``cxrfast.dicom``, its errors derive from
  ``cxrfast.DicomError``.
- ``cxrfast.prepare``: the module of ``python -m cxrfast.prepare``;
  ``cxrfast.prepare.prepare(src, out, size=256)`` builds a prepared folder from Python.
- ``cxrfast.data.loader(prepared_folder, batch_size=64)``: batches of a prepared folder.
- ``cxrfast.models``: ``mae(...)``, ``classifier(...)`` and checkpoint loading.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any


def _version() -> str:
    """The installed distribution's version; in a source tree that is not installed, the
    version in pyproject.toml beside the package ("0+unknown" when neither can be read)."""
    from importlib import metadata

    try:
        return metadata.version("cxrfast")
    except metadata.PackageNotFoundError:
        pass
    try:  # a regular expression, not a TOML parser: this runs on every import
        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    except OSError:
        return "0+unknown"
    found = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', text, flags=re.MULTILINE | re.DOTALL)
    return found.group(1) if found else "0+unknown"


__version__ = _version()

_MODULES = ("dicom", "data", "models", "prepare", "errors")
_FROM = {"read": "dicom", "read_header": "dicom", "read_many": "dicom", "DicomImage": "dicom",
         "DicomError": "errors"}
__all__ = ["__version__", *_MODULES, *_FROM]


def __getattr__(name: str) -> Any:
    """Imports an entry point on first use (PEP 562) and keeps it as a module attribute."""
    if name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _FROM:
        value = getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
    else:
        raise AttributeError(f"module 'cxrfast' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
