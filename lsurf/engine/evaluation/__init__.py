"""The evaluator: loss and metrics of a model at points of weight space (losses, metrics, labels,
precision, probes before a run, the tuned plan), and sharpness around θ*."""
