"""``python -m lsurf`` is the ``lsurf`` command (so ``mpirun -n 4 python -m lsurf surface ...`` works)."""

import sys

from lsurf.cli.main import main

sys.exit(main())
