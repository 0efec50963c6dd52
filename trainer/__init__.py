"""The CPPO trainer: the objective and (later) the training loop."""
