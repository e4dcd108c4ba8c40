"""Protection for what crosses the cut: noise on outgoing activations, clipping + noise on gradients.

Two defences, FedSEA's scheme, as pure tensor functions plus hooks that install them on the parts:

- **activation noise** (:func:`add_activation_noise`): Gaussian noise on h1 before it leaves the
  client. ``sigma`` is *relative*: the noise std of sample ``i`` is ``sigma * rms(h1[i])``, the
  root mean square of that sample's activations over its valid positions. A relative scale means
  the same ``sigma`` protects alike across models whose residual streams differ in magnitude by
  orders (random tiny models ~1, SmolLM2 ~10 with outlier positions). The scale is treated as a
  constant (detached), so in training dL/dh1 flows through ``h1 + noise`` unchanged.
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


@dataclass(frozen=True)
class ProtectConfig:
    """What the client does to tensors before they cross the cut (all off by default).

    Attributes
    ----------
    activation_sigma
        Std of the noise on outgoing activations h1, relative to each sample's RMS; 0 is off.
    grad_clip_norm
        Per-sample L2 bound C on the gradient dL/dh2 sent to the server; None is off.
    grad_noise_multiplier
        Noise std on that gradient as a multiple of C; needs ``grad_clip_norm``.
    seed
        Seed of the noise generator.
    """

    activation_sigma: float = 0.0
    grad_clip_norm: float | None = None
    grad_noise_multiplier: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.activation_sigma < 0:
            raise ValueError(f"activation_sigma must be >= 0, got {self.activation_sigma}")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}")
        if self.grad_noise_multiplier < 0:
            raise ValueError(f"grad_noise_multiplier must be >= 0, got {self.grad_noise_multiplier}")
        if self.grad_noise_multiplier > 0 and self.grad_clip_norm is None:
            raise ValueError("grad_noise_multiplier needs grad_clip_norm: the noise scale is relative to C")

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


def add_activation_noise(
    h: Tensor, sigma: float, generator: torch.Generator, valid: Tensor | None = None
) -> Tensor:
    """``h + sigma * rms_i * N(0, I)``: Gaussian noise relative to each sample's RMS.

    Parameters
    ----------
    h
        Activations (B, T, H) about to leave the client.
    sigma
        Noise std relative to the per-sample RMS of ``h``; 0 returns ``h`` itself.
    generator
        Source of the noise (seed it for a reproducible run).
    valid
        Per-sample valid-token counts (B,); the RMS is taken over those positions (padding is
        excluded so that short samples are not under-noised). None: over all positions.

    Returns
    -------
    Tensor
        Noised activations; gradients flow to ``h`` with identity Jacobian (the scale is detached).
    """
    if sigma == 0:
        return h
    scale = (sigma * sample_rms(h, valid)).to(h.dtype).view(-1, 1, 1)
    return h + scale * _gaussian(h, generator)


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
    clipped = g * factor.to(g.dtype).view(-1, *([1] * (g.ndim - 1)))
    if noise_multiplier == 0:
        return clipped
    return clipped + (noise_multiplier * clip_norm) * _gaussian(g, generator)


class Protection:
    """Hooks that apply a :class:`ProtectConfig` to a head and a tail; :meth:`remove` undoes them.

    The head's forward hook noises h1 on every forward, training or not: the noise protects what
    leaves the client, and a generation step sends activations too. The tail's forward-pre hook
    registers a gradient hook on its incoming leaf h2, so the gradient that ``split_step`` and
    ``remote_split_step`` read back and send to the server is already clipped and noised.
    """

    def __init__(self, head: Head | None, tail: Tail | None, config: ProtectConfig) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)
        self._handles: list[RemovableHandle] = []
        if head is not None and config.activation_sigma > 0:
            self._handles.append(head.register_forward_hook(self._noise_h1, with_kwargs=True))
        if tail is not None and config.grad_clip_norm is not None:
            self._handles.append(tail.register_forward_pre_hook(self._guard_h2))

    def _noise_h1(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor
    ) -> Tensor:
        valid = args[1] if len(args) > 1 else kwargs.get("valid")
        return add_activation_noise(output, self.config.activation_sigma, self.generator, valid)

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
    "ProtectConfig",
    "Protection",
    "add_activation_noise",
    "clip_and_noise_gradients",
    "protect_parts",
    "sample_rms",
]
