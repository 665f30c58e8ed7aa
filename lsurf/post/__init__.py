"""After a run: plots and VTK files from surface files. Never imports MPI or the run layer."""
