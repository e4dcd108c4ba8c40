"""Privacy: client-level DP-FedAvg with ε accounting, DP-SGD on clients, SecAgg+ (docs/privacy.md)."""
