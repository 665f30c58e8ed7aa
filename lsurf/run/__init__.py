"""A run: options, the run plan, the MPI world and its transport, and the distributed sampler."""
