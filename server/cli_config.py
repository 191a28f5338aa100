"""`--config FILE` for `xyserve serve` and `xyserve simulate`: a YAML mapping whose keys are the
command's options (`max-num-seqs: 8`, or `max_num_seqs: 8`), read before the command line, which
wins where both give a value.

Each entry becomes the flag it names (`--max-num-seqs 8`; true / false for switches, a list for
comma-separated options) and goes through argparse with the rest, so a file's values get exactly
the checks, conversions and choices of the command line.
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

CONFIG_FLAG = "--config"


class ConfigFileError(ValueError):
    """A --config file that cannot be read, or names an option the command does not have."""


def expand_config(subparsers: argparse._SubParsersAction, argv: list[str]) -> list[str]:
    """argv with `--config FILE` replaced by the options the file sets (placed first, so the
    command line's own options override them). Raises ConfigFileError."""
    if not argv or argv[0] not in subparsers.choices:
        return argv
    command, rest = argv[0], argv[1:]
    parser = subparsers.choices[command]
    if not any(CONFIG_FLAG in action.option_strings for action in parser._actions):
        return argv  # a command without --config (argparse names the stray option)
    path, rest = _take_config(rest)
    if path is None:
        return argv
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigFileError(f"{CONFIG_FLAG} {path}: {exc}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigFileError(f"{CONFIG_FLAG} {path}: expected a mapping of option: value")
    flags: list[str] = []
    for key, value in values.items():
        flags.extend(_as_flags(parser, path, str(key), value))
    return [command, *flags, *rest]


def _take_config(args: list[str]) -> tuple[str | None, list[str]]:
    for i, arg in enumerate(args):
        if arg == CONFIG_FLAG and i + 1 < len(args):
            return args[i + 1], args[:i] + args[i + 2:]
        if arg.startswith(CONFIG_FLAG + "="):
            return arg.split("=", 1)[1], args[:i] + args[i + 1:]
    return None, args


def _as_flags(parser: argparse.ArgumentParser, path: str, key: str, value: Any) -> list[str]:
    flag = "--" + key.replace("_", "-")
    action = next((a for a in parser._actions if flag in a.option_strings), None)
    if action is None or flag == CONFIG_FLAG:
        raise ConfigFileError(f"{CONFIG_FLAG} {path}: {key!r} is not an option of "
                              f"`xyserve {parser.prog.split()[-1]}`")
    if isinstance(action, argparse.BooleanOptionalAction):
        _need_bool(path, key, value)
        return [flag if value else "--no-" + flag[2:]]
    if action.nargs == 0:  # store_true and the like
        _need_bool(path, key, value)
        return [flag] if value else []
    if value is None:
        return []
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    elif isinstance(value, bool):
        value = str(value).lower()
    return [flag, str(value)]


def _need_bool(path: str, key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigFileError(f"{CONFIG_FLAG} {path}: {key} must be true or false, "
                              f"got {value!r}")
