"""Training: optimiser, train state, jitted steps, checkpoints and the loop behind train.py."""
