"""Training: train state, pure steps, losses, schedules, checkpoints and the loop."""
