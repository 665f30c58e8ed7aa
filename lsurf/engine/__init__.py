"""The engine: one sub-package per job, each importing only those below it (the import contracts
check the order). From the bottom: ``io`` (atomic writes, hashes, plug-ins); ``model``; ``data``
and ``geometry`` (points in weight space); ``curvature``; ``evaluation``; ``training``;
``formats`` (the files). Nothing here knows about MPI or the command line."""
