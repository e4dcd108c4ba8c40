"""The knowledge boundary (FF-RAG's dual task): does the tuned model decline when, and only when,
the evidence lacks the answer?

Arms: the untuned model, and federated runs with retrieval (``--strategy``: FedAvg, the
global side of FF-RAG, by default; ``fflora`` scores each client's fused adapter) trained
with a share of decline examples, without (``d<share>``) or with (``i<share>``) the
``rag.instruction`` given by ``--instruction`` (``{decline_text}`` is replaced). Every
trained arm has the same optimiser-step budget from the same seeded adapter.

Metrics per arm, on every held-out question of every client, each asked twice: with its
evidence as retrieved ("held": it holds the answer) and with every answer-holding passage
removed ("lacking"):

- forced choice (``fedtune.rag.boundary``): the decline margin, mean log-prob per token of
  ``rag.decline_text`` minus the gold answer's; ``fc held`` / ``fc lack``: the share whose
  margin is > 0 (the model would rather decline than give the answer); ``fc acc``: the
  boundary accuracy, (1 - fc held + fc lack) / 2 (0.5: no boundary);
- greedy answers to the first ``--gen-examples`` questions per client: the share that
  decline, held and lacking, and ROUGE-L on the held ones;
- held-out answer loss (held evidence, union over clients).

With ``--strategy fflora`` each client's global + personal fusion is scored on its own
questions (the mean over clients is reported).

Usage: python bench/rag_boundary.py [--rounds 4] [--steps 6] [--arms d0.25,i0,i0.25]
       [--instruction TEXT] [--max-test 16] [--gen-examples 4] [--strategy fedavg|fflora]
Last line: ``boundary_accuracy: X`` (the best trained arm's ``fc acc``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import torch

import quality as q  # bench/quality.py: Bench, configs, federated runs
import rag_quality as rq  # bench/rag_quality.py: prompts held / lacking, generation, fused adapters
from fedtune.config import Config
from fedtune.rag.boundary import boundary_accuracy, decline_margin, declined_share

log = logging.getLogger("rag_boundary")
INSTRUCTION = "Answer from the evidence. If it does not contain the answer, reply: {decline_text}"


@dataclass
class Row:
    arm: str
    union: float
    acc: float
    fc_held: float
    fc_lack: float
    gen_held: float
    gen_lack: float
    rouge_l: float
    seconds: float = 0.0


def margins(bench: q.Bench, convs: list[Any]) -> list[float]:
    cfg = bench.cfg
    data = cfg.data
    limits = {"max_source_length": data.max_source_length, "max_target_length": data.max_target_length}
    return [
        decline_margin(bench.model, bench.tokenizer, c, cfg.rag.decline_text, data.template, **limits)
        for c in convs
    ]


def measure(bench: q.Bench, prompts: rq.Prompts, gen: rq.Prompts, pids: list[int]) -> dict[str, float]:
    """The arm's metrics on clients ``pids`` with the active adapter."""
    held = margins(bench, [c for p in pids for c in prompts.held[p]])
    lack = margins(bench, [c for p in pids for c in prompts.lacking[p]])
    gen_metrics = rq.generation_metrics(bench, gen, pids, bench.cfg.rag.decline_text)
    return {
        "union": q.own_and_union(bench.losses())[1],
        "acc": boundary_accuracy(held, lack),
        "fc_held": declined_share(held),
        "fc_lack": declined_share(lack),
        "gen_held": gen_metrics["declined_held"],
        "gen_lack": gen_metrics["declined_lacking"],
        "rouge_l": gen_metrics["rouge_l"],
    }


def federated(arm: str, cfg: Config, ctx: dict[str, Any]) -> Row:
    bench, prompts, gen = ctx["bench"]
    rq.reset(bench)
    run_dir = q.run(cfg, progress=False)
    n = bench.num_clients
    rq.load_folder(bench, run_dir.final_dir())
    if cfg.fed.strategy != "fflora":
        return Row(arm, **measure(bench, prompts, gen, list(range(n))))
    scratch = Path(tempfile.mkdtemp(prefix="fused-", dir=run_dir.path))
    per = []
    for pid in range(n):  # each client's global + personal fusion, on its own questions
        personal = q._personal(run_dir, pid)
        folder = q.fused_personal(run_dir.final_dir(), personal[0], cfg, scratch) if personal else None
        rq.load_folder(bench, folder or run_dir.final_dir())
        per.append(measure(bench, prompts, gen, [pid]))
    return Row(arm, **{key: statistics.fmean(p[key] for p in per) for key in per[0]})


def arm_config(
    ctx: dict[str, Any], decline: float, instruction: str | None, args: argparse.Namespace
) -> Config:
    cfg = ctx["cfg"]
    settings = q.federated_settings(args.strategy, cfg, ctx["out"])
    tag = f"d{round(decline * 100)}{'-instr' if instruction else ''}"
    settings |= {
        "rag.enabled": True,
        "rag.decline_fraction": decline,
        "rag.instruction": instruction,
        "run.name": f"ragb-{tag}-seed{cfg.seed}",
    }
    return q.method_config(ctx["tree"], settings, args.set)


def print_table(rows: list[Row]) -> None:
    head = ("union loss", "fc acc", "fc held", "fc lack", "gen held", "gen lack", "ROUGE-L", "s")
    print(f"{'arm':<22} " + " ".join(f"{h:>10}" for h in head))
    for r in rows:
        cells: tuple[str, ...] = (f"{r.union:.4f}", f"{r.acc:.3f}", f"{r.fc_held:.2f}", f"{r.fc_lack:.2f}")
        cells += (f"{r.gen_held:.2f}", f"{r.gen_lack:.2f}", f"{r.rouge_l:.3f}", f"{r.seconds:.0f}")
        print(f"{r.arm:<22} " + " ".join(f"{c:>10}" for c in cells))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/rag.toml")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per client per round")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-test", type=int, default=16, help="held-out questions per client")
    parser.add_argument("--gen-examples", type=int, default=4, help="questions per client answered greedily")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument(
        "--strategy", default="fedavg", help="fed.strategy: fedavg (FF-RAG's global side) or fflora (fused)"
    )
    parser.add_argument(
        "--arms",
        default="d0.25,i0,i0.25",
        help="trained arms: d<fraction> (plain prompt) or i<fraction> (with --instruction), "
        "fraction = rag.decline_fraction; the untuned model is scored for each prompt used",
    )
    parser.add_argument("--instruction", default=INSTRUCTION, help="rag.instruction of the i arms")
    parser.add_argument("--output-dir", help="where federated runs go (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args()


def parse_arms(text: str) -> list[tuple[bool, float]]:
    """``d0.25,i0,i0.25`` -> [(instructed, decline_fraction), ...]: ``d`` plain prompt, ``i`` instructed."""
    arms = []
    for spec in (a.strip() for a in text.split(",") if a.strip()):
        if spec[0] not in "di":
            raise SystemExit(f"--arms: {spec!r} must start with d (no instruction) or i (instruction)")
        arms.append((spec[0] == "i", float(spec[1:])))
    return arms


def main() -> None:
    args = parse()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    tree = q.base_tree(rq.bench_args(args))
    arms = parse_arms(args.arms)
    ctx: dict[str, Any] = {"tree": tree, "out": args.output_dir or tempfile.mkdtemp(prefix="ragb-")}
    rows: list[Row] = []
    for instructed in sorted({i for i, _ in arms}):
        instruction = args.instruction if instructed else None
        ctx["cfg"] = cfg = q.method_config(
            tree, {"rag.enabled": True, "rag.decline_fraction": 0.0, "rag.instruction": instruction}, args.set
        )
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        bench = q.Bench(cfg)
        prompts, n = rq.make_prompts(cfg, bench, args.max_test), args.gen_examples
        gen = rq.Prompts([h[:n] for h in prompts.held], [lack[:n] for lack in prompts.lacking])
        ctx["bench"] = (bench, prompts, gen)
        suffix = " +instr" if instruction else ""
        t0 = time.perf_counter()
        rq.reset(bench)
        rows.append(Row(f"base{suffix}", **measure(bench, prompts, gen, list(range(bench.num_clients)))))
        rows[-1].seconds = time.perf_counter() - t0
        for decline in (d for i, d in arms if i == instructed):
            t0 = time.perf_counter()
            arm = f"decline {decline:.2f}{suffix}"
            log.info("arm %s", arm)
            rows.append(federated(arm, arm_config(ctx, decline, instruction, args), ctx))
            rows[-1].seconds = time.perf_counter() - t0
    total = q.clients_per_round(ctx["cfg"], ctx["bench"][0].num_clients) * args.rounds * args.steps
    print(f"\nmodel {ctx['cfg'].model.name}, seed {ctx['cfg'].seed}, {total} steps per trained arm")
    print(f"runs in {ctx['out']}")
    print_table(rows)
    trained = [r for r in rows if not r.arm.startswith("base")]
    print(f"boundary_accuracy: {max(r.acc for r in trained):.3f}" if trained else "boundary_accuracy: -")


if __name__ == "__main__":
    main()
