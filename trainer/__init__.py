"""longtrain.trainer: recipe, model, data, parallelism, checkpoints and the training loop."""
