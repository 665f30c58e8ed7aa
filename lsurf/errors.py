"""The one exception type that means "the user's input is wrong".

:class:`UserError` is a :class:`ValueError`, so API callers can catch it as one. Messages name
parameters in backticks (``"`batch_size` 0: must be at least 1"``): read from Python they name the
keyword argument, and the CLI rewrites each ```name``` into its flag (``--batch-size``). The CLI
turns a UserError into a single line on stderr and exit status 2; any other exception is a bug or an
environment failure and keeps its traceback (and, under MPI, aborts the whole job).
"""

from __future__ import annotations

import re

_PARAM = re.compile(r"`([a-z][a-z0-9_]*)`")


class UserError(ValueError):
    """Bad input: a malformed option, a missing or mismatched file, unusable data.

    ``collective`` is set when every rank of an MPI job raised it together (see ``World.agree``),
    so no rank needs to abort the others.
    """

    collective: bool = False
    rank: int = 0

    @property
    def params(self) -> list[str]:
        """The parameters the message names, first the one at fault."""
        return _PARAM.findall(str(self))

    def as_flags(self, flags: dict[str, str] | None = None) -> str:
        """The message with each ```name``` written as its command-line flag (``--name-like-this``,
        or ``flags[name]`` where a command spells it differently)."""
        table = flags or {}
        return _PARAM.sub(lambda m: table.get(m.group(1), "--" + m.group(1).replace("_", "-")), str(self))
