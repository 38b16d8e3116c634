"""Training utilities: checkpoints, the trainer loop, EMA, logging."""
