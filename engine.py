"""Per-iteration logic: train_one_epoch, evaluate and the temperature schedule."""
