"""One pathology vocabulary across datasets, so a model fine-tuned on one can be scored on another.

Two names are the same label when their keys match: lower case, ``_`` read as a space, and the
built-in synonyms below (NIH ``Effusion`` = CheXpert ``Pleural Effusion`` = PadChest
``pleural effusion``...). The standard names are torchxrayvision's (``relabel_dataset`` lines
datasets up on them and gives a label a dataset lacks NaN, never 0; we do the same).
``--labels_map`` renames a dataset's columns first, for what the table does not know.
Named label sets (``--label_set chexpert5``) live here too, and the view vocabulary
(``--view PA,AP`` or ``frontal``)."""
from __future__ import annotations

import json
from pathlib import Path

from .chexpert import CHEXPERT5, CHEXPERT_LABELS
from .nih14 import NIH_LABELS

# standard name -> the other names datasets use for it (matched after lower-casing, '_' -> ' ')
SYNONYMS: dict[str, tuple[str, ...]] = {
    "Effusion": ("Pleural Effusion",),
    "Edema": ("Pulmonary Edema",),
    "Fibrosis": ("Pulmonary Fibrosis",),
    "Infiltration": ("Infiltrates",),
    "Hernia": ("Hiatal Hernia",),
    "Pleural_Thickening": ("Pleural Thickening", "Apical Pleural Thickening"),
    "No Finding": ("Normal", "No finding"),
    "Enlarged Cardiomediastinum": ("Mediastinal Enlargement",),
    "Lung Opacity": ("Opacity",),
}

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "chexpert5": CHEXPERT5,
    "chexpert14": CHEXPERT_LABELS,
    "nih14": NIH_LABELS,
}

FRONTAL = ("PA", "AP", "AP_HORIZONTAL", "AP_AXIAL", "PA_HORIZONTAL", "FRONTAL")
LATERAL = ("LATERAL", "LL", "RL", "L")
VIEW_GROUPS = {"FRONTAL": FRONTAL, "LATERAL": LATERAL}


def _plain(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


_CANONICAL = {_plain(s): _plain(std) for std, others in SYNONYMS.items() for s in others}


def key(name: str) -> str:
    """The name every spelling of one label shares (``Pleural_Thickening`` and
    ``pleural thickening`` -> ``pleural thickening``; ``Pleural Effusion`` -> ``effusion``)."""
    plain = _plain(name)
    return _CANONICAL.get(plain, plain)


def find(name: str, names: list[str]) -> int | None:
    """The index of the label in ``names`` that is ``name``: the same spelling first, else the same key."""
    if name in names:
        return names.index(name)
    k = key(name)
    return next((i for i, n in enumerate(names) if key(n) == k), None)


def label_set(spec: str) -> tuple[str, ...]:
    """A named set (``chexpert5``, ``chexpert14``, ``nih14``) or a comma list of label names."""
    if spec in LABEL_SETS:
        return LABEL_SETS[spec]
    names = tuple(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    if not names:
        raise ValueError(f"--label_set {spec!r}: names no label")
    return names


def labels_map(spec: str) -> tuple[dict[str, str], bool]:
    """``Effusion=Pleural Effusion,Nodule=Lung Lesion`` or a JSON file of ``{"from": "to"}``;
    returns (mapping, from a file). A malformed item or file is a ValueError naming it."""
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--labels_map {spec}: cannot read it as JSON ({exc})") from None
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise ValueError(f"--labels_map {spec}: must hold one JSON object of label name -> label name")
        return data, True
    mapping = {}
    for item in spec.split(","):
        src, sep, dst = item.partition("=")
        src, dst = src.strip().strip("'\""), dst.strip().strip("'\"")
        if not sep or not src or not dst:
            raise ValueError(f"--labels_map {item!r}: write From=To (e.g. Effusion=\"Pleural Effusion\") or a JSON file")
        mapping[src] = dst
    return mapping, False


def view_name(view: str) -> str:
    """A view as one token: upper case, spaces as ``_`` (``AP horizontal`` -> ``AP_HORIZONTAL``)."""
    return "_".join(view.upper().split())


def views(spec: str) -> frozenset[str]:
    """``PA,AP`` (any view names; ``frontal`` and ``lateral`` stand for their groups)."""
    wanted: set[str] = set()
    for item in spec.split(","):
        v = view_name(item)
        if not v:
            raise ValueError(f"--view {spec!r}: an empty view name")
        wanted |= {v, *VIEW_GROUPS.get(v, ())}
    return frozenset(wanted)


def view_matches(view: str | None, wanted: frozenset[str]) -> bool:
    """Whether an image of this view is one of ``wanted`` (a PA image is also a frontal one)."""
    if not view:
        return False
    v = view_name(view)
    groups = {g for g, members in VIEW_GROUPS.items() if v in members}
    return bool(({v} | groups) & wanted)
