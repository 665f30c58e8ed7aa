"""The engine: models, data, directions, the grid, the evaluator and its metrics, curvature, and the
surface file. Nothing here knows about MPI or the command line."""
