"""Training: train state, pure steps, schedules, checkpoint saving and the loop."""
