"""Training: train state, optimizer, sharded train step and the loop."""
