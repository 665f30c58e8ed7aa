"""The ``lsurf`` command: a skin over the library (each command parses, calls, prints)."""

from lsurf.cli.main import main

__all__ = ["main"]
