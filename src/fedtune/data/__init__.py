"""fedtune.data."""
