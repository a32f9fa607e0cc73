"""Typed dataclass configs with ``--config FILE`` and ``--key value`` overrides.

Every field of a config dataclass becomes a command-line option with its type, default and
help; a JSON or TOML file may set any of them; unknown keys are rejected in both places.
The resolved config is saved next to every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from cxrfast import atomic

T = TypeVar("T")


def opt(default: Any, help: str) -> Any:
    """A dataclass field with its help text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _converter(tp: Any):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = _converter(next(a for a in args if a is not type(None)))
        return lambda s: None if isinstance(s, str) and s.lower() in ("none", "null", "") else inner(s)
    if tp is bool:
        def to_bool(s):
            if isinstance(s, bool):
                return s
            if str(s).lower() in ("1", "true", "yes", "on"):
                return True
            if str(s).lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
        return to_bool
    if origin is tuple:
        item = _converter(args[0])
        return lambda s: tuple(item(v) for v in (s.split(",") if isinstance(s, str) else s))
    if tp in (int, float, str):
        def convert(s, tp=tp):
            if tp is int and isinstance(s, float) and not s.is_integer():
                raise argparse.ArgumentTypeError(f"expected an integer, got {s}")
            return tp(s)
        return convert
    raise TypeError(f"unsupported config field type {tp}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.suffix == ".toml":
        import tomllib

        with open(path, "rb") as f:
            return tomllib.load(f)
    with open(path) as f:
        data = json.load(f)
    return data.get("config", data) if isinstance(data, dict) else data


def parse(cls: type[T], argv: list[str] | None, prog: str, description: str) -> tuple[T, set[str]]:
    """Builds ``cls`` from a config file and command-line overrides.

    Returns the config and the set of keys the user set explicitly (file or command line),
    so callers can fill in defaults that depend on other choices (e.g. the demo).
    """
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="JSON or TOML file of options (keys as below); "
                        "command-line options override it")
    converters = {}
    for f in dataclasses.fields(cls):
        converters[f.name] = _converter(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        parser.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, type=converters[f.name],
                            metavar=_type_name(hints[f.name]).upper().split("[")[0],
                            help=f"{f.metadata.get('help', '')} (default: {default})")
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_file = ns.pop("config", None)
    if config_file:
        data = load_file(config_file)
        unknown = sorted(set(data) - set(converters))
        if unknown:
            parser.error(f"{config_file}: unknown keys {unknown}")
        for k, v in data.items():
            try:
                values[k] = converters[k](v)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{config_file}: bad value for {k}: {exc}")
    values.update(ns)
    return cls(**values), set(values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def save(cfg: Any, path: str | os.PathLike) -> None:
    """Writes the resolved config as JSON, atomically."""
    atomic.write_text(path, json.dumps(to_dict(cfg), indent=2) + "\n")
