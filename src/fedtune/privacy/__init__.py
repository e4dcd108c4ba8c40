"""Privacy: client-level DP-FedAvg with ε accounting, DP-SGD on clients, secure aggregation (docs/privacy.md)."""
