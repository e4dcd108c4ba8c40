"""fedtune.report."""
