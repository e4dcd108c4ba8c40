"""The ``split`` section: split learning's cut, trunk mode, service, protection (docs/split-learning.md)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitProtectConfig(_Section):
    """``split.protect``: noise on a split client's activations, clipping and noise on its gradients."""

    activation_sigma: float = Field(
        0.0, ge=0, description="Gaussian noise on outgoing activations, std = sigma x activation_scale"
    )
    grad_clip_norm: float | None = Field(None, gt=0, description="per-sample L2 bound on dL/dh2 sent back")
    grad_noise_multiplier: float = Field(
        0.0, ge=0, description="noise std on dL/dh2, times grad_clip_norm (which it needs)"
    )
    activation_scale: Literal["sample", "token", "token_mad", "channel", "channel_mad"] = Field(
        "sample",
        description="what activation_sigma is relative to: sample, each sample's RMS; token, each "
        "position's RMS; channel, each channel's std over the batch; token_mad / channel_mad, robust ones",
    )

    @model_validator(mode="after")
    def _noise_needs_clip(self) -> SplitProtectConfig:
        if self.grad_noise_multiplier > 0 and self.grad_clip_norm is None:
            raise ValueError("split.protect.grad_noise_multiplier needs split.protect.grad_clip_norm")
        return self


class SplitConfig(_Section):
    """``split``: split learning's cut, trunk mode and the trunk service's address, TLS and limits."""

    enabled: bool = Field(False, description="split learning: clients hold head + tail, the server the trunk")
    n_head: int = Field(2, ge=1, le=5, description="blocks the client runs before the trunk")
    n_tail: int = Field(2, ge=1, le=5, description="blocks the client runs after the trunk")
    mode: Literal["sequential", "client-batch", "hierarchical"] = Field(
        "sequential",
        description="sequential: clients' steps take turns on one trunk; client-batch: concurrent "
        "clients' steps run as one trunk batch; hierarchical: split.groups trunk replicas, "
        "their adapters averaged after every round",
    )
    groups: int = Field(
        1,
        ge=1,
        description="hierarchical: trunk replicas, client partition_id % groups on replica g "
        "(> 1 needs mode hierarchical)",
    )
    batch_wait_s: float = Field(
        1.0, gt=0, description="client-batch: longest wait for the other clients' activations"
    )
    trunk_lr: float | None = Field(None, gt=0, description="trunk optimizer lr (unset: train.lr)")
    host: str = Field("127.0.0.1", description="address the ServerApp's trunk service binds")
    port: int = Field(0, ge=0, le=65535, description="first port (replica g on port + g); 0: any free")
    public_host: str | None = Field(None, description="host clients dial (unset: split.host)")
    tls_cert: str | None = Field(
        None, description="PEM certificate chain of the trunk service (with tls_key and tls_root_cert)"
    )
    tls_key: str | None = Field(None, description="PEM private key of the trunk service")
    tls_root_cert: str | None = Field(None, description="PEM root certificate clients trust")
    max_message_mib: float = Field(256.0, gt=0, description="largest message on the trunk stream, in MiB")
    timeout_s: float = Field(300.0, gt=0, description="longest wait for one trunk reply")
    protect: SplitProtectConfig = Field(
        default_factory=SplitProtectConfig,
        description="What a split client adds to what leaves it: noise on its outgoing activations; "
        "per-sample clipping and noise on the gradients it returns to the trunk.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SplitConfig:
        if self.groups > 1 and self.mode != "hierarchical":
            raise ValueError("split.groups > 1 needs split.mode = 'hierarchical'")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("split.tls_cert and split.tls_key go together")
        if self.tls_cert is not None and self.tls_root_cert is None:
            raise ValueError("split.tls_cert needs split.tls_root_cert (what clients trust)")
        return self
