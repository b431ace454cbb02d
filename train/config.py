"""Dataclass configs read from YAML with command-line overrides (``--lr 1e-3 --steps 500``).

Every field of the dataclass becomes a flag, so defaults live in exactly one place.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import linecache
import math
import os
import sys
import types
import typing
from pathlib import Path

import yaml

from ijepa.checkpoint import CheckpointError


def _parse_value(kind, text: str):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    is_tuple = typing.get_origin(kind) is tuple or kind is tuple
    element = (typing.get_args(kind) or (float,))[0] if is_tuple else kind
    try:
        if is_tuple:
            return tuple(element(x) for x in text.split(","))
        if kind in (int, float, str):
            return kind(text)
    except ValueError:  # argparse would name the parser function: "invalid <lambda> value"
        what = f"{element.__name__}s written a,b" if is_tuple else kind.__name__
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    return yaml.safe_load(text)


def _is_optional(kind) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def _field_kind(kind):
    """``X | None`` -> X: the type a value of an optional field has when it is given."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if args else str
    return kind


_KIND_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _coerce(name: str, kind, value):
    """A YAML or flag value -> the field's type, or a ValueError that names the key. YAML reads ``1e-3`` (no dot)
    as text and lists as lists; without this a config file's ``lr: 1e-3``, ``steps: 3.5``, ``steps: null`` or a
    range given as one number (``target_scale: 0.5``) would fail deep inside the run instead of here. Lists may
    also be written as flags write them, ``a,b``."""
    optional, kind = _is_optional(kind), _field_kind(kind)
    if value is None:
        if optional:
            return None
        raise ValueError(f"config key {name}: expected {_KIND_NAMES.get(kind, 'a value')}, got null")
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        values = value.split(",") if isinstance(value, str) else value
        fixed = bool(args) and args[-1] is not Ellipsis
        if not isinstance(values, (list, tuple)) or (fixed and len(values) != len(args)):
            count = f"{len(args)} values" if fixed else "values"
            raise ValueError(f"config key {name}: expected {count} written a,b (a list in YAML), got {value!r}")
        return tuple(_coerce(name, args[0] if args else float, v) for v in values)
    expected = _KIND_NAMES.get(kind)
    if expected is None:
        return value
    if kind is bool and isinstance(value, str):
        try:
            return _parse_value(bool, value)
        except argparse.ArgumentTypeError:
            pass
    if (kind is str and isinstance(value, str)) or (kind is bool and isinstance(value, bool)):
        return value
    if kind in (int, float) and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = float(value)
            if kind is float:
                return number
            if number.is_integer():  # steps: 1e4 (YAML text) or 2000.0
                return int(number)
        except (ValueError, OverflowError):
            pass
    raise ValueError(f"config key {name}: expected {expected}, got {value!r}")


# Errors whose message is written for the person who ran the command: files and settings they gave.
_THEIR_INPUT = (CheckpointError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)
# and where the output goes: a full disk, a read-only file system
_THEIR_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_OUR_CODE = tuple(str(Path(__file__).resolve().parents[1] / package) + os.sep
                  for package in ("ijepa", "train", "decoder"))


def raised_by_our_code(err: BaseException) -> bool:
    """Whether ``err`` came from a raise statement of this project (whose messages say what to change), not from
    inside torch or another library, nor from an operation of ours that failed (a bug, read with its traceback)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    filename = tb.tb_frame.f_code.co_filename
    if not str(Path(filename).resolve()).startswith(_OUR_CODE):
        return False
    line = linecache.getline(filename, tb.tb_lineno).lstrip()
    # the class named there: an error raised while building the message (a bad format spec) is a bug
    return line.startswith("raise ") and type(err).__name__ in line


RESUME_HINT = "the checkpoints written so far are kept: the same command with --resume true continues the run"


def run_command(main, interrupted: str = "") -> int:
    """Run a command's ``main()`` and return its exit status: a mistake in what was given (a missing file, a setting
    the command refuses, an unreadable checkpoint) prints as one ``error:`` line and exits 2, as argparse does for a
    bad flag; anything else keeps its traceback. ``interrupted``: what to do after Ctrl-C (e.g. how to resume)."""
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted" + (f": {interrupted}" if interrupted else ""), file=sys.stderr)  # after a progress bar
        return 130
    except (ValueError, RuntimeError, ArithmeticError, OSError) as err:
        theirs = isinstance(err, _THEIR_INPUT) or (isinstance(err, OSError) and err.errno in _THEIR_DISK)
        if not (theirs or raised_by_our_code(err)):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def doc_summary(doc: str | None) -> str:
    """A module docstring's first paragraph on one line: a command's --help description."""
    return " ".join((doc or "").split("\n\n")[0].split())


def require(config, condition: bool, message: str) -> None:
    """For a config's ``__post_init__``: refuse impossible settings before anything runs."""
    if not condition:
        raise ValueError(f"{type(config).__name__}: {message}")


def require_positive(config, names: tuple[str, ...]) -> None:
    """For ``__post_init__``: each named setting a finite number above 0 (NaN refused)."""
    for name in names:
        value = getattr(config, name)
        require(config, math.isfinite(value) and value > 0, f"{name} must be positive, got {value}")


def require_between(config, names: tuple[str, ...], low: float, high: float | None = None) -> None:
    """For ``__post_init__``: each named setting a finite number from ``low`` up to ``high`` (NaN refused)."""
    for name in names:
        value = getattr(config, name)
        fits = math.isfinite(value) and low <= value and (high is None or value <= high)
        require(config, fits, f"{name} must be " + (f"{low} or more" if high is None else f"between {low} and {high}")
                + f", got {value}")


# --help lines of the settings every training command has (train.pretrain, train.decoder), written once
RUN_HELP = {
    "device": 'where to train: "auto" (CUDA when available, else the CPU), "cpu" or "cuda"',
    "precision": '"auto" (bf16 where it is native: CUDA, CPUs with AVX512-BF16 or AMX; else fp32), "bf16" or "fp32"',
    "ckpt_every": "steps between checkpoints (the last step always writes one)",
    "keep_last": "newest checkpoints kept (0: all)",
    "resume": "go on from the newest checkpoint in <out-dir>/checkpoints, with the same settings and number of "
              "processes",
}


def setting(default, help: str):
    """A config field with its ``--help`` line, which says what the setting does and any fixed set of values; the
    flag's help adds the default. ``lr: float = setting(1e-3, "peak learning rate")``."""
    return dataclasses.field(default=default, metadata={"help": help})


def _shown(value) -> str:
    """A default as it is written on the command line: tuples as ``a,b``, booleans as true/false."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) if value else "none"
    return str(value)


def field_help(field: dataclasses.Field) -> str:
    """A field's ``--help`` line: its ``setting`` help and its default (empty when it has no help)."""
    text = field.metadata.get("help", "")
    if not text:
        return ""
    default = field.default
    if default is dataclasses.MISSING:
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else None
    return f"{text} (default: {_shown(default)})"


class _GivenNone:
    """``none`` given to an optional setting's flag: unlike argparse's None ('not given') it overrides a config
    file's value, e.g. ``--depth none`` after a file's ``depth: 6``."""


GIVEN_NONE = _GivenNone()


def _parse_flag(kind, optional: bool, text: str):
    if optional and text.lower() in ("none", "null"):
        return GIVEN_NONE
    return _parse_value(kind, text)


def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One ``--field`` flag per dataclass field, parsed with the field's type (tuples as ``a,b``; ``none`` for an
    optional one), with the field's ``setting`` help."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        kind, optional = _field_kind(hints[field.name]), _is_optional(hints[field.name])
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=None,
                            type=lambda text, k=kind, o=optional: _parse_flag(k, o, text), metavar=field.name.upper(),
                            help=field_help(field).replace("%", "%%"))


def load_config(config_cls, path: str | Path | None, overrides: dict):
    """Defaults <- YAML file <- command-line overrides (None means 'not given')."""
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} holds {type(values).__name__}, not settings (name: value lines)")
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {unknown}; valid keys: {sorted(known)}")
    values.update({k: None if v is GIVEN_NONE else v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(config_cls)
    return config_cls(**{name: _coerce(name, hints[name], value) for name, value in values.items()})


def config_parser(config_cls, description: str = "") -> argparse.ArgumentParser:
    """The command line of a config: ``--config`` and one flag per field, with each field's help and default."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="The defaults shown are the built-in ones: a --config file overrides them, and flags override both. "
               "Ranges and lists are written a,b; switches true or false.")
    parser.add_argument("--config", default=None, help="YAML file of settings, keyed by the flags' names with _ "
                        "for - (as the run folder's config.yaml); flags override its values")
    add_config_arguments(parser, config_cls)
    return parser


def parse_config(config_cls, argv=None, description: str = ""):
    args = vars(config_parser(config_cls, description).parse_args(argv))
    return load_config(config_cls, args.pop("config"), args)


def config_dict(config) -> dict:
    """A dataclass config as plain values (tuples as lists): what config.yaml and checkpoints store."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


# Fields a resumed (or reused) run may change: where and how it runs and logs, not what it computes.
PATH_FIELDS = frozenset({"checkpoint", "data"})  # compared as the files they name
RUN_ONLY_FIELDS = frozenset({"resume", "out_dir", "device", "num_workers", "log_every", "ckpt_every", "keep_last",
                             "compile", "sample_every", "knn_every", "allow_changes"})
# What a resumed run may change when it says so (``--allow-changes lr``): the optimiser's schedules and length,
# e.g. a lower lr after a NaN/inf loss. The run then no longer matches an uninterrupted one.
SCHEDULE_FIELDS = frozenset({"lr", "start_lr", "final_lr", "warmup_steps", "steps", "weight_decay",
                             "final_weight_decay", "ema_start", "ema_end", "ema_decay"})


def changed_settings(saved: dict, config, allowed: frozenset[str] = frozenset()) -> str:
    """The settings of ``config`` that differ from a stored ``config_dict`` (fields outside RUN_ONLY_FIELDS and
    ``allowed``), as "name: old -> new, ..."; empty when the run can continue. A field the stored config lacks
    (written before it existed) counts as its default, which is what that run used."""
    current = config_dict(config)
    stored = {**config_dict(type(config)()), **saved}
    runs = (stored.get("out_dir"), current.get("out_dir"))
    return ", ".join(f"{name}: {stored[name]!r} -> {value!r}" for name, value in current.items()
                     if name not in RUN_ONLY_FIELDS | allowed and not _same_setting(name, stored[name], value, runs))


def _same_setting(name: str, old, new, runs: tuple) -> bool:
    """Equal, or the same file written another way (``runs/x/model`` and ``/home/me/runs/x/model``), or the same
    place beside a run folder that was moved or copied with it (``../pretrain/model`` from the old and the new
    ``out_dir``, as the recipe's decoders name their model)."""
    if old == new:
        return True
    if name not in PATH_FIELDS or not all(isinstance(v, str) for v in (old, new, *runs)):
        return False
    (old, new), (old_run, new_run) = [Path(p).resolve() for p in (old, new)], [Path(p).resolve() for p in runs]
    return old == new or os.path.relpath(old, old_run) == os.path.relpath(new, new_run)
