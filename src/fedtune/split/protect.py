"""Protection for what crosses the cut: noise on outgoing activations, clipping + noise on gradients.

Two defences, FedSEA's scheme, as pure tensor functions plus hooks that install them on the parts:

- **activation noise** (:func:`add_activation_noise`): Gaussian noise on h1 before it leaves the
  client. ``sigma`` is *relative*: by default the noise std of sample ``i`` is
  ``sigma * rms(h1[i])``, the root mean square of that sample's activations over its valid
  positions. A relative scale means the same ``sigma`` protects alike across models whose residual
  streams differ in magnitude by orders (random tiny models ~1, SmolLM2 ~10 with outlier
  positions). Other scales (:data:`NOISE_SCALES`) make it relative to each position, or to each
  channel's spread, so that a few outlier channels or positions do not set the noise for the rest.
  The scale is treated as a constant (detached), so in training dL/dh1 flows through
  ``h1 + noise`` unchanged.
- **gradient clipping + noise** (:func:`clip_and_noise_gradients`): each sample's gradient tensor
  (T, H) that the client sends back (dL/dh2, which carries label information to the server) is
  clipped to L2 norm ``clip_norm`` and Gaussian noise of std ``noise_multiplier * clip_norm`` is
  added, as in DP-SGD's per-sample Gaussian mechanism. No privacy accountant here.

:func:`protect_parts` installs both as module hooks on a :class:`~fedtune.split.partition_model.Head`
and :class:`~fedtune.split.partition_model.Tail`, so ``split_step``, ``remote_split_step`` and
``split_generate`` send protected tensors without any change, and the recorded crossings are the
protected ones. Noise draws come from a caller-seeded CPU generator: a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fedtune.split.partition_model import Head, Tail

_EPS = 1e-12  # keeps the clip factor finite for an all-zero gradient (its factor is then 1 anyway)
_MAD_TO_STD = 1.4826  # a Gaussian's median absolute deviation is 0.6745 std


@dataclass(frozen=True)
class ProtectConfig:
    """What the client does to tensors before they cross the cut (all off by default).

    Attributes
    ----------
    activation_sigma
        Std of the noise on outgoing activations h1, relative to ``activation_scale``; 0 is off.
    grad_clip_norm
        Per-sample L2 bound C on the gradient dL/dh2 sent to the server; None is off.
    grad_noise_multiplier
        Noise std on that gradient as a multiple of C; needs ``grad_clip_norm``.
    seed
        Seed of the noise generator.
    activation_scale
        What ``activation_sigma`` is relative to, a name in :data:`NOISE_SCALES`: ``"sample"``
        (each sample's RMS, the default), ``"token"`` (each position's RMS), ``"token_mad"`` (each
        position's robust std over its channels), ``"channel"`` (each channel's std over the
        batch's valid positions) or ``"channel_mad"`` (each channel's robust std over them).
    """

    activation_sigma: float = 0.0
    grad_clip_norm: float | None = None
    grad_noise_multiplier: float = 0.0
    seed: int = 0
    activation_scale: str = "sample"

    def __post_init__(self) -> None:
        if self.activation_sigma < 0:
            raise ValueError(f"activation_sigma must be >= 0, got {self.activation_sigma}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}")
        if self.grad_noise_multiplier < 0:
            raise ValueError(f"grad_noise_multiplier must be >= 0, got {self.grad_noise_multiplier}")
        if self.grad_noise_multiplier > 0 and self.grad_clip_norm is None:
            raise ValueError("grad_noise_multiplier needs grad_clip_norm: the noise scale is relative to C")
        if self.activation_scale not in NOISE_SCALES:
            raise ValueError(
                f"activation_scale must be one of {sorted(NOISE_SCALES)}, got {self.activation_scale!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.activation_sigma > 0 or self.grad_clip_norm is not None


def _gaussian(like: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise shaped like ``like``, drawn on the generator's device, moved to ``like``'s."""
    noise = torch.randn(like.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


def sample_rms(h: Tensor, valid: Tensor | None = None) -> Tensor:
    """Root mean square of each sample's activations (B, T, H) -> (B,), over valid positions only."""
    squares = h.detach().float().pow(2).mean(dim=-1)  # (B, T)
    if valid is None:
        return squares.mean(dim=1).sqrt()
    keep = torch.arange(h.shape[1], device=h.device).unsqueeze(0) < valid.to(h.device).unsqueeze(1)
    counts = keep.sum(dim=1).clamp(min=1)
    return ((squares * keep).sum(dim=1) / counts).sqrt()


def _valid_rows(h: Tensor, valid: Tensor | None) -> Tensor:
    """The activations at valid positions as detached fp32 rows, (B, T, H) -> (N, H)."""
    x = h.detach().float()
    if valid is None:
        return x.reshape(-1, x.shape[-1])
    keep = torch.arange(h.shape[1], device=h.device).unsqueeze(0) < valid.to(h.device).unsqueeze(1)
    return x[keep]


def _median(x: Tensor, dim: int) -> Tensor:
    """Median along ``dim`` (keepdim), the mean of the two middle values for an even count.

    ``Tensor.median`` returns the lower one, which is biased on a two-valued input such as +-1.
    """
    ordered = x.sort(dim=dim).values
    n = x.shape[dim]
    return (ordered.narrow(dim, (n - 1) // 2, 1) + ordered.narrow(dim, n // 2, 1)) / 2


def token_rms(h: Tensor, valid: Tensor | None = None) -> Tensor:
    """Root mean square of each position's activation vector, (B, T, H) -> (B, T, 1)."""
    return h.detach().float().pow(2).mean(dim=-1, keepdim=True).sqrt()


def token_mad(h: Tensor, valid: Tensor | None = None) -> Tensor:
    """Each position's spread over its channels as a robust std, (B, T, H) -> (B, T, 1).

    ``1.4826 * median |h - median(h)|`` over the channels: a few huge outlier channels (SmolLM2's
    attention-sink position carries values ~100x the rest) do not move it.
    """
    x = h.detach().float()
    return _MAD_TO_STD * _median((x - _median(x, -1)).abs(), -1)


def channel_std(h: Tensor, valid: Tensor | None = None) -> Tensor:
    """Std of each channel over the batch's valid positions, (B, T, H) -> (1, 1, H)."""
    return _valid_rows(h, valid).std(dim=0, correction=0).view(1, 1, -1)


def channel_mad(h: Tensor, valid: Tensor | None = None) -> Tensor:
    """Each channel's robust std (``1.4826 * MAD``) over the batch's valid positions, -> (1, 1, H).

    Unlike :func:`channel_std`, one outlier position (an attention sink) does not inflate it.
    """
    rows = _valid_rows(h, valid)
    return (_MAD_TO_STD * _median((rows - _median(rows, 0)).abs(), 0)).view(1, 1, -1)


def _sample_scale(h: Tensor, valid: Tensor | None = None) -> Tensor:
    return sample_rms(h, valid).view(-1, 1, 1)


NoiseScale = Callable[[Tensor, Tensor | None], Tensor]
NOISE_SCALES: dict[str, NoiseScale] = {
    "sample": _sample_scale,
    "token": token_rms,
    "token_mad": token_mad,
    "channel": channel_std,
    "channel_mad": channel_mad,
}
"""What ``sigma`` is relative to: a noise std per sample, per position or per channel."""
BATCH_SCALES = frozenset({"channel", "channel_mad"})
"""Scales estimated over the whole batch: they need more than one position to be meaningful."""


def add_activation_noise(
    h: Tensor,
    sigma: float,
    generator: torch.Generator,
    valid: Tensor | None = None,
    scale: str | Tensor = "sample",
) -> Tensor:
    """``h + sigma * s * N(0, I)``: Gaussian noise relative to a scale ``s`` of ``h`` itself.

    Parameters
    ----------
    h
        Activations (B, T, H) about to leave the client.
    sigma
        Noise std relative to ``scale``; 0 returns ``h`` itself.
    generator
        Source of the noise (seed it for a reproducible run).
    valid
        Per-sample valid-token counts (B,); a sample or channel scale is taken over those
        positions (padding is excluded so that short samples are not under-noised). None: over
        all positions.
    scale
        A name in :data:`NOISE_SCALES` (default: each sample's RMS), or a precomputed scale that
        broadcasts against ``h`` (a decode step reuses the prefill's per-channel estimate).

    Returns
    -------
    Tensor
        Noised activations; gradients flow to ``h`` with identity Jacobian (the scale is detached).
    """
    if sigma == 0:
        return h
    unit = NOISE_SCALES[scale](h, valid) if isinstance(scale, str) else scale
    std = (sigma * unit).to(device=h.device, dtype=h.dtype)
    return h + std * _gaussian(h, generator)


def clip_and_noise_gradients(
    g: Tensor, clip_norm: float, noise_multiplier: float, generator: torch.Generator
) -> Tensor:
    """Clip each sample's gradient to L2 norm ``clip_norm``, then add N(0, (noise_multiplier * C)^2).

    Parameters
    ----------
    g
        Per-sample gradients (B, ...); sample ``i`` is the tensor ``g[i]`` (for a cut, (T, H)).
    clip_norm
        The bound C; a sample with norm ``n > C`` is scaled by ``C / n``, others are unchanged.
    noise_multiplier
        Noise std as a multiple of C; 0 gives exact clipping and no noise.
    generator
        Source of the noise.

    Returns
    -------
    Tensor
        A new tensor of ``g``'s shape and dtype.
    """
    norms = g.detach().float().flatten(1).norm(dim=1)  # (B,)
    factor = (clip_norm / (norms + _EPS)).clamp(max=1.0)
    clipped: Tensor = g * factor.to(g.dtype).view(-1, *([1] * (g.ndim - 1)))
    if noise_multiplier == 0:
        return clipped
    return clipped + (noise_multiplier * clip_norm) * _gaussian(g, generator)


class Protection:
    """Hooks that apply a :class:`ProtectConfig` to a head and a tail; :meth:`remove` undoes them.

    The head's forward hook noises h1 on every forward, training or not: the noise protects what
    leaves the client, and a generation step sends activations too. The tail's forward-pre hook
    registers a gradient hook on its incoming leaf h2, so the gradient that ``split_step`` and
    ``remote_split_step`` read back and send to the server is already clipped and noised.

    A per-channel scale (:data:`BATCH_SCALES`) is estimated on every forward over more than one
    position and kept: a generation decode step (one new position per sample) reuses it, since an
    estimate over one position per sample would be ~0, i.e. no noise.
    """

    def __init__(self, head: Head | None, tail: Tail | None, config: ProtectConfig) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)
        self._handles: list[RemovableHandle] = []
        self._batch_scale: Tensor | None = None  # last per-channel estimate, for decode steps
        if head is not None and config.activation_sigma > 0:
            self._handles.append(head.register_forward_hook(self._noise_h1, with_kwargs=True))
        if tail is not None and config.grad_clip_norm is not None:
            self._handles.append(tail.register_forward_pre_hook(self._guard_h2))

    def _noise_h1(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor
    ) -> Tensor:
        valid = args[1] if len(args) > 1 else kwargs.get("valid")
        name = self.config.activation_scale
        scale: str | Tensor = name
        if name in BATCH_SCALES:
            if output.shape[1] > 1:
                self._batch_scale = NOISE_SCALES[name](output, valid)
            elif self._batch_scale is None:
                raise ValueError(
                    f"activation_scale {name!r} needs a forward over more than one position "
                    "(a prompt) before a single-position one: it is estimated over positions"
                )
            scale = self._batch_scale
        return add_activation_noise(output, self.config.activation_sigma, self.generator, valid, scale)

    def _guard_h2(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        hidden = args[0]
        if isinstance(hidden, Tensor) and hidden.requires_grad:
            hidden.register_hook(self._clip_hook())

    def _clip_hook(self) -> Callable[[Tensor], Tensor]:
        clip_norm = self.config.grad_clip_norm
        assert clip_norm is not None  # the hook is installed only with clipping on

        def hook(grad: Tensor) -> Tensor:
            return clip_and_noise_gradients(
                grad, clip_norm, self.config.grad_noise_multiplier, self.generator
            )

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Protection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def protect_parts(head: Head | None, tail: Tail | None, config: ProtectConfig) -> Protection:
    """Install ``config``'s defences on the client's parts (either may be None to skip it).

    Returns
    -------
    Protection
        The installed hooks; use as a context manager or call ``remove()``.
    """
    return Protection(head, tail, config)


__all__ = [
    "BATCH_SCALES",
    "NOISE_SCALES",
    "ProtectConfig",
    "Protection",
    "add_activation_noise",
    "channel_mad",
    "channel_std",
    "clip_and_noise_gradients",
    "protect_parts",
    "sample_rms",
    "token_mad",
    "token_rms",
]
