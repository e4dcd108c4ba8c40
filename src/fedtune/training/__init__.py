"""fedtune.training."""
