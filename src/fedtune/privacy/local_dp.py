"""Sample-level DP-SGD on a client's LoRA parameters (``privacy.local_dp``) and its ε.

One optimizer step of DP-SGD (Abadi et al., 2016). Every training example joins the step's
batch independently with probability ``q = B / n`` (Poisson sampling; ``B`` =
``train.batch_size × train.grad_accum`` examples expected, ``n`` the client's training
examples); the batch runs in micro-batches of ``train.batch_size`` (they only bound
memory), and the gradient is

    g = (Σ_i clip(g_i) + N(0, (z C)² I)) / (q n),    clip(g_i) = g_i · min(1, C / (‖g_i‖ + 1e-6))

where ``g_i`` is the gradient of example ``i``'s loss (the mean over its answer tokens;
prompt tokens, labelled -100, carry none) with respect to the trainable (adapter)
parameters only, ``‖·‖`` the L2 norm over all of them together, ``C`` the
``max_grad_norm`` and ``z`` the ``noise_multiplier``. The divisor is the *expected* batch
size, so that one example moves the noised sum by at most ``C`` (as opacus does). A step
that samples no example still takes its noise. The per-example gradients come from
opacus' ``GradSampleHooks`` (one forward and backward per micro-batch; the hooks are
removed after the round). The optimizer, its lr schedule, FedProx's proximal gradient and
SCAFFOLD's correction then act on ``g``: the last two depend on the client's data only
through earlier DP outputs (the current adapter; control variates the server derives
from DP updates), so adding them after the noise is post-processing and costs no ε.
``train.max_grad_norm`` (clipping of the whole batch gradient) is not applied: the
per-example bound replaces it.

Accounting. Each step is the Poisson-subsampled Gaussian mechanism (rate ``q``, noise
multiplier ``z``), composed over ``server_round × steps_per_round`` steps by dp-accounting's
RDP accountant under add-or-remove-one-example neighbouring: what the sampling above
implements, not an approximation of shuffled fixed-size batches (which can be far off:
Lebeda et al. 2024, see :mod:`fedtune.privacy.accounting`). What it assumes:

* the sampling and the noise are secret: by default both come from a seed drawn from the
  OS (:func:`local_dp_setup`'s ``seed``), from torch's generators, not a cryptographic one
  (opacus' ``secure_mode`` would be);
* the client is counted as training in every round up to ``server_round``; a client not
  sampled in some rounds has spent less, so the ε reported is an upper bound there;
* the unit protected is one training example (a prompt with its answer). The training
  loss the client reports is not noised and is outside the guarantee.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from types import TracebackType

import dp_accounting
import torch
from dp_accounting import dp_event, rdp
from opacus.grad_sample import GradSampleHooks
from torch.utils.data import DataLoader

from fedtune.config import Config, TrainConfig
from fedtune.errors import FedtuneError
from fedtune.privacy.quiet import quiet_absl

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LocalDp:
    """One client's DP-SGD settings, fixed for the whole run (see the module docstring)."""

    max_grad_norm: float  # C: per-example L2 bound on the adapter gradient
    noise_multiplier: float  # z: noise std on the clipped sum is z * C
    batch_size: int  # B: expected examples per optimizer step (train.batch_size * train.grad_accum)
    num_examples: int  # n: the client's training examples
    steps_per_round: int  # optimizer steps per round (training.local.planned_steps)
    delta: float
    seed: int | None = None  # of the batch sampling and the noise; None: OS entropy, secret

    @property
    def sample_rate(self) -> float:
        """The sampling rate q = B / n, at most 1."""
        return min(1.0, self.batch_size / self.num_examples)

    @property
    def expected_batch(self) -> float:
        """The expected examples in a step, q n: the divisor of the noisy sum."""
        return self.sample_rate * self.num_examples


def rdp_epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps (rate q, multiplier z) at ``delta`` (RDP).

    Parameters
    ----------
    sample_rate
        q, the probability each example is in a step's batch.
    noise_multiplier
        z, the noise std over the clipping bound.
    steps
        Composed steps; 0 steps spend ε = 0.
    delta
        The δ of the (ε, δ) guarantee.

    Returns
    -------
    float
        ε from dp-accounting's ``RdpAccountant`` (add-or-remove-one neighbouring).
    """
    if steps <= 0:
        return 0.0
    accountant = rdp.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier))
    with quiet_absl():  # the RDP is computed in compose
        accountant.compose(event, steps)
        return float(accountant.get_epsilon(delta))


def calibrate_sample_noise(sample_rate: float, steps: int, target_epsilon: float, delta: float) -> float:
    """The smallest noise multiplier (to dp-accounting's tolerance) whose ε after ``steps`` is ≤ the target.

    Parameters
    ----------
    sample_rate, steps, delta
        As in :func:`rdp_epsilon`.
    target_epsilon
        The ε the whole run may spend.

    Returns
    -------
    float
        z with ``rdp_epsilon(sample_rate, z, steps, delta) <= target_epsilon``.
    """

    def event(z: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(z)), steps
        )

    with quiet_absl():
        return float(
            dp_accounting.calibrate_dp_mechanism(
                rdp.RdpAccountant, event, target_epsilon, delta, dp_accounting.LowerEndpointAndGuess(0.0, 1.0)
            )
        )


def local_dp_setup(
    cfg: Config, num_examples: int, steps_per_round: int, *, seed: int | None = None
) -> LocalDp | None:
    """A client's DP-SGD settings from ``privacy.local_dp``, or None when it is off.

    Parameters
    ----------
    cfg
        The run's config (``privacy.local_dp``, ``train`` and ``fed.rounds`` are read).
    num_examples
        The client's training examples, ``n``.
    steps_per_round
        Its optimizer steps per round: ``planned_steps(cfg.train, num_examples)``.
    seed
        Seed of the batch sampling and the noise. None (the default) draws it from the OS:
        the guarantee needs both secret, and the server knows the run's seed (and so
        ``task.seed()``). An int makes them reproducible (tests, simulations that trade the
        guarantee for repeatability).

    Returns
    -------
    LocalDp | None
        With ``target_epsilon`` set, the noise multiplier is calibrated so that ε after
        ``fed.rounds × steps_per_round`` steps is at most the target.

    Raises
    ------
    FedtuneError
        When δ would not be below 1 (fewer than 2 examples and no ``delta`` set).
    """
    local = cfg.privacy.local_dp
    if not local.enabled:
        return None
    delta = local.delta if local.delta is not None else 1.0 / max(num_examples, 1) ** 1.1
    if num_examples < 1 or delta >= 1.0:
        raise FedtuneError(
            f"privacy.local_dp: a client with {num_examples} training example(s) has no δ below 1; "
            "set privacy.local_dp.delta"
        )
    dp = LocalDp(
        max_grad_norm=local.max_grad_norm,
        noise_multiplier=local.noise_multiplier or 0.0,
        batch_size=cfg.train.batch_size * cfg.train.grad_accum,
        num_examples=num_examples,
        steps_per_round=steps_per_round,
        delta=delta,
        seed=seed,
    )
    if local.target_epsilon is not None:
        steps = cfg.fed.rounds * steps_per_round
        z = calibrate_sample_noise(dp.sample_rate, steps, local.target_epsilon, delta)
        dp = replace(dp, noise_multiplier=z)
    return dp


def local_epsilon(dp: LocalDp, server_round: int) -> float:
    """ε this client has spent after training in rounds 1..``server_round`` (at ``dp.delta``)."""
    return rdp_epsilon(dp.sample_rate, dp.noise_multiplier, server_round * dp.steps_per_round, dp.delta)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's mean next-token cross-entropy over its labelled tokens, shape ``(batch,)``.

    Position t predicts token t+1, as in the model's own loss; labels of -100 carry none;
    an example without labelled tokens has loss 0 (and gradient 0).
    """
    # shift the labels, not the logits: a slice of the (batch, length, vocab) logits would be copied
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    tokens = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    counts = (targets != -100).sum(dim=1).clamp(min=1)
    return tokens.sum(dim=1) / counts


def clip_and_sum(
    grad_samples: Sequence[torch.Tensor], max_norm: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Σ_i g_i · min(1, C / (‖g_i‖ + 1e-6)) for per-example gradients of several parameters.

    Parameters
    ----------
    grad_samples
        One tensor per parameter, ``(batch, *parameter shape)``: example i's gradient is
        the i-th slice of every tensor; ``‖g_i‖`` is its L2 norm over all of them.
    max_norm
        C.

    Returns
    -------
    tuple[list[torch.Tensor], torch.Tensor]
        The clipped sum for each parameter, and the per-example norms before clipping.
    """
    squares = torch.stack([g.flatten(1).float().pow(2).sum(dim=1) for g in grad_samples]).sum(dim=0)
    norms = squares.sqrt()
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    sums = [torch.einsum("i,i...->...", factors, g.float()) for g in grad_samples]  # in float32
    return sums, norms


def noisy_mean(
    sums: Sequence[torch.Tensor],
    noise_multiplier: float,
    max_norm: float,
    batch_size: float,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """(sum + N(0, (z C)² I)) / ``batch_size`` for each parameter's clipped sum.

    ``batch_size`` is the *expected* batch, q n, whatever the step sampled.
    """
    std = noise_multiplier * max_norm
    out = []
    for total in sums:
        noise = torch.normal(0.0, std, total.shape, generator=generator, device=total.device) if std else 0.0
        out.append((total + noise) / batch_size)
    return out


def _grad_sample(param: torch.Tensor, batch: int) -> torch.Tensor:
    """Opacus' per-example gradients of ``param``; zeros when the forward did not reach it."""
    sample = getattr(param, "grad_sample", None)
    return torch.zeros(batch, *param.shape, device=param.device) if sample is None else sample


class PrivateGradients:
    """DP-SGD for one round of ``training.local.train``; a context manager around the round.

    :meth:`sampled_steps` draws each step's Poisson batch (in micro-batches of
    ``train.batch_size``); :meth:`step` clips each example's gradient, sums, adds the noise
    and leaves the noisy mean in every trainable parameter's ``.grad``. Leaving the
    context removes opacus' hooks and what they put on the model.
    """

    def __init__(self, model: torch.nn.Module, dp: LocalDp, cfg: TrainConfig, steps: int) -> None:
        if (cfg.batch_size * cfg.grad_accum, steps) != (dp.batch_size, dp.steps_per_round):
            raise ValueError(
                f"privacy.local_dp: set up for {dp.batch_size} examples x {dp.steps_per_round} steps a "
                f"round, but the round trains {cfg.batch_size * cfg.grad_accum} x {steps}; the ε "
                "reported would be wrong"
            )
        self.model = model
        self.dp = dp
        self.micro_batch = cfg.batch_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        seed = dp.seed if dp.seed is not None else secrets.randbits(63)
        self.sampler = torch.Generator().manual_seed(seed)
        noise_seed = int(torch.randint(2**62, (1,), generator=self.sampler))  # a stream apart from sampling's
        self.noise = torch.Generator(device=self.params[0].device).manual_seed(noise_seed)
        self.hooks: GradSampleHooks | None = None

    def __enter__(self) -> PrivateGradients:
        self.hooks = GradSampleHooks(self.model, batch_first=True, loss_reduction="sum", strict=True)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.hooks is not None:
            self.hooks.cleanup()
            self.hooks = None
        for module in self.model.modules():  # what opacus leaves on the hooked layers
            for attr in ("activations", "max_batch_len"):
                if hasattr(module, attr):
                    delattr(module, attr)

    def sampled_steps(self, loader: DataLoader[Batch]) -> Iterator[list[Batch]]:
        """Each step's micro-batches: every example of ``loader.dataset`` in with probability q.

        The loader's own batching and order are not used, only its dataset and collate_fn.
        """
        rows = loader.dataset
        n, count = self.dp.num_examples, len(rows)  # type: ignore[arg-type]
        if count != n:
            raise ValueError(f"privacy.local_dp: set up for {n} training examples, the round has {count}")
        while True:
            chosen = (
                (torch.rand(n, generator=self.sampler) < self.dp.sample_rate).nonzero().flatten().tolist()
            )
            chunks = [chosen[i : i + self.micro_batch] for i in range(0, len(chosen), self.micro_batch)]
            yield [loader.collate_fn([rows[i] for i in chunk]) for chunk in chunks]

    def step(self, micro_batches: Sequence[Batch]) -> float | None:
        """Set ``.grad`` to the step's noisy mean gradient; its mean example loss (None: no example)."""
        losses = [self._accumulate(batch) for batch in micro_batches]
        dp = self.dp
        grads = noisy_mean(self.sums, dp.noise_multiplier, dp.max_grad_norm, dp.expected_batch, self.noise)
        for param, grad, total in zip(self.params, grads, self.sums, strict=True):
            param.grad = grad.to(param.dtype)
            total.zero_()
        return float(torch.cat(losses).mean()) if losses else None

    def _accumulate(self, batch: Batch) -> torch.Tensor:
        """Add the micro-batch's clipped per-example gradients to the sums; its per-example losses."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = per_example_loss(logits, batch["labels"])
        with warnings.catch_warnings():
            # the first adapter layer's input needs no gradient; its output's is all opacus uses
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        samples = [_grad_sample(p, len(losses)) for p in self.params]
        clipped, _ = clip_and_sum(samples, self.dp.max_grad_norm)
        for total, part, param in zip(self.sums, clipped, self.params, strict=True):
            total.add_(part)
            param.grad_sample = None  # type: ignore[attr-defined]  # opacus reads it on the next backward
            param.grad = None  # the unclipped batch gradient autograd also summed
        return losses.detach()
