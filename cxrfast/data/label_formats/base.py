"""What every label format shares: the table it returns, the format object the registry
holds, the options a reader sees (the uncertainty policy, per label, and how several readers'
votes become one label) and how a -1 "uncertain" label becomes a number."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

UNCERTAIN = ("ones", "zeros", "ignore")
VOTES = ("majority", "any")  # several readers' rows of one image -> one label
UNCERTAIN_HELP = ("uncertain (-1) labels: ones, zeros or ignore (masked out), for all labels or per label, "
                  "e.g. Atelectasis=ones,Edema=ones,*=zeros (labels not named follow '*', default ones)")

# reader(path of the CSV, its rows, its columns, options) -> LabelTable
Reader = Callable[[Path, list[dict], list[str], "ReadOptions"], "LabelTable"]


@dataclass
class LabelTable:
    """One row per image: key (a file name or relative path), labels (N, K) float32 with
    NaN = ignore, optional patient ids, split names and view positions (as the CSV writes
    them: ``PA``, ``AP``, ``Lateral``, ``AP_horizontal``...)."""

    keys: list[str]
    names: list[str]
    labels: np.ndarray
    patients: list[str | None] = field(default_factory=list)
    splits: list[str | None] = field(default_factory=list)
    views: list[str | None] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out while reading

    def lookup(self) -> dict[str, int]:
        """Maps every key, each of its trailing path parts and its file name and stem to a
        row index; a part that several rows share (CheXpert's ``view1_frontal.jpg``) maps to
        none of them, so a file is never paired with another image's labels."""
        index: dict[str, int] = {}
        taken: set[str] = set()
        for i, k in enumerate(self.keys):
            index[k] = i
            taken.add(k)
        ambiguous: set[str] = set()
        for i, k in enumerate(self.keys):
            parts = Path(k).parts
            for alias in {*("/".join(parts[j:]) for j in range(1, len(parts))), os.path.basename(k), Path(k).stem}:
                if alias in taken:
                    continue
                if alias in index and index[alias] != i:
                    ambiguous.add(alias)
                index.setdefault(alias, i)
        for alias in ambiguous:
            del index[alias]
        return index

    def take(self, rows: list[int]) -> "LabelTable":
        """The table of these rows only (same names, skipped counts kept)."""
        pick = lambda values: [values[r] for r in rows] if values else []  # noqa: E731
        labels = self.labels[rows] if rows else np.zeros((0, len(self.names)), np.float32)
        return LabelTable(pick(self.keys), list(self.names), labels, pick(self.patients), pick(self.splits),
                          pick(self.views), dict(self.skipped))


@dataclass(frozen=True)
class Uncertainty:
    """The uncertainty policy: one of ``UNCERTAIN`` for every label (``default``), or per label."""

    default: str = "ones"
    per_label: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: "str | Uncertainty") -> "Uncertainty":
        """``ones`` or ``Atelectasis=ones,Edema=ones,*=zeros``; a policy outside ``UNCERTAIN``
        or an item without a label is a ValueError naming it."""
        if isinstance(text, Uncertainty):
            return text
        default, per_label = "ones", []
        for item in str(text).split(","):
            name, sep, policy = item.rpartition("=")
            name, policy = name.strip().strip("'\""), policy.strip().strip("'\"")
            if policy not in UNCERTAIN:
                raise ValueError(f"{policy or item!r} is not an uncertainty policy (ones, zeros or ignore)")
            if sep and not name:
                raise ValueError(f"{item!r} names no label (write Label=policy or *=policy)")
            if not sep or name == "*":
                default = policy
            else:
                per_label.append((name, policy))
        return cls(default, tuple(per_label))

    def policy(self, name: str) -> str:
        """The policy of one label."""
        return dict(self.per_label).get(name, self.default)

    def value(self, name: str) -> float:
        """The number an uncertain label of ``name`` becomes."""
        return uncertain_value(self.policy(name))

    def check(self, names: list[str]) -> None:
        """A per-label policy for a label these labels lack is a ValueError naming it."""
        unknown = [n for n, _ in self.per_label if n not in names]
        if unknown:
            raise ValueError(f"--uncertain names label(s) {', '.join(map(repr, unknown))} that the CSV does not have "
                             f"(its labels: {', '.join(names)})")


@dataclass(frozen=True)
class ReadOptions:
    """What a reader may need besides the CSV: the uncertainty policy and the vote rule."""

    uncertain: Uncertainty = field(default_factory=Uncertainty)
    vote: str = "majority"

    @classmethod
    def of(cls, value: "ReadOptions | Uncertainty | str") -> "ReadOptions":
        """Options from options, a policy or a policy's text (the older reader argument)."""
        return value if isinstance(value, ReadOptions) else cls(Uncertainty.parse(value))


@dataclass(frozen=True)
class LabelFormat:
    """One CSV layout. ``columns`` must all be present (checked before reading, and used by
    ``auto``); for detection at least one of ``any_of`` must be present too (when given).
    A ``fallback`` format is only detected when no other one matches."""

    name: str
    description: str
    columns: tuple[str, ...]
    reader: Reader
    any_of: tuple[str, ...] = ()
    fallback: bool = False

    def matches(self, columns: list[str]) -> bool:
        """Whether a CSV with these columns looks like this format."""
        have = set(columns)
        return all(c in have for c in self.columns) and (not self.any_of or any(c in have for c in self.any_of))

    def missing(self, columns: list[str]) -> list[str]:
        """The required columns that a CSV with these columns lacks."""
        return [c for c in self.columns if c not in columns]

    def read(self, path: Path, rows: list[dict], columns: list[str],
             options: "ReadOptions | Uncertainty | str" = "ones") -> LabelTable:
        """The label table of an already parsed CSV (``rows`` as csv.DictReader gives them)."""
        return self.reader(path, rows, columns, ReadOptions.of(options))


def uncertain_value(uncertain: str) -> float:
    """The number an uncertain (-1) label becomes: 1, 0 or NaN (masked out of loss and metrics)."""
    if uncertain not in UNCERTAIN:
        raise ValueError(f"uncertain must be ones, zeros or ignore, got {uncertain!r}")
    return {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[uncertain]


def column(rows: list[dict], name: str) -> list[str | None]:
    """One column's stripped values (None where blank or absent), e.g. the view of each row."""
    return [((r.get(name) or "").strip() or None) for r in rows]
