"""Aggregation maths over adapter state dicts: pure numpy functions, no Flower, no I/O.

- :mod:`.fedavg`: weighted mean (FedAvg), compatibility checks;
- :mod:`.ranks`: mixed ranks (FLoRA stacking, zero-pad, SVD projection, FF-LoRA fusion);
- :mod:`.robust`: coordinate median, trimmed mean, Krum;
- :mod:`.server_opt`: server optimisers on the pseudo-gradient (FedAvgM, FedAdam, FedYogi, FedAdagrad);
- :mod:`.scaffold`: SCAFFOLD's server step;
- :mod:`.validate`: update checks, norms, clipping, outlier filtering.
"""
