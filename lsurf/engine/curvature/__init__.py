"""Curvature: the Hessian as an operator (Lanczos spectra, traces, densities) and plane fidelity."""
