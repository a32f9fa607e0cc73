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


GROUPS = ("data", "model", "optimisation", "output", "other")  # the --help sections, in this order

# The section of each field that does not name its own (``opt(..., group=)``); others go to "other".
FIELD_GROUPS: dict[str, str] = {
    **dict.fromkeys(("data", "labels", "label_format", "uncertain", "label_fraction", "split_fractions", "split",
                     "img_size", "crop_scale", "decode_size", "loader", "num_workers"), "data"),
    **dict.fromkeys(("model", "in_chans", "mask_ratio", "norm_pix_loss", "decoder_dim", "decoder_depth",
                     "decoder_heads", "init", "pretrained", "checkpoint", "global_pool", "drop_path",
                     "allow_mismatch", "linear_probe"), "model"),
    **dict.fromkeys(("epochs", "warmup_epochs", "batch_size", "accum_iter", "blr", "lr", "min_lr", "weight_decay",
                     "betas", "clip_grad", "layer_decay", "label_smoothing", "mixup", "cutmix", "max_steps",
                     "probe_l2"), "optimisation"),
    **dict.fromkeys(("output_dir", "save_every", "keep_last", "log_every", "eval_every", "resume"), "output"),
}

# str fields that name a file or folder (shown as PATH in --help)
PATH_FIELDS = frozenset({"data", "labels", "init", "pretrained", "resume", "output_dir", "checkpoint"})


def opt(default: Any, help: str, *, choices: Sequence[Any] | None = None, minimum: float | None = None,
        maximum: float | None = None, allow_nonfinite: bool = False, group: str | None = None) -> Any:
    """A dataclass field with its help text and the limits :func:`check` enforces; a float
    field rejects NaN and infinities unless ``allow_nonfinite``. ``group`` is its --help
    section (one of :data:`GROUPS`; default: :data:`FIELD_GROUPS`, else "other")."""
    if group is not None and group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None,
                "minimum": minimum, "maximum": maximum, "allow_nonfinite": allow_nonfinite, "group": group}
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


def _unwrap_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp


def metavar(name: str, tp: Any, default: Any) -> str:
    """What --help shows as an option's value: PATH, N (int), X (float), A,B,C (a tuple, one
    letter per item of the default), true|false, NAME (one of choices) or TEXT."""
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) is tuple:
        if isinstance(default, (tuple, list)) and 0 < len(default) <= 26:
            return ",".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(default)])
        return "A,B,..."
    if tp is bool:
        return "true|false"
    if tp is int:
        return "N"
    if tp is float:
        return "X"
    return "PATH" if name in PATH_FIELDS else "NAME"


def group_of(f: dataclasses.Field) -> str:
    """The --help section of a config field."""
    return f.metadata.get("group") or FIELD_GROUPS.get(f.name, "other")


def help_text(f: dataclasses.Field, default: Any) -> str:
    """The field's help, its choices (when limited to some) and its default."""
    text = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    if choices is not None:
        text += f" (choices: {', '.join(map(str, choices))})"
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    # argparse %-formats help strings: a literal % must be doubled
    return f"{text} (default: {default})".replace("%", "%%")


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
                    usage=f"{prog} [-h] [--config FILE] [--OPTION VALUE ...]",
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="JSON or TOML file of options (keys as below); "
                        "command-line options override it")
    fields = dataclasses.fields(cls)
    sections = {g: parser.add_argument_group(f"{g} options") for g in GROUPS if any(group_of(f) == g for f in fields)}
    converters = {}
    for f in fields:
        converters[f.name] = _converter(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        sections[group_of(f)].add_argument(*names, dest=f.name, default=argparse.SUPPRESS, type=converters[f.name],
                                           metavar=metavar(f.name, hints[f.name], default),
                                           help=help_text(f, default))
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
