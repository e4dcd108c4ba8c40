"""fedtune.federated."""
