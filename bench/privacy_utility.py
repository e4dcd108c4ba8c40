"""Utility of client-level DP-FedAvg (issue 14): held-out loss at ε ∈ {1, 4, 8, ∞}, LoRA and FFA-LoRA.

The built-in chatterbot data split into N = 100 Dirichlet clients (``partition.alpha`` 0.5,
``partition.min_partition_size`` 3: with ``data.test_fraction`` 0.2 every client keeps at least
2 training examples and 1 held-out one; checked and printed at the start). Every setting is
FedAvg over R rounds of S local steps from the same seeded adapter, with cohorts of
m = 10 and m = 50 clients a round (``fed.fraction_train`` 0.1 and 0.5), plain LoRA and
FFA-LoRA (``model.lora.freeze_a``: only B is trained and sent), at

- ε = ∞: ``privacy.dp`` off, plain FedAvg (weighted by examples, nothing clipped): the
  non-private reference of its cohort and LoRA kind;
- ε ∈ {1, 4, 8}: ``privacy.dp`` on, ``privacy.target_epsilon`` = ε over the R rounds, δ unset
  (fedtune's 1/N^1.1), fixed-size sampling (``--sampling``; the issue's choice, accounted as
  replace-one with sensitivity 2C; fedtune's default is now poisson), the RDP accountant, server
  noise; fedtune calibrates the noise multiplier z before round 1. Below the table, the z
  Poisson sampling would need for the same ε, R and m (accounting only, not run).

Each run goes through ``fedtune.launch.run`` (Flower's simulation, no in-run evaluation);
its final adapter is evaluated here, in process, as bench/quality.py does (whose ``Bench``
this reuses): the union of the 100 clients' held-out splits, token-weighted. Reported per
setting: z, the ε the run reports (``final/privacy.json``; the PLD ε too where defined: it is
not for fixed-size sampling), the final union loss, the share of the non-private improvement
kept, ``(base − dp) / (base − non-private)`` against the ε = ∞ run of the same cohort and LoRA
kind, and the per-round noise-to-signal ratio ``‖noise‖ / ‖mean of clipped updates‖`` from
``metrics.jsonl`` (mean over rounds and the last). d, the adapter values a client sends, is
printed per LoRA kind: the noise on the mean has norm ≈ z·C·√d / m, against a signal of at
most C.

Choices, each by rule (one measurement, no grids):

- model ``tiny-llama`` (configs/tiny.toml: 2 random layers, LoRA r 4 on q/k/v/o). SmolLM2 takes
  ~1.8 s a step on 2 cores, so one cohort-50 round alone is minutes: the 16 settings do not fit
  ~40 minutes at any useful R x S;
- R = 4 rounds of S = 2 steps (batch 4), the same for every setting, sized from one timed
  setting (m = 50, FFA-LoRA, ε ∈ {∞, 8}, R = 2, S = 3) on the 2-core machine beside other work:
  ~0.8-1.0 s per client-round at S = 3 with one torch thread, ~70 s per run besides (Flower and
  Ray starting, the client actor's first model and data load, the evaluation here). 16 runs x
  70 s + 480 R client-rounds x ~0.65 s at S = 2 ≈ 41 minutes for R = 4 (the run of record took
  32 minutes, 1,923 s, as the other work eased); ``train.num_threads`` 1
  and ``simulation.num_cpus`` 1, because two torch threads on two busy cores took 5x longer a step;
- lr 2e-3 (constant, AdamW): bench/quality.py's default, the one lr this repository swept
  (docs/quality.md), not re-tuned here;
- clip norm C, one per LoRA kind and the same for every ε and both cohorts: the median L2
  norm of the round-1 updates (the part a client sends: A and B, or only B under FFA-LoRA) of
  the 50 clients the non-private cohort-50 run samples in round 1, trained here in process
  from the same start with the same S, lr and batch;
- the DP runs' noise and sampling come from the server's secret seed, so a rerun draws other
  noise and other cohorts: each DP row is one draw.

Usage: python bench/privacy_utility.py [--rounds 4] [--steps 2] [--lr 2e-3] [--epsilons 1,4,8,inf]
       [--cohorts 10,50] [--kinds lora,ffa] [--sampling fixed] [--output-dir DIR] [--set KEY=VALUE]
Last line: ``best_share_at_eps8: X``, the best share of the non-private improvement kept at
ε = 8 over cohorts and LoRA kinds (goal ≥ 0.5).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import torch

import quality as q  # bench/quality.py: Bench, configs, evaluation
from fedtune.config import Config, set_dotted
from fedtune.federated.strategies import sample_clients
from fedtune.federated.strategies.base import AdapterStrategy
from fedtune.federated.task import client_seed
from fedtune.launch import run
from fedtune.models.adapters import adapter_state, load_adapter_state
from fedtune.privacy.accounting import calibrate_noise, default_delta
from fedtune.privacy.dpfedavg import global_norm

log = logging.getLogger("privacy_utility")
KINDS = {"lora": False, "ffa": True}  # LoRA kind -> model.lora.freeze_a
POPULATION = 100


@dataclass
class Row:
    cohort: int
    kind: str
    epsilon: float  # the target; math.inf: privacy.dp off
    z: float | None = None
    eps_rdp: float | None = None
    eps_pld: float | None = None
    union: float | None = None
    share: float | None = None
    nsr_mean: float | None = None
    nsr_last: float | None = None
    rejected: int = 0
    seconds: float = 0.0
    note: str = ""

    @property
    def name(self) -> str:
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        return f"m={self.cohort} {self.kind} eps={eps}"


def bench_tree(args: argparse.Namespace) -> dict[str, Any]:
    """configs/tiny.toml with this bench's data, split, budget and threads (no setting's keys yet)."""
    base = argparse.Namespace(
        config=args.config,
        rounds=args.rounds,
        steps=args.steps,
        clients=POPULATION,
        max_test=None,  # every held-out example: the union split is all of them
        fraction=0.1,  # replaced per setting
        schedule="constant",
        lr=args.lr,
        data="chatterbot",
        format=None,
        column=None,
    )
    tree = q.base_tree(base)
    for key, value in {
        "partition.name": "dirichlet",
        "partition.alpha": 0.5,
        "partition.min_partition_size": 3,  # round(3 x 0.2) = 1 held out, 2 to train
        "data.max_train_examples": None,  # tiny.toml caps at 16: use every example
        "train.num_threads": 1,
        "simulation.num_cpus": 1,
    }.items():
        set_dotted(tree, key, value)
    return tree


def setting_config(
    tree: dict[str, Any], row: Row, clip: float, sampling: str, out: str, user: list[str]
) -> Config:
    settings = q.federated_settings("fedavg", q.method_config(tree, {}, user), out)
    settings |= {
        "fed.fraction_train": row.cohort / POPULATION,
        "model.lora.freeze_a": KINDS[row.kind],
        "run.name": f"dp-m{row.cohort}-{row.kind}-eps{row.epsilon:g}",
    }
    if not math.isinf(row.epsilon):
        settings |= {
            "privacy.dp": True,
            "privacy.target_epsilon": row.epsilon,
            "privacy.clip_norm": clip,
            "privacy.sampling": sampling,
        }
    return q.method_config(tree, settings, user)


def check_split(bench: q.Bench) -> str:
    trains = [len(ds) for ds in bench.trains]
    tests = [len(ds) for ds in bench.tests]
    if min(trains) < 2 or min(tests) < 1:
        raise SystemExit(f"split: a client has {min(trains)} training / {min(tests)} held-out examples")
    return (
        f"{len(trains)} clients: train examples min {min(trains)} / median "
        f"{statistics.median(trains):g} / max {max(trains)} (sum {sum(trains)}); held-out min "
        f"{min(tests)}, union {sum(tests)} examples"
    )


def sent_dims(cfg: Config, bench: q.Bench) -> int:
    """d: the adapter values a client sends (the strategy's own rule: all, or B under FFA-LoRA)."""
    sent = AdapterStrategy(cfg, {}).sent_part({k: v.numpy() for k, v in bench.start.items()})
    return sum(v.size for v in sent.values())


def median_update_norm(cfg: Config, bench: q.Bench) -> float:
    """C: the median norm of the sent part of the round-1 updates of the non-private cohort-50 run."""
    strategy = AdapterStrategy(cfg, {})
    pids = sample_clients(range(bench.num_clients), cfg.fed.fraction_train, 1, cfg.seed, 1)
    ffa = cfg.model.lora.freeze_a  # the clients' rule: A stays at its start
    frozen = [p for n, p in bench.model.named_parameters() if ffa and ".lora_A." in n]
    start = strategy.sent_part({k: v.numpy() for k, v in bench.start.items()})
    norms = []
    try:
        for p in frozen:
            p.requires_grad = False
        for pid in pids:
            bench.train_from_start(bench.trains[pid], cfg.train.max_steps or 0, client_seed(cfg.seed, 1, pid))
            trained = strategy.sent_part({k: v.numpy() for k, v in adapter_state(bench.model).items()})
            norms.append(global_norm({k: trained[k].astype(np.float64) - start[k] for k in start}))
    finally:
        for p in frozen:
            p.requires_grad = True
        load_adapter_state(bench.model, bench.start)
    log.info("round-1 update norms (%s clients): %s", len(norms), [round(x, 4) for x in sorted(norms)])
    return float(statistics.median(norms))


def run_setting(bench: q.Bench, row: Row, cfg: Config) -> None:
    """Run one setting, evaluate its final adapter here and fill ``row``."""
    run_dir = run(cfg, progress=False)
    servers = [m for m in run_dir.metrics() if m.get("phase") == "server" and m.get("round", 0) > 0]
    row.rejected = sum("rejected" in m for m in run_dir.metrics() if m.get("phase") == "train")
    results, _ = bench.folder_losses(run_dir.final_dir())
    row.union = q.own_and_union(results)[1]
    row.note = f"run {run_dir.path.name}"
    if (stopped := run_dir.stopped()) is not None:
        row.note += f"; stopped after round {run_dir.last_round()}: {stopped}"
    if not cfg.privacy.dp:
        return
    privacy = run_dir.privacy()
    assert privacy is not None, "a DP run without final/privacy.json"
    row.z, row.eps_rdp, row.eps_pld = privacy["noise_multiplier"], privacy["epsilon"], privacy["epsilon_pld"]
    ratios = [m["noise_to_signal"] for m in servers if m.get("noise_to_signal") is not None]
    if ratios:
        row.nsr_mean, row.nsr_last = statistics.fmean(ratios), ratios[-1]
    if abs(servers[-1]["epsilon"] - row.eps_rdp) > 1e-9:
        row.note += f"; metrics.jsonl's last ε {servers[-1]['epsilon']:.4g} != privacy.json's"
    if row.eps_rdp > row.epsilon:
        row.note += f"; ε {row.eps_rdp:.4g} past the target"


def fill_shares(rows: list[Row], base: float) -> None:
    reference = {(r.cohort, r.kind): r.union for r in rows if math.isinf(r.epsilon)}
    for r in rows:
        ref = reference.get((r.cohort, r.kind))
        if r.union is not None and ref is not None and base - ref > 0:
            r.share = (base - r.union) / (base - ref)


def print_table(rows: list[Row], base: float) -> None:
    header = ("setting", "z", "eps", "eps_pld", "union_loss", "share_kept", "nsr_mean", "nsr_last")
    header += ("seconds", "note")
    body = [("base model", "-", "-", "-", q.fmt(base), "-", "-", "-", "-", "")]
    for r in rows:
        note = (f"{r.rejected} updates rejected; " if r.rejected else "") + r.note
        body.append(
            (
                r.name,
                q.fmt(r.z, ".3f"),
                q.fmt(r.eps_rdp, ".3f"),
                q.fmt(r.eps_pld, ".3f"),
                q.fmt(r.union),
                q.fmt(r.share, ".3f"),
                q.fmt(r.nsr_mean, ".2f"),
                q.fmt(r.nsr_last, ".2f"),
                f"{r.seconds:.0f}",
                note,
            )
        )
    n = len(header) - 1  # the note is last and unpadded
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(n)]
    for line in [header, *body]:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:n], widths[1:], strict=True)]
        print("  ".join([*cells, line[n]]).rstrip())


def print_other_sampling(sampling: str, cohorts: list[int], epsilons: list[float], cfg: Config) -> None:
    """The noise multiplier the other sampling would need for the same ε, R and m (accounting only)."""
    other = "poisson" if sampling == "fixed" else "fixed"
    delta = default_delta(POPULATION)
    for m in cohorts:
        zs = [
            calibrate_noise(eps, delta, POPULATION, m, cfg.fed.rounds, sampling=other, accountant="rdp")
            for eps in epsilons
        ]
        each = ", ".join(f"eps={e:g}: z={z:.3f}" for e, z in zip(epsilons, zs, strict=True))
        print(f"  not run: {other} sampling, m={m}, same R and δ, RDP: {each}")


def parse_list(text: str, kind: type) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--rounds", type=int, default=4, help="R: federated rounds of every setting")
    parser.add_argument("--steps", type=int, default=2, help="S: local optimiser steps per client per round")
    parser.add_argument("--lr", type=float, default=2e-3, help="train.lr of every setting")
    parser.add_argument("--epsilons", default="1,4,8,inf", help="target ε values; inf: privacy.dp off")
    parser.add_argument("--cohorts", default="10,50", help=f"clients a round, of {POPULATION}")
    parser.add_argument("--kinds", default="lora,ffa", help="lora (A and B) and/or ffa (FFA-LoRA: B only)")
    parser.add_argument(
        "--sampling",
        choices=("fixed", "poisson"),
        default="fixed",
        help="privacy.sampling of the DP runs (fixed: m clients without replacement, replace-one)",
    )
    parser.add_argument("--output-dir", help="where the runs go (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    epsilons = sorted(parse_list(args.epsilons, float), reverse=True)  # ∞ first: the shares' reference
    cohorts, kinds = parse_list(args.cohorts, int), parse_list(args.kinds, str)
    if unknown := set(kinds) - KINDS.keys():
        parser.error(f"--kinds: unknown {sorted(unknown)}; known: {', '.join(KINDS)}")
    # import the whole federated stack now: the source tree may change during the bench
    for module in ("fedtune.federated.client_app", "fedtune.federated.server_app", "fedtune.report"):
        importlib.import_module(module)

    t_start = time.perf_counter()
    tree = bench_tree(args)
    cfg = q.method_config(tree, {}, args.set)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    bench = q.Bench(cfg)
    split = check_split(bench)
    load_adapter_state(bench.model, bench.start)
    base = q.own_and_union(bench.losses())[1]
    out = args.output_dir or tempfile.mkdtemp(prefix="fedtune-dp-utility-")

    dims, clips = {}, {}
    for kind in kinds:
        largest = {"model.lora.freeze_a": KINDS[kind], "fed.fraction_train": max(cohorts) / POPULATION}
        kind_cfg = q.method_config(tree, largest, args.set)
        dims[kind] = sent_dims(kind_cfg, bench)
        t0 = time.perf_counter()
        clips[kind] = median_update_norm(kind_cfg, bench)
        log.info("%s: d = %s, C = %.5g (%.0f s)", kind, dims[kind], clips[kind], time.perf_counter() - t0)

    rows = []
    for cohort in cohorts:
        for kind in kinds:
            for eps in epsilons:
                row = Row(cohort, kind, eps)
                log.info("setting %s", row.name)
                cfg_row = setting_config(tree, row, clips[kind], args.sampling, out, args.set)
                t0 = time.perf_counter()
                try:
                    run_setting(bench, row, cfg_row)
                except Exception as err:  # one failed setting must not cost the others
                    log.exception("setting %s failed", row.name)
                    row.note = f"failed: {type(err).__name__}: {err}".splitlines()[0]
                row.seconds = time.perf_counter() - t0
                rows.append(row)
    fill_shares(rows, base)

    delta = default_delta(POPULATION)
    print(
        f"\nmodel {cfg.model.name}, seed {cfg.seed}; {split}\n"
        f"R = {cfg.fed.rounds} rounds x S = {cfg.train.max_steps} steps (batch {cfg.train.batch_size}), "
        f"lr {cfg.train.lr:g} ({cfg.train.optimizer}, constant); δ = 1/N^1.1 = {delta:.3g}; "
        f"sampling {args.sampling}, accountant {cfg.privacy.accountant}, noise on the server"
    )
    for kind in kinds:
        print(f"{kind}: d = {dims[kind]} values sent; C = {clips[kind]:.5g} (median round-1 update norm)")
    print(f"runs in {out}; total {time.perf_counter() - t_start:.0f} s\n")
    print_table(rows, base)
    print_other_sampling(args.sampling, cohorts, [e for e in epsilons if not math.isinf(e)], cfg)
    at8 = [r.share for r in rows if r.epsilon == 8 and r.share is not None]
    print("# goal: best_share_at_eps8 >= 0.5 (share of the non-private improvement kept at ε = 8)")
    print(f"best_share_at_eps8: {max(at8):.3f}" if at8 else "best_share_at_eps8: n/a")


if __name__ == "__main__":
    main()
