"""Inversion attack on split learning's head activations, with activation noise off and on.

For each defence sigma (noise std relative to ``--scale``: by default each sample's activation
RMS, ``channel`` each channel's std; see ``fedtune.split.protect``) on a fresh copy of the same
LoRA model:

1. train the split model (head -> trunk -> tail, noise on h1 when sigma > 0) for ``--steps`` steps
   on the client's private training data, then take its held-out LM loss (noise on, as deployed);
2. attack the trained head: a per-position decoder h1[t] -> token[t] trained on public data pushed
   through the same (noised) head, scored on the private training data: token recovery rate and
   ROUGE-L F1 over all valid positions.

Data: ``tiny`` (default, seconds): a 6-layer 64-wide random Llama with a 128-token vocabulary and
sequences from a seeded random bigram chain (public and private are draws from the same chain).
``--model smollm2``: SmolLM2-135M-Instruct; public = chatterbot categories 0-3 (name order),
private = the other category with the most distinct conversations (trivia), deduplicated, so the
held-out sequences are disjoint from the ones trained on and attacked.

Goal: a sigma that cuts recovery at least in half costs at most 5% held-out loss.
Usage: python bench/split_attack.py [--model smollm2] [--n-head 1] [--scale sample] [--sigmas 0,1]
Last line: ``loss_cost_pct: X`` (of the smallest sigma that halves recovery, else the largest).
"""

from __future__ import annotations

import argparse
import copy
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch
from torch import Tensor

Batch = dict[str, Tensor]
TINY_VOCAB = 128


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> list[Batch]:
    """Right-padded batches of (ids, labels) rows, with valid counts."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        for i, (row_ids, row_labels) in enumerate(chunk):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            labels[i, : len(row_labels)] = torch.tensor(row_labels)
        out.append({"input_ids": ids, "labels": labels, "valid": torch.tensor([len(r) for r, _ in chunk])})
    return out


def tiny_setup(args: argparse.Namespace) -> tuple[torch.nn.Module, list[Batch], list[Batch], list[Batch]]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    # A learnable language: each token has 4 likely successors (ln 4 = 1.39 nats at best).
    gen = torch.Generator().manual_seed(args.seed)
    successors = torch.randint(0, TINY_VOCAB, (TINY_VOCAB, 4), generator=gen)

    def draw(n: int) -> list[tuple[list[int], list[int]]]:
        rows = []
        for _ in range(n):
            seq = [int(torch.randint(0, TINY_VOCAB, (1,), generator=gen))]
            for _ in range(args.seq_len - 1):
                seq.append(int(successors[seq[-1], torch.randint(0, 4, (1,), generator=gen)]))
            rows.append((seq, seq))
        return rows

    public, private, held_out = draw(args.public), draw(args.private), draw(args.held_out)
    return model, *(_pad(rows, 0, args.batch_size) for rows in (public, private, held_out))  # type: ignore[return-value]


def smollm2_setup(args: argparse.Namespace) -> tuple[torch.nn.Module, list[Batch], list[Batch], list[Batch]]:
    from fedtune.config import LoraConfig, ModelConfig
    from fedtune.data.builtin import load_chatterbot
    from fedtune.data.tokenize import tokenize_dataset
    from fedtune.models.adapters import attach_lora
    from fedtune.models.load import load_model, load_tokenizer

    cfg = ModelConfig(name="smollm2")
    tokenizer = load_tokenizer(cfg)
    model = attach_lora(load_model(cfg), LoraConfig(dropout=0.0), seed=args.seed)
    ds = load_chatterbot()
    categories = sorted(set(ds["category"]))
    public_cats = set(categories[:4])
    half = args.seq_len // 2
    tok = tokenize_dataset(ds, tokenizer, "chat", max_source_length=half, max_target_length=half)

    def rows(keep: set[str]) -> list[tuple[list[int], list[int]]]:
        return [(r["input_ids"], r["labels"]) for r in tok if r["category"] in keep]

    def distinct(rows: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
        return list({tuple(ids): (ids, labels) for ids, labels in rows}.values())

    # Count distinct conversations: "tech support" has 1,050 rows but only 10 distinct ones, so
    # with duplicates the held-out set would be the training set again.
    counts = {c: len(distinct(rows({c}))) for c in categories if c not in public_cats}
    private_cat = max(counts, key=lambda c: counts[c])
    public = rows(public_cats)[: args.public]
    private = distinct(rows({private_cat}))
    train, held_out = private[: args.private], private[args.private : args.private + args.held_out]
    print(
        f"public: {sorted(public_cats)} ({len(public)} seqs); private: {private_cat!r} "
        f"({len(train)} train, {len(held_out)} held out)"
    )
    pad = int(tokenizer.pad_token_id)
    return model, *(_pad(r, pad, args.batch_size) for r in (public, train, held_out))  # type: ignore[return-value]


@torch.no_grad()
def held_out_loss(parts: tuple, batches: list[Batch]) -> float:
    """Token-weighted LM loss through head -> trunk -> tail (protection hooks apply)."""
    head, trunk, tail = parts
    total = tokens = 0.0
    for batch in batches:
        h1 = head(batch["input_ids"], batch["valid"])
        _, loss = tail(trunk(h1, batch["valid"]), batch["valid"], batch["labels"])
        n = int((batch["labels"][:, 1:] != -100).sum())
        total, tokens = total + float(loss) * n, tokens + n
    return total / max(tokens, 1)


def run_sigma(args: argparse.Namespace, base: torch.nn.Module, data: tuple, sigma: float) -> dict[str, float]:
    from fedtune.split import cut_model, split_step
    from fedtune.split.attack import AttackConfig, invert
    from fedtune.split.protect import ProtectConfig, protect_parts

    public, private, held_out = data
    model = copy.deepcopy(base)
    head, trunk, tail = cut_model(model, args.n_head, args.n_tail)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=args.lr)
    protect = ProtectConfig(activation_sigma=sigma, seed=args.seed, activation_scale=args.scale)
    with protect_parts(head, tail, protect):
        model.train()
        for step in range(args.steps):
            optim.zero_grad()
            split_step(head, trunk, tail, private[step % len(private)])
            optim.step()
        model.eval()
        loss = held_out_loss((head, trunk, tail), held_out)
        attack = AttackConfig(hidden=args.attack_hidden, epochs=args.attack_epochs, seed=args.seed)
        result = invert(head, public, private, attack)
    return {"sigma": sigma, "recovery": result.recovery, "rouge_l": result.rouge_l, "loss": loss}


def main() -> None:
    from fedtune.split.protect import NOISE_SCALES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--n-head", type=int, default=1)
    parser.add_argument("--n-tail", type=int, default=1)
    parser.add_argument("--sigmas", default="0,0.25,0.5,1,2")
    parser.add_argument("--scale", choices=sorted(NOISE_SCALES), default="sample", help="sigma relative to")
    parser.add_argument("--public", type=int, default=256, help="public sequences for the attacker")
    parser.add_argument("--private", type=int, default=64, help="private sequences trained on and attacked")
    parser.add_argument("--held-out", type=int, default=64, help="private sequences for the held-out loss")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100, help="split training steps per sigma")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--attack-hidden", type=int, default=256)
    parser.add_argument("--attack-epochs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    base, *data = (smollm2_setup if args.model == "smollm2" else tiny_setup)(args)
    rows = []
    print(f"{'sigma':>6} {'recovery':>9} {'rouge_l':>8} {'held_out_loss':>14} {'loss_cost_%':>12}")
    for sigma in (float(s) for s in args.sigmas.split(",")):
        row = run_sigma(args, base, tuple(data), sigma)
        rows.append(row)
        cost = 100 * (row["loss"] / rows[0]["loss"] - 1)
        print(
            f"{sigma:>6.2f} {row['recovery']:>9.3f} {row['rouge_l']:>8.3f} {row['loss']:>14.4f} {cost:>12.2f}"
        )
    clean = rows[0]
    assert clean["sigma"] == 0, "the first sigma must be 0: it is the baseline"
    halved = [r for r in rows[1:] if r["recovery"] <= clean["recovery"] / 2]
    chosen = halved[0] if halved else rows[-1]
    cost_pct = 100 * (chosen["loss"] / clean["loss"] - 1)
    took = time.perf_counter() - start
    setting = f"model: {args.model}  n_head: {args.n_head}  scale: {args.scale}  steps: {args.steps}"
    print(f"{setting}  {took:.0f} s")
    print(f"chosen_sigma: {chosen['sigma']}")
    print(f"recovery_cut_by_half: {bool(halved)}")
    print(f"goal_met: {bool(halved) and cost_pct <= 5.0}")
    print(f"loss_cost_pct: {cost_pct:.2f}")


if __name__ == "__main__":
    main()
