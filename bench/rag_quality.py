"""FF-RAG quality: held-out answer loss, ROUGE-L and declines, with and without retrieval.

Arms (every trained one at the same optimiser-step budget, from the same seeded adapter;
see bench/quality.py, whose machinery this reuses):

- ``base`` / ``base+rag``: the untuned model, without and with evidence in the prompt;
- ``fedavg``: FedAvg, no retrieval (the baseline the goal names);
- ``fedavg+rag``: FedAvg with retrieval;
- ``ffrag-global`` / ``ffrag``: FF-LoRA with retrieval, the global adapter and each client's
  global + personal fusion (FF-RAG proper);
- ``ffrag+dual``: FF-RAG with ``rag.decline_fraction`` of decline examples (dual task);
- ``centralised+rag``: one adapter on the pooled train splits, with retrieval.

Data: the built-in ``wiki-qa`` (questions about wiki summaries, answered by the article's
first sentence), non-IID by category; the reference base is the wiki summaries
(``rag.reference = "wiki"``), each client's case base its own training records.

Metrics per arm: held-out answer loss on the clients' own test splits (mean over clients)
and on their union (token-weighted); ROUGE-L F1 of greedy answers on the first
``--gen-examples`` test questions of each client; for retrieval arms, the share of those
answers that decline (``rag.decline_text``) when the evidence holds the answer ("declined,
held") and when every answer-holding passage is removed ("declined, lacking").

Usage: python bench/rag_quality.py [--rounds 4] [--steps 3] [--clients 4] [--max-test 8]
       [--gen-examples 4] [--arms base,fedavg,...] [--set KEY=VALUE]
Last line: ``ffrag_minus_fedavg_union_loss: X`` (goal: < 0, and the own-split figure too).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import torch
from datasets import concatenate_datasets
from rouge_score import rouge_scorer

import quality as q  # bench/quality.py: Bench, configs, federated runs
from fedtune.config import Config
from fedtune.data.pipeline import client_conversations, partitions
from fedtune.data.tokenize import build_generation_input
from fedtune.data.types import Conversation
from fedtune.inference import greedy
from fedtune.rag.augment import Budget
from fedtune.rag.client import augment_dataset, client_retriever

log = logging.getLogger("rag_quality")
ARMS = ("base", "base+rag", "fedavg", "fedavg+rag", "ffrag", "ffrag+dual", "centralised+rag")
_ROUGE = rouge_scorer.RougeScorer(["rougeL"])


@dataclass
class Row:
    arm: str
    own: float | None = None
    union: float | None = None
    rouge_l: float | None = None
    declined_held: float | None = None
    declined_lacking: float | None = None
    seconds: float = 0.0
    note: str = ""


@dataclass
class Prompts:
    """Per client: (conversation, gold answer) to generate on, and the same with evidence lacking."""

    held: list[list[Conversation]] = field(default_factory=list)
    lacking: list[list[Conversation]] = field(default_factory=list)


def is_decline(text: str, decline_text: str) -> bool:
    """Whether an answer says the evidence lacks the answer (the decline text's first five words)."""
    head = " ".join(decline_text.lower().split()[:5])
    return head in " ".join(text.lower().split())


def make_prompts(cfg: Config, bench: q.Bench, n: int) -> Prompts:
    """Each client's first ``n`` test conversations as the arm will see them (plain or with evidence)."""
    out = Prompts()
    for pid in range(len(partitions(cfg))):
        train, test = client_conversations(cfg, pid)
        test = test.select(range(min(n, len(test))))
        if not cfg.rag.enabled:
            out.held.append(list(test["messages"]))
            continue
        retriever = client_retriever(cfg.rag, train)
        budget = Budget.of(cfg, bench.tokenizer)
        out.held.append(list(augment_dataset(test, retriever, budget)[0]["messages"]))
        lacking, _ = augment_dataset(test, retriever, budget, decline_fraction=1.0)
        gold = [c[-1]["content"] for c in test["messages"]]  # the real answer, not the decline text
        out.lacking.append(
            [
                [*c[:-1], {"role": "assistant", "content": g}]
                for c, g in zip(lacking["messages"], gold, strict=True)
            ]
        )
    return out


def generate(bench: q.Bench, conv: Conversation, max_new_tokens: int = 48) -> str:
    cfg = bench.cfg
    ids = build_generation_input(conv[:-1], bench.tokenizer, cfg.data.template, cfg.data.max_source_length)
    return greedy(bench.model, bench.tokenizer, ids, max_new_tokens)


def generation_metrics(bench: q.Bench, prompts: Prompts, pids: list[int], decline: str) -> dict[str, float]:
    """ROUGE-L F1 on the held prompts of clients ``pids``; decline shares on held and lacking ones."""
    rouge, held_dec, lack_dec = [], [], []
    for pid in pids:
        for conv in prompts.held[pid]:
            text = generate(bench, conv)
            rouge.append(_ROUGE.score(conv[-1]["content"], text)["rougeL"].fmeasure)
            held_dec.append(is_decline(text, decline))
        for conv in prompts.lacking[pid] if prompts.lacking else []:
            lack_dec.append(is_decline(generate(bench, conv), decline))
    out = {"rouge_l": statistics.fmean(rouge), "declined_held": statistics.fmean(held_dec)}
    if lack_dec:
        out["declined_lacking"] = statistics.fmean(lack_dec)
    return out


def load_folder(bench: q.Bench, folder: Path) -> None:
    """Make ``folder``'s adapter the active one (as Bench.folder_losses would, but left loaded)."""
    if "probe" in bench.model.peft_config:
        bench.model.set_adapter("default")
        bench.model.delete_adapter("probe")
    bench.model.load_adapter(str(folder), adapter_name="probe")
    bench.model.set_adapter("probe")


def score(bench: q.Bench, prompts: Prompts, pids: list[int], decline: str) -> dict[str, Any]:
    own, union = q.own_and_union(bench.losses())
    return {"own": own, "union": union, **generation_metrics(bench, prompts, pids, decline)}


def federated_row(arm: str, bench: q.Bench, prompts: Prompts, cfg: Config) -> list[Row]:
    """Run a federation; score its global adapter and, for FF-LoRA, each client's fused adapter."""
    run_dir = q.run(cfg, progress=False)
    n = bench.num_clients
    load_folder(bench, run_dir.final_dir())
    name = f"{arm}-global" if cfg.fed.strategy == "fflora" else arm
    rows = [Row(name, **score(bench, prompts, list(range(n)), cfg.rag.decline_text), note=run_dir.path.name)]
    if cfg.fed.strategy != "fflora":
        return rows
    scratch = Path(tempfile.mkdtemp(prefix="fused-", dir=run_dir.path))
    per: list[dict[str, Any]] = []
    for pid in range(n):
        personal = q._personal(run_dir, pid)
        folder = (
            q.fused_personal(run_dir.final_dir(), personal[0], cfg, scratch)
            if personal
            else run_dir.final_dir()
        )
        load_folder(bench, folder)
        results = bench.losses()
        per.append(
            {"own": results[pid].loss, "union": q.own_and_union(results)[1]}
            | generation_metrics(bench, prompts, [pid], cfg.rag.decline_text)
        )
    mean = {key: statistics.fmean(p[key] for p in per) for key in per[0]}
    return [*rows, Row(arm, **mean, note="global + own personal, fused; mean over clients")]


def settings_for(arm: str, cfg: Config, out: str, decline: float) -> dict[str, Any]:
    """The config settings of an arm: retrieval on or off, decline examples, the federation."""
    rag = arm.endswith("+rag") or arm.startswith("ffrag")
    settings: dict[str, Any] = {
        "rag.enabled": rag,
        "rag.decline_fraction": decline if arm == "ffrag+dual" else 0.0,
    }
    if arm.startswith(("fedavg", "ffrag")):
        settings |= q.federated_settings("fflora" if arm.startswith("ffrag") else "fedavg", cfg, out)
        settings["run.name"] = f"ragq-{arm.replace('+', '-')}-seed{cfg.seed}"
    return settings


def reset(bench: q.Bench) -> None:
    """Back to the default adapter at its seeded start."""
    if "probe" in bench.model.peft_config:
        bench.model.set_adapter("default")
        bench.model.delete_adapter("probe")
    q.load_adapter_state(bench.model, bench.start)


def run_arm(arm: str, ctx: dict[str, Any], args: argparse.Namespace) -> list[Row]:
    rag = arm.endswith("+rag") or arm.startswith("ffrag")
    bench, prompts = ctx["rag" if rag else "plain"]
    n, decline = bench.num_clients, ctx["cfg"].rag.decline_text
    if arm in ("base", "base+rag"):
        reset(bench)
        return [Row(arm, **score(bench, prompts, list(range(n)), decline), note="0 steps")]
    if arm == "centralised+rag":
        bench.train_from_start(concatenate_datasets(bench.trains), ctx["total"], seed=ctx["cfg"].seed)
        return [Row(arm, **score(bench, prompts, list(range(n)), decline), note=f"{ctx['total']} steps")]
    settings = settings_for(arm, ctx["cfg"], ctx["out"], args.decline)
    reset(bench)
    return federated_row(arm, bench, prompts, q.method_config(ctx["tree"], settings, args.set))


def fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[Row]) -> None:
    head = ("own loss", "union loss", "ROUGE-L", "decl held", "decl lack")
    print(f"{'arm':<17} " + " ".join(f"{h:>10}" for h in head) + f" {'s':>6}  note")
    for r in rows:
        cells = (fmt(r.own), fmt(r.union), fmt(r.rouge_l, ".3f"), fmt(r.declined_held, ".2f"))
        cells += (fmt(r.declined_lacking, ".2f"),)
        print(f"{r.arm:<17} " + " ".join(f"{c:>10}" for c in cells) + f" {r.seconds:>6.0f}  {r.note}")


def bench_args(args: argparse.Namespace) -> argparse.Namespace:
    """The settings bench/quality.py's base_tree reads."""
    keep = ("config", "rounds", "steps", "clients", "max_test", "lr")
    fixed = {"fraction": 1.0, "schedule": "constant", "data": None, "format": None, "column": None}
    return argparse.Namespace(**{k: getattr(args, k) for k in keep}, **fixed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/rag.toml")
    parser.add_argument("--rounds", type=int, default=4, help="federated rounds (every client trains each)")
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per client per round")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-test", type=int, default=8, help="held-out examples per client")
    parser.add_argument(
        "--gen-examples", type=int, default=4, help="test questions per client answered greedily"
    )
    parser.add_argument("--lr", type=float, default=None, help="train.lr (default: the config's)")
    parser.add_argument("--decline", type=float, default=0.25, help="rag.decline_fraction of ffrag+dual")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--output-dir", help="where federated runs go (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    arms = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in arms if a not in ARMS]:
        parser.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    tree = q.base_tree(bench_args(args))
    cfg = q.method_config(tree, {"rag.enabled": True, "rag.decline_fraction": 0.0}, args.set)
    plain = q.method_config(tree, {"rag.enabled": False}, args.set)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    ctx: dict[str, Any] = {
        "cfg": cfg,
        "tree": tree,
        "out": args.output_dir or tempfile.mkdtemp(prefix="ragq-"),
    }
    for key, c in (("plain", plain), ("rag", cfg)):
        bench = q.Bench(c)
        ctx[key] = (bench, make_prompts(c, bench, args.gen_examples))
    n = ctx["rag"][0].num_clients
    ctx["total"] = q.clients_per_round(cfg, n) * args.rounds * args.steps
    rows: list[Row] = []
    for arm in arms:
        t0 = time.perf_counter()
        log.info("arm %s", arm)
        rows += run_arm(arm, ctx, args)
        rows[-1].seconds = time.perf_counter() - t0
    print(
        f"\nmodel {cfg.model.name}, seed {cfg.seed}, {n} clients x {args.rounds} rounds x {args.steps} steps"
    )
    print(f"= {ctx['total']} steps per trained arm; runs in {ctx['out']}")
    print_table(rows)
    by = {r.arm: r for r in rows}
    if "ffrag" in by and "fedavg" in by and by["ffrag"].own is not None and by["fedavg"].own is not None:
        print(f"ffrag_minus_fedavg_own_loss: {by['ffrag'].own - by['fedavg'].own:.4f}")
        print(f"ffrag_minus_fedavg_union_loss: {by['ffrag'].union - by['fedavg'].union:.4f}")


if __name__ == "__main__":
    main()
