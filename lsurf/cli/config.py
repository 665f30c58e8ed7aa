"""Job files: a TOML table of option names, merged under the command-line flags.

``lsurf surface --config jobs/demo.toml --x -2:2:41`` takes every option from the file and the
grid from the flag. Keys are the long option names (``batch-size`` or ``batch_size``).
"""

from __future__ import annotations

import argparse
import difflib

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from lsurf.errors import UserError


def read_job_file(path: str, known: set[str]) -> dict:
    """Options from a TOML file, each checked against the command's known option names."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"--config {path!r} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path!r} is not valid TOML ({e})") from None
    out = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise UserError(f"--config {path!r}: unknown key {key!r}{hint}")
        out[name] = value
    return out


def merge(parser: argparse.ArgumentParser, args: argparse.Namespace, explicit: set[str]) -> argparse.Namespace:
    """Values from ``--config`` fill every option not given explicitly on the command line."""
    if not getattr(args, "config", None):
        return args
    known = {a.dest for a in parser._actions if a.dest not in ("help", "config", "command", "func")}
    for name, value in read_job_file(args.config, known).items():
        if name not in explicit:
            setattr(args, name, value)
    return args
