"""Typed dataclass configs with ``--config FILE`` and ``--key value`` overrides.

Every field of a config dataclass becomes a command-line option with its type, default and
help; a JSON or TOML file may set any of them; unknown keys are rejected in both places.
Fields also carry their limits (``choices``, ``minimum``, ``maximum``): ``parse`` checks
them, and a config's own ``validate()`` for checks across fields, before anything is
written, so every job rejects a mistake the same way: one ``error: ...`` line, exit code 2.
The resolved config is saved next to every checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

from cxrfast import atomic
from cxrfast.cli import Parser, UsageError, fail  # noqa: F401 (used by every job as config.*)

T = TypeVar("T")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turns a :class:`UsageError` (or a prepared folder that cannot be read as it is) raised
    inside into :func:`fail` (no traceback)."""
    from cxrfast.data.shards import PreparedFormatError
    from cxrfast.models.checkpoints import CheckpointError

    try:
        yield
    except UsageError as exc:
        fail(str(exc))
    except PreparedFormatError as exc:  # its message names the folder and says what to do
        fail(f"--data {exc}")
    except CheckpointError as exc:  # unreadable, unsafe or ill-fitting: the message names the file
        fail(str(exc))


def opt(default: Any, help: str, *, choices: Sequence[Any] | None = None, minimum: float | None = None,
        maximum: float | None = None, allow_nonfinite: bool = False) -> Any:
    """A dataclass field with its help text and the limits :func:`check` enforces; a float
    field rejects NaN and infinities unless ``allow_nonfinite``."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None,
                "minimum": minimum, "maximum": maximum, "allow_nonfinite": allow_nonfinite}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check(cfg: Any) -> None:
    """Raises :class:`UsageError` for the first field outside its choices or range, then runs
    the config's ``validate()`` (checks across fields) when it has one."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue  # None means "not given / use the default rule" wherever a field allows it
        choices, lo, hi = f.metadata.get("choices"), f.metadata.get("minimum"), f.metadata.get("maximum")
        items = value if isinstance(value, tuple) else (value,)
        for v in items:
            if choices is not None and v not in choices:
                raise UsageError(f"--{f.name} {v}: not one of {', '.join(map(str, choices))}")
            if isinstance(v, float) and not math.isfinite(v) and not f.metadata.get("allow_nonfinite"):
                raise UsageError(f"--{f.name} {v}: must be a finite number")
            # written as "not >=" so that a NaN (every comparison with it is false) fails too
            if lo is not None and not v >= lo:
                raise UsageError(f"--{f.name} {v}: must be at least {lo}")
            if hi is not None and not v <= hi:
                raise UsageError(f"--{f.name} {v}: must be at most {hi}")
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()


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


def _toml():
    """tomllib (Python 3.11+), else the tomli backport it came from (same API)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    return tomllib


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """The options in a JSON or TOML file (a saved config.json or checkpoint config too);
    a missing, unreadable or malformed file is a :class:`UsageError` naming it."""
    path = Path(path)
    try:
        if path.suffix == ".toml":
            with open(path, "rb") as f:
                data = _toml().load(f)
        else:
            with open(path) as f:
                data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (OSError, ValueError) as exc:  # JSONDecodeError, TOMLDecodeError, UnicodeDecodeError
        raise UsageError(f"--config {path}: cannot read it: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a table of options, got {type(data).__name__}")
    return data


def parse(cls: type[T], argv: list[str] | None, prog: str, description: str) -> tuple[T, set[str]]:
    """Builds ``cls`` from a config file and command-line overrides.

    Returns the config and the set of keys the user set explicitly (file or command line),
    so callers can fill in defaults that depend on other choices (e.g. the demo).
    """
    hints = typing.get_type_hints(cls)
    parser = Parser(prog=prog, description=description, allow_abbrev=False,
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
        try:
            data = load_file(config_file)
        except UsageError as exc:
            fail(str(exc))
        unknown = sorted(set(data) - set(converters))
        if unknown:
            parser.error(f"{config_file}: unknown keys {unknown}")
        for k, v in data.items():
            try:
                values[k] = converters[k](v)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{config_file}: bad value for {k}: {exc}")
    values.update(ns)
    cfg = cls(**values)
    try:
        check(cfg)
    except UsageError as exc:
        fail(str(exc))
    return cfg, set(values)


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def save(cfg: Any, path: str | os.PathLike) -> None:
    """Writes the resolved config as JSON, atomically."""
    atomic.write_text(path, json.dumps(to_dict(cfg), indent=2) + "\n")
