"""The ``privacy`` section: client-level DP, sample-level DP on clients, SecAgg+ (docs/privacy.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocalDpConfig(_Section):
    """``privacy.local_dp``: DP-SGD on each client's LoRA parameters (per-example clipping)."""

    enabled: bool = Field(False, description="train each client with DP-SGD (opacus); ε per client reported")
    max_grad_norm: float = Field(1.0, gt=0, description="per-example gradient norm bound")
    noise_multiplier: float | None = Field(
        None, gt=0, description="noise std over max_grad_norm (or set privacy.local_dp.target_epsilon)"
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="each client's ε over the whole run; the noise is calibrated to it"
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="each client's δ (unset: 1 / its training examples^1.1)"
    )

    @model_validator(mode="after")
    def _noise_or_target(self) -> LocalDpConfig:
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "privacy.local_dp: set exactly one of privacy.local_dp.noise_multiplier and "
                "privacy.local_dp.target_epsilon"
            )
        return self


class SecAggConfig(_Section):
    """``privacy.secagg``: Flower's SecAgg+; the server learns only the sum of the sampled updates."""

    enabled: bool = Field(
        False, description="aggregate the clients' updates with SecAgg+ (sum-type strategies)"
    )
    num_shares: float = Field(
        1.0,
        gt=0,
        description="shares each client's key is split into (its share holders, itself included): a "
        "count (odd and above 2, or the number of sampled clients) or, at most 1, a fraction of the "
        "sampled clients",
    )
    reconstruction_threshold: float = Field(
        0.5,
        gt=0,
        description="shares needed to rebuild a key: a count (>= 2) or, at most 1, a fraction of num_shares; "
        "a round completes while every client keeps this many live share holders (with shares covering "
        "all n sampled clients, n - threshold may drop out)",
    )
    clipping_range: float = Field(
        1.0,
        gt=0,
        description="each update value, times its client's weight over the largest weight, is clipped to "
        "±this before quantisation (under privacy.dp every weight is 1: the update value itself)",
    )
    quantization_range: int = Field(
        2**22, gt=1, description="values are quantised to integers in [0, quantization_range)"
    )
    timeout: float | None = Field(None, gt=0, description="seconds per SecAgg+ stage (unset: fed.timeout)")


class PrivacyConfig(_Section):
    """``privacy``: client-level DP-FedAvg with ε accounting; DP-SGD on clients; SecAgg+."""

    dp: bool = Field(False, description="client-level DP-FedAvg: clip each update, noise the sum, account ε")
    noise: Literal["server", "client"] = Field(
        "server",
        description="who adds the Gaussian noise: the server to the sum (trusted server), or each client "
        "a share of it (for SecAgg+: the server never sees an un-noised sum)",
    )
    clip_norm: float = Field(
        1.0,
        gt=0,
        description="L2 bound on each client's update (its adapter minus the global); adaptive: the start",
    )
    adaptive_clipping: bool = Field(
        False, description="move the clip norm towards a quantile of the update norms (Andrew et al.)"
    )
    target_quantile: float = Field(
        0.5, gt=0, lt=1, description="adaptive: the quantile of update norms tracked"
    )
    clip_lr: float = Field(0.2, gt=0, description="adaptive: step size of the geometric clip-norm update")
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="adaptive: noise std on the count of unclipped updates (unset: cohort / 20)"
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        description="noise std over the clip norm; with privacy.target_epsilon as well, the run stops "
        "before a round would pass the target",
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="ε over the planned rounds: the noise is calibrated to it before round 1"
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="δ of the guarantee (unset: 1 / partition.num_partitions^1.1)"
    )
    accountant: Literal["rdp", "pld"] = Field(
        "rdp",
        description="accountant that calibrates the noise and stops the run: rdp (Flower's RdpAccountant) "
        "or pld (dp-accounting's, tighter); both are reported",
    )
    sampling: Literal["fixed", "poisson"] = Field(
        "poisson",
        description="DP client sampling: poisson (each client with probability m / N, m the cohort "
        "fed.fraction_train gives) or fixed (m clients without replacement; accounted as replace-one, "
        "where a client's update moves the sum by up to 2 C, so it costs more ε for the same noise)",
    )
    local_dp: LocalDpConfig = Field(
        default_factory=LocalDpConfig, description="Sample-level DP-SGD on each client."
    )
    secagg: SecAggConfig = Field(default_factory=SecAggConfig, description="Secure aggregation (SecAgg+).")

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyConfig:
        if self.dp and self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("privacy: privacy.dp needs privacy.target_epsilon or privacy.noise_multiplier")
        if self.dp and self.accountant == "pld" and self.sampling == "fixed":
            raise ValueError(
                "privacy.accountant: 'pld' needs privacy.sampling = 'poisson' (dp-accounting's PLD has no "
                "fixed-size sampling); use 'rdp'"
            )
        if self.dp and self.secagg.enabled and self.adaptive_clipping:
            raise ValueError(
                "privacy.adaptive_clipping: not with privacy.secagg (each client's clipped-count bit "
                "would reach the server in the clear)"
            )
        if self.dp and self.noise == "client" and self.adaptive_clipping:
            raise ValueError(
                "privacy.adaptive_clipping: needs privacy.noise = 'server' (the clipped-count noise is "
                "added by the server)"
            )
        return self
