"""The CPPO trainer: the objective, the training loop, its HTTP clients, DeepSpeed, checkpoints and logs."""
