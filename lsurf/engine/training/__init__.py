"""Training: a model for the demo and tests, and the bends of a curve between two models."""
