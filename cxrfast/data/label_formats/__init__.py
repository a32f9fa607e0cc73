"""The registry of label CSV formats: one module per format, each exporting ``FORMAT`` (a
:class:`LabelFormat`). Adding a format is one new module plus a :func:`register` call here."""
from __future__ import annotations

from .base import UNCERTAIN, UNCERTAIN_HELP, VOTES, LabelFormat, LabelTable, ReadOptions, Uncertainty, uncertain_value
from . import chexpert, generic, mimic, nih14, padchest, rsna, vindr, vocabulary

_REGISTRY: dict[str, LabelFormat] = {}


def register(fmt: LabelFormat) -> LabelFormat:
    """Adds a format (its name must be new and not ``auto``); returns it."""
    if fmt.name == "auto" or fmt.name in _REGISTRY:
        raise ValueError(f"label format {fmt.name!r} is already taken")
    _REGISTRY[fmt.name] = fmt
    return fmt


def names() -> tuple[str, ...]:
    """The registered format names, in registration order."""
    return tuple(_REGISTRY)


def choices() -> tuple[str, ...]:
    """What ``--label_format`` accepts: ``auto`` then every registered name."""
    return ("auto", *names())


def get(name: str) -> LabelFormat:
    """The format called ``name``; an unknown name is a ValueError listing the choices."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown label format {name!r}; choose one of {', '.join(choices())}") from None


def expected() -> str:
    """Every format's one-line description, for 'what columns did you expect' errors."""
    return "; ".join(f"{f.name}: {f.description}" for f in _REGISTRY.values())


def detect(columns: list[str]) -> LabelFormat:
    """The format these columns identify: the first registered non-fallback match, else a
    fallback match; none is a ValueError naming the columns found and those expected."""
    matching = [f for f in _REGISTRY.values() if f.matches(columns)]
    if matching:
        return next((f for f in matching if not f.fallback), matching[0])
    raise ValueError(f"no image path column; found columns {columns}, expected {expected()}")


def choices_text() -> str:
    """The choices as prose: "auto, nih14, chexpert, ... or generic"."""
    *head, last = choices()
    return f"{', '.join(head)} or {last}"


def help_text() -> str:
    """The ``--label_format`` help: every choice with its one-line description."""
    return "; ".join(["auto: detect the format from the columns"] + [f"{f.name}: {f.description}"
                                                                     for f in _REGISTRY.values()])


for _module in (nih14, chexpert, mimic, rsna, padchest, vindr, generic):
    register(_module.FORMAT)

__all__ = ["LabelFormat", "LabelTable", "ReadOptions", "UNCERTAIN", "UNCERTAIN_HELP", "Uncertainty", "VOTES", "choices", "choices_text", "detect", "expected", "get", "help_text", "names",
           "register", "uncertain_value", "vocabulary"]
