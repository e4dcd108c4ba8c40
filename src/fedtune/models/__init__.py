"""fedtune.models."""
