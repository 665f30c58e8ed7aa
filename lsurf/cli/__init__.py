"""The ``lsurf`` command: a skin over the library (each command parses, calls, prints).

The entry point is :func:`lsurf.cli.main.main`; this package imports nothing itself, so a command
module importing ``lsurf.cli.common`` does not loop back through ``main`` to every other command.
"""
