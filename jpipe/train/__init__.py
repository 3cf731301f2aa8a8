"""jpipe.train: configuration, data, checkpoints, the training loop and its command line."""
