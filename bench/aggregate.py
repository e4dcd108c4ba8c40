"""Server-side aggregation time for 100 client adapters: FedAvg and FLoRA stacking.

Adapters have SmolLM2-135M-like shapes: 30 layers x (q, k, v, o), hidden 576, k/v
projecting to 192 (3 KV heads x 64). At r = 8 an adapter has
30 x 2 x (8 x 576 + 576 x 8 + 8 x 576 + 192 x 8) = 921,600 parameters (~0.92M).

- FedAvg (``fedtune.federated.aggregation.fedavg.fedavg``): 100 rank-8 adapters;
- stacking (``fedtune.federated.aggregation.ranks.stack``): 100 adapters with FLoRA's ranks
  (64, 32, 16, 16, 8, 8, 4, 4, 4, 4 cycled; mean rank 16, so twice FedAvg's input),
  giving one adapter of rank 1,600.

Each is timed best of ``--repeats`` on random float32 data (the time does not depend on
the values).

Usage: python bench/aggregate.py [--clients 100] [--repeats 3]
Last line: ``aggregate_100_s: X`` = the larger of the two (goals: FedAvg <= 1 s,
stacking <= 2 s on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from fedtune.federated.aggregation.fedavg import fedavg
from fedtune.federated.aggregation.ranks import rank_rule, stack

LAYERS = 30
HIDDEN = 576
KV = 192  # 3 KV heads x 64
MODULES = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (KV, HIDDEN),
    "v_proj": (KV, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
}


def random_adapter(rng: np.random.Generator, rank: int) -> dict[str, np.ndarray]:
    state: dict[str, np.ndarray] = {}
    for layer in range(LAYERS):
        for name, (out, inp) in MODULES.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            state[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, inp), dtype=np.float32)
            state[f"{prefix}.lora_B.weight"] = rng.standard_normal((out, rank), dtype=np.float32)
    return state


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# One function per side so each side's adapters (~0.4 GB and ~0.7 GB) are freed on return.
def time_fedavg(rng: np.random.Generator, clients: int, weights: list[int], repeats: int) -> float:
    states = [random_adapter(rng, 8) for _ in range(clients)]
    return best_of(repeats, lambda: fedavg(states, weights))


def time_stack(rng: np.random.Generator, ranks: list[int], weights: list[int], repeats: int) -> float:
    states = [random_adapter(rng, r) for r in ranks]
    scalings = [16.0 / r for r in ranks]  # lora_alpha 16 on every client
    return best_of(repeats, lambda: stack(states, weights, scalings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    weights = rng.integers(50, 500, size=args.clients).tolist()  # example counts

    print(f"params_per_adapter: {sum(v.size for v in random_adapter(rng, 8).values())}")
    fedavg_s = time_fedavg(rng, args.clients, weights, args.repeats)
    print(f"fedavg_{args.clients}_s: {fedavg_s:.3f}")
    ranks = rank_rule("flora", args.clients)
    print(f"stacked_rank: {sum(ranks)}")
    stack_s = time_stack(rng, ranks, weights, args.repeats)
    print(f"stack_{args.clients}_s: {stack_s:.3f}")
    print(f"aggregate_{args.clients}_s: {max(fedavg_s, stack_s):.3f}")


if __name__ == "__main__":
    main()
