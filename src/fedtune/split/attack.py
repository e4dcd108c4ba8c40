"""Inversion attack on the head's activations: how much of a client's text h1 gives away.

The attacker (the trunk server, which sees every h1) trains a per-position decoder from h1[t] to
the token id[t] on *public* data pushed through the same head, then reads the client's *private*
data off its activations. A per-position classifier (linear or one hidden layer) is the standard
strong baseline for shallow cuts: after one or two blocks the residual stream still holds the
token's embedding almost intact.

The attacker is assumed to know the defence (it is in the config both sides agree on), so with
activation noise on it trains on noised public activations too: the adaptive attacker, the honest
measure of a defence. Its label set is the tokens seen in the public data (a compact output layer
instead of the full vocabulary); a private token outside that set counts as not recovered.

Scores, on valid positions only: token recovery rate (exact match) and ROUGE-L F1 of the decoded
sequence against the true one, averaged over sequences.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedtune.split.partition_model import Head, valid_counts


@dataclass(frozen=True)
class AttackConfig:
    """The attacker's decoder and its training.

    Attributes
    ----------
    hidden
        Width of the decoder's hidden layer; 0 is a linear decoder.
    epochs
        Passes over the public positions.
    batch_size
        Positions per optimiser step.
    lr
        Adam's learning rate.
    seed
        Seed of the decoder's initialisation and shuffling.
    """

    hidden: int = 256
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden < 0 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"attack config: hidden >= 0, epochs >= 1, batch_size >= 1, lr > 0; got {self}")


@dataclass(frozen=True)
class AttackResult:
    """Attack scores on one data set."""

    recovery: float  # exact token accuracy over all valid positions
    rouge_l: float  # mean ROUGE-L F1 over sequences
    num_tokens: int
    num_sequences: int


@dataclass
class Decoder:
    """A trained per-position decoder and its label set (decoder class k is token ``vocab[k]``)."""

    net: nn.Module
    vocab: Tensor  # (K,) token ids

    @torch.no_grad()
    def predict(self, features: Tensor) -> Tensor:
        """Token ids (N,) for activations (N, H)."""
        return self.vocab[self.net(features.float()).argmax(dim=-1)]


Sequences = list[tuple[Tensor, Tensor]]  # per sequence: (activations (T_i, H), token ids (T_i,))


@torch.no_grad()
def head_activations(head: Head, batches: Iterable[Mapping[str, Tensor]]) -> Sequences:
    """Run the head on each batch and keep each sequence's valid positions.

    The head runs as the client would run it: any protection hooks on it apply, so with
    activation noise on these are the noised activations that cross the cut.
    """
    out: Sequences = []
    for batch in batches:
        input_ids = batch["input_ids"]
        valid = batch["valid"] if "valid" in batch else valid_counts(batch["attention_mask"])
        h1 = head(input_ids, valid).float().cpu()
        for i, n in enumerate(valid.tolist()):
            out.append((h1[i, :n], input_ids[i, :n].cpu()))
    return out


def train_decoder(public: Sequences, config: AttackConfig | None = None) -> Decoder:
    """Fit the attacker's decoder on public (activation, token) pairs.

    Parameters
    ----------
    public
        From :func:`head_activations` on public data.
    config
        Decoder size and training; defaults to :class:`AttackConfig`'s.
    """
    config = config or AttackConfig()
    features = torch.cat([h for h, _ in public])
    tokens = torch.cat([t for _, t in public])
    vocab, labels = torch.unique(tokens, return_inverse=True)
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # nn.Linear's init reads the global generator
    width = features.shape[1]
    # The LayerNorm makes one learning rate fit models whose activations differ in scale by 10x.
    layers: list[nn.Module] = [nn.LayerNorm(width, elementwise_affine=False)]
    if config.hidden:
        layers += [nn.Linear(width, config.hidden), nn.GELU(), nn.Linear(config.hidden, len(vocab))]
    else:
        layers.append(nn.Linear(width, len(vocab)))
    net = nn.Sequential(*layers)
    optim = torch.optim.Adam(net.parameters(), lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
    with torch.enable_grad():
        for _ in range(config.epochs):
            order = torch.randperm(len(labels), generator=gen)
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                optim.zero_grad()
                loss_fn(net(features[idx]), labels[idx]).backward()
                optim.step()
    net.eval()
    return Decoder(net, vocab)


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a) * len(b)))."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(reference: Sequence[int], hypothesis: Sequence[int]) -> float:
    """ROUGE-L F1 (beta = 1) of a hypothesis token sequence against a reference: 2PR / (P + R)."""
    lcs = lcs_length(reference, hypothesis)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hypothesis), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def evaluate_attack(decoder: Decoder, private: Sequences) -> AttackResult:
    """Decode each private sequence from its activations and score it against the true tokens."""
    correct = total = 0
    rouge = 0.0
    for h, tokens in private:
        guess = decoder.predict(h)
        correct += int((guess == tokens).sum())
        total += len(tokens)
        rouge += rouge_l_f1(tokens.tolist(), guess.tolist())
    n = max(len(private), 1)
    return AttackResult(correct / max(total, 1), rouge / n, total, len(private))


def invert(
    head: Head,
    public: Iterable[Mapping[str, Tensor]],
    private: Iterable[Mapping[str, Tensor]],
    config: AttackConfig | None = None,
) -> AttackResult:
    """The whole attack: train on ``public`` batches through ``head``, score on ``private`` ones.

    Install any defence on ``head`` first (:func:`~fedtune.split.protect.protect_parts`): the
    attacker then trains on, and attacks, protected activations.
    """
    decoder = train_decoder(head_activations(head, public), config)
    return evaluate_attack(decoder, head_activations(head, private))


__all__ = [
    "AttackConfig",
    "AttackResult",
    "Decoder",
    "evaluate_attack",
    "head_activations",
    "invert",
    "lcs_length",
    "rouge_l_f1",
    "train_decoder",
]
