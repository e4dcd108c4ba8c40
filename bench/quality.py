"""FedIT quality table: held-out loss of every method at the same optimiser-step budget.

Every method starts from the same model and the same seeded adapter
(``initial_adapter_state(cfg.model, seed=cfg.seed)``, B = 0), sees the same client
split, and takes the same total number of optimiser steps at the same batch size:

- a federated method: R rounds in which K of the N clients (``--fraction`` = fed.fraction_train,
  drawn per round by fedtune's seeded sampler) take S steps each: K*R*S steps;
- ``local``: each of the N clients trains its own adapter for K*R*S/N steps: K*R*S in all;
- ``centralised``: one adapter, K*R*S steps on the pooled train splits;
- ``base``: 0 steps (the base model), for reference.

Defaults: K = 2 of N = 8 clients a round (fraction 0.25; FedIT and OpenFedLLM sample a few
clients a round too), R = 48 rounds of S = 1 step: 96 steps per method, every method at
``train.lr`` 2e-3 (``--lr``). Why these (all measured on this bench's union loss, 96 steps,
constant lr; docs/quality.md has the numbers):

- with K*R*S fixed, a federation advances R*S sequential steps while centralised training
  takes K*R*S, so full participation (K = 8: 12 sequential steps) is the slowest federation
  for a given budget; S = 1 keeps client drift smallest;
- the shared lr 2e-3 is the best of 5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 4e-3 for centralised
  training and for FedAvg, on the test split and (1.5e-3, 2e-3, 3e-3, seeds 0-2) on the
  ``--validation`` split; a constant lr beat a cosine one (``--schedule``) for both;
- the ``fedavg`` row is FedAvg with a server step size (``--server-lr``, eta): the global
  adapter moves eta times the clients' weighted mean update (Reddi et al. 2021, server SGD;
  run as Flower's FedAvgM with momentum 0, ``fed.strategy = "fedavgm"``). The default is a
  rule, not a tuned value: eta = K, so a round of K parallel client steps moves as far as K
  sequential steps would. ``--server-lr 1`` is plain FedAvg.

``fedprox``, ``fedadam``, ``stack``, ``zero-pad`` and ``fflora`` get no server step size
(``fedadam`` has its own eta, see ``federated_settings``). ``train.num_threads`` also
applies to the in-process methods (``--set train.num_threads=1`` for one core, with ``--set
simulation.num_cpus=1`` for Ray).

Federated methods run through ``fedtune.launch.run`` (Flower's simulation runtime)
without in-run evaluation; their final adapter is then evaluated here, in the same
process and on the same model as the in-process methods. A method whose strategy is not
registered (``fflora`` until it lands) is listed as "not available" and picked up
without edits once ``fed.strategy`` knows it.

Metrics: held-out loss (token-weighted within a split) on each client's own test split,
averaged over clients ("own"), and on the union of all test splits, token-weighted
("union"). Per-client models (``local``, ``fflora`` personal) report the mean over
clients of each model's own-test and union loss. ``--validation`` adds "val-union": the
union loss on each client's next ``--max-test`` held-out examples after its test ones
(small clients may have none), to choose settings on without looking at the test split.
``--seeds 0,1,2`` prints one table per seed (the seed moves the train/test split, the
adapter's start, the client sampling and the batches), then their mean, whose goal line
comes last: one seed's share moves by several points between seeds.

Usage: python bench/quality.py [--rounds 48] [--steps 1] [--fraction 0.25] [--lr 2e-3]
       [--schedule constant] [--server-lr K] [--clients 8] [--methods base,fedavg]
       [--seeds 0,1,2] [--validation]
Last line: ``fedavg_share_of_centralised_gain: X`` (goal >= 0.95; with several seeds, of
their mean losses).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedtune.config import Config, LoraConfig, apply_overrides, read_toml, set_dotted, validate
from fedtune.data.pipeline import client_tokenized, partitions
from fedtune.errors import FedtuneError
from fedtune.federated.strategies import STRATEGIES, sample_clients
from fedtune.launch import run
from fedtune.models.adapters import (
    ADAPTER_CONFIG,
    StateDict,
    attach_lora,
    initial_adapter_state,
    load_adapter_state,
    read_adapter_folder,
    save_adapter_folder,
)
from fedtune.models.load import load_model, load_tokenizer
from fedtune.rundir import RunDir
from fedtune.training.local import EvalResult, evaluate, train
from fedtune.training.schedule import SCHEDULES

log = logging.getLogger("quality")

# Called while a method's adapter is active on ``bench.model`` (after its held-out loss):
# ``(bench, method, pid)``, pid None for a model every client shares, else the client whose own
# model it is (local, fflora). bench/fedit_judge.py generates answers there; None changes nothing.
Visit = Callable[["Bench", str, "int | None"], None]

IN_PROCESS = ("base", "local", "centralised")
FEDERATED = ("fedavg", "fedprox", "fedadam", "stack", "zero-pad", "fflora")
METHODS = IN_PROCESS + FEDERATED
PROXIMAL_MU = 0.01  # FedProx's weight: small next to the LM loss (~2-4), as in the FedProx paper's range


@dataclass
class Row:
    method: str
    own: float | None = None  # mean over clients of the own-test loss
    union: float | None = None  # token-weighted loss on the union of test splits
    steps: int | None = None  # optimiser steps taken in total
    seconds: float = 0.0
    note: str = ""
    val_union: float | None = None  # union loss on the validation split (--validation)


def own_and_union(per_client: Sequence[EvalResult]) -> tuple[float, float]:
    """(mean of the clients' own-test losses, token-weighted loss over all their tokens)."""
    own = statistics.fmean(r.loss for r in per_client)
    tokens = sum(r.num_tokens for r in per_client)
    union = sum(r.loss * r.num_tokens for r in per_client) / max(tokens, 1)
    return own, union


class Bench:
    """The model (loaded once), tokenizer, every client's data, and evaluation helpers."""

    def __init__(self, cfg: Config, *, validation: bool = False) -> None:
        self.cfg = cfg
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(cfg.model)
        self.model: PeftModel = attach_lora(load_model(cfg.model), cfg.model.lora)
        self.start: StateDict = initial_adapter_state(cfg.model, seed=cfg.seed)
        # the held-out split uncapped: its first max_test examples are the test split (as
        # data.max_test_examples cuts it), the next ones the validation split (--validation)
        held = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_test_examples": None})})
        data = [client_tokenized(held, self.tokenizer, pid) for pid in range(len(partitions(cfg)))]
        cap = cfg.data.max_test_examples
        self.trains: list[Dataset] = [tr for tr, _ in data]
        self.tests: list[Dataset] = [te.select(range(min(len(te), cap or len(te)))) for _, te in data]
        self.vals: list[Dataset] = []
        if validation:
            assert cap is not None, "--validation needs --max-test"
            # a small client may have none left: the split covers the clients that do
            vals = [te.select(range(cap, min(len(te), 2 * cap))) for _, te in data]
            self.vals = [v for v in vals if len(v)]
            if not self.vals:
                raise SystemExit(f"--validation: no client holds a held-out example past the {cap} test ones")
            log.info("validation split: %s examples per client", [len(v) for v in vals])

    @property
    def num_clients(self) -> int:
        return len(self.tests)

    def _evaluate(self, splits: Sequence[Dataset]) -> list[EvalResult]:
        batch = self.cfg.train.eval_batch_size
        return [evaluate(self.model, ds, self.tokenizer, batch) for ds in splits]

    def losses(self) -> list[EvalResult]:
        """The active adapter's held-out loss on every client's test split."""
        return self._evaluate(self.tests)

    def val_union(self) -> float | None:
        """The active adapter's union loss on the validation splits (None without them)."""
        return own_and_union(self._evaluate(self.vals))[1] if self.vals else None

    def train_from_start(self, ds: Dataset, steps: int, seed: int) -> None:
        load_adapter_state(self.model, self.start)
        train_cfg = self.cfg.train.model_copy(update={"max_steps": steps, "epochs": None})
        train(self.model, ds, self.tokenizer, train_cfg, seed=seed)

    def folder_losses(
        self, folder: Path, *, val: bool = False, visit: Callable[[], None] | None = None
    ) -> tuple[list[EvalResult], float | None]:
        """Evaluate a peft adapter folder (test split; with ``val``, the validation union too).

        An adapter of another rank/alpha is loaded beside ours. ``visit`` is called after the
        losses, while the folder's adapter is still the active one."""
        lora = self.cfg.model.lora
        meta = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        same = (
            meta.get("r") == lora.r
            and meta.get("lora_alpha") == lora.alpha
            and set(meta.get("target_modules") or []) == set(lora.target_modules)
            and not meta.get("rank_pattern")
            and not meta.get("alpha_pattern")
        )
        if same:
            load_adapter_state(self.model, read_adapter_folder(folder))
            return self._losses_then(val, visit)
        # e.g. a stacked (rank sum r_k, scaling 1) or fused adapter: peft builds its layers
        self.model.load_adapter(str(folder), adapter_name="probe")
        self.model.set_adapter("probe")
        try:
            return self._losses_then(val, visit)
        finally:
            self.model.set_adapter("default")  # also makes "default" trainable again
            self.model.delete_adapter("probe")

    def _losses_then(
        self, val: bool, visit: Callable[[], None] | None
    ) -> tuple[list[EvalResult], float | None]:
        results, val_union = self.losses(), self.val_union() if val else None
        if visit is not None:
            visit()
        return results, val_union


# -- config --------------------------------------------------------------------------
def base_tree(args: argparse.Namespace) -> dict[str, Any]:
    """The config file plus this bench's settings (no method-specific keys yet)."""
    tree = read_toml(args.config)
    tree.get("train", {}).pop("epochs", None)  # the step budget needs max_steps
    settings: dict[str, Any] = {
        "fed.rounds": args.rounds,
        "train.max_steps": args.steps,
        "partition.num_partitions": args.clients,
        "data.max_test_examples": args.max_test,
        "fed.fraction_train": args.fraction,  # K of the N clients train in a round
        "train.scheduler": args.schedule,  # in-process methods: over their whole step budget
    }
    if args.lr is not None:
        settings["train.lr"] = args.lr
    if args.data:
        settings["data.source"] = args.data
    if args.format:
        settings["data.format"] = args.format
    if args.column:
        settings |= {"partition.name": "category", "partition.column": args.column}
    for key, value in settings.items():
        set_dotted(tree, key, value)
    return tree


def method_config(tree: dict[str, Any], settings: dict[str, Any], user: Sequence[str]) -> Config:
    """``tree`` + a method's settings + the user's ``--set`` overrides (which win)."""
    tree = copy.deepcopy(tree)
    for key, value in settings.items():
        set_dotted(tree, key, value)
    apply_overrides(tree, user)
    return validate(tree, source="bench/quality.py config")


def clients_per_round(cfg: Config, num_clients: int) -> int:
    """K: how many clients a federated round trains (Flower's sample size for fraction_train)."""
    fed = cfg.fed
    return len(sample_clients(range(num_clients), fed.fraction_train, fed.min_train_clients, cfg.seed, 1))


def federated_settings(
    method: str, cfg: Config, out: str, server_lr: float = 1.0, schedule: str = "constant"
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "fed.strategy": method,
        # the same lr curve over the run as the in-process methods: one value per round
        "fed.lr_schedule": schedule,
        "train.scheduler": "constant",
        "fed.evaluate_before": False,
        "fed.fraction_evaluate": 0.0,  # evaluated afterwards, here, on the same model
        "run.report": False,
        "run.output_dir": out,
        "run.name": f"quality-{method}-seed{cfg.seed}",
    }
    if method == "fedavg" and server_lr != 1.0:  # FedAvg with a server step size: FedAvgM, momentum 0
        settings |= {"fed.strategy": "fedavgm", "fed.server_lr": server_lr, "fed.server_momentum": 0.0}
    if method == "fedprox":
        settings["fed.proximal_mu"] = PROXIMAL_MU
    if method == "fedadam":
        # Flower's FedAdam moves a coordinate by ~eta * m / (sqrt(v) + tau), i.e. ~eta per
        # round once tau << |update|. A client's AdamW moves a LoRA coordinate by at most
        # lr per step, S * lr per round (4 * 5e-4 = 2e-3 in the demo), and averaging
        # non-IID clients roughly halves that: eta = S * lr / 2 (1e-3 in the demo) keeps
        # the server at the clients' pace. Flower's default eta = 0.1 would move every
        # coordinate ~50x further per round than the clients do. Its default tau = 1e-3
        # is as large as the updates (~1e-3), and in round 1 sqrt(v) = 0.1 |update|, so
        # the step would shrink to < 0.1 x FedAvg's: hence tau = eta / 100.
        eta = cfg.train.max_steps * cfg.train.lr / 2 if cfg.train.max_steps else 1e-3
        settings |= {"fed.server_lr": eta, "fed.tau": eta / 100}
    return settings


# -- methods -------------------------------------------------------------------------
def run_base(bench: Bench, visit: Visit | None = None) -> Row:
    load_adapter_state(bench.model, bench.start)
    own, union = own_and_union(bench.losses())
    row = Row("base", own, union, steps=0, val_union=bench.val_union())
    if visit is not None:
        visit(bench, "base", None)
    return row


def run_local(bench: Bench, total: int, visit: Visit | None = None) -> Row:
    owns, unions = [], []
    each = max(1, round(total / bench.num_clients))  # K*R*S / N steps per client
    for pid, ds in enumerate(bench.trains):
        bench.train_from_start(ds, each, seed=bench.cfg.seed * 1000 + pid)
        results = bench.losses()
        owns.append(results[pid].loss)
        unions.append(own_and_union(results)[1])
        log.info("local %s: own %.4f union %.4f", pid, owns[-1], unions[-1])
        if visit is not None:
            visit(bench, "local", pid)
    return Row("local", statistics.fmean(owns), statistics.fmean(unions), steps=each * bench.num_clients)


def run_centralised(bench: Bench, total: int, visit: Visit | None = None) -> Row:
    bench.train_from_start(concatenate_datasets(bench.trains), total, seed=bench.cfg.seed)
    own, union = own_and_union(bench.losses())
    row = Row("centralised", own, union, steps=total, val_union=bench.val_union())
    if visit is not None:
        visit(bench, "centralised", None)
    return row


def fused_personal(global_dir: Path, personal_dir: Path, cfg: Config, scratch: Path) -> Path:
    """A folder holding global + personal as one adapter (FF-LoRA's fused model).

    If ``personal_dir`` already holds the fusion (its leading B columns are the global
    B, as :func:`fedtune.federated.aggregation.ranks.fuse` lays them out) it is used as is.
    """
    from fedtune.federated.aggregation.ranks import fuse, module_ranks

    g = {k: v.numpy() for k, v in read_adapter_folder(global_dir).items()}
    p = {k: v.numpy() for k, v in read_adapter_folder(personal_dir).items()}
    b_keys = [k for k in g if k.endswith(".lora_B.weight")]
    if set(g) == set(p) and all(
        p[k].shape[1] > g[k].shape[1] and np.allclose(p[k][:, : g[k].shape[1]], g[k]) for k in b_keys
    ):
        return personal_dir

    def scaling(folder: Path) -> float:
        meta = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        return float(meta["lora_alpha"]) / float(meta["r"])

    fused = fuse(g, scaling(global_dir), p, scaling(personal_dir))
    rank = next(iter(module_ranks(fused).values()))
    lora = LoraConfig(r=rank, alpha=rank, dropout=0.0, target_modules=cfg.model.lora.target_modules)
    state = {k: torch.from_numpy(v) for k, v in fused.items()}
    return save_adapter_folder(state, lora, cfg.model, scratch / personal_dir.parent.name)


def _personal(run_dir: RunDir, pid: int) -> list[Path]:
    """Client ``pid``'s newest personal adapter folder, or none if it never trained."""
    try:
        return [run_dir.latest_personal(pid)]
    except FedtuneError:
        return []


def run_federated(bench: Bench, method: str, cfg: Config, visit: Visit | None = None) -> list[Row]:
    """Run the federation, then evaluate its final (and any personal) adapters here."""

    def visiting(name: str, pid: int | None) -> Callable[[], None] | None:
        return None if visit is None else lambda: visit(bench, name, pid)

    run_dir = run(cfg, progress=False)
    trained = [m for m in run_dir.metrics() if m.get("phase") == "train"]
    assert cfg.train.max_steps is not None
    steps = len(trained) * cfg.train.max_steps  # client-rounds x S
    rejected = sum("rejected" in m for m in trained)
    note = f"run {run_dir.path.name}" + (f"; {rejected} updates rejected" if rejected else "")
    if method == "fedadam":
        note = f"eta={cfg.fed.server_lr:g} tau={cfg.fed.tau:g}; {note}"
    if method == "fedavg" and cfg.fed.strategy == "fedavgm":
        note = f"server lr {cfg.fed.server_lr:g}; {note}"
    name = "fflora-global" if method == "fflora" else method
    results, val_union = bench.folder_losses(run_dir.final_dir(), val=True, visit=visiting(name, None))
    own, union = own_and_union(results)
    rows = [Row(name, own, union, steps=steps, note=note, val_union=val_union)]
    if method != "fflora":
        return rows
    # a client keeps its personal adapter in the run directory (one per round it trained);
    # a client never sampled has none and serves the global adapter alone
    found = [_personal(run_dir, pid) for pid in range(bench.num_clients)]
    if not any(found):
        return [*rows, Row("fflora", note="skipped: no personal adapters in the run")]
    scratch = Path(tempfile.mkdtemp(prefix="fused-", dir=run_dir.path))
    owns, unions = [], []
    for pid, folders in enumerate(found):
        folder = run_dir.final_dir()
        if folders:  # the newest personal adapter, fused with the final global one
            folder = fused_personal(folder, folders[0], cfg, scratch)
        results, _ = bench.folder_losses(folder, visit=visiting("fflora", pid))
        owns.append(results[pid].loss)
        unions.append(own_and_union(results)[1])
    missing = sum(not folders for folders in found)
    note = f"global + own personal adapter, fused; run {run_dir.path.name}"
    if missing:
        note += f"; {missing} clients never sampled: global alone"
    fflora = Row("fflora", statistics.fmean(owns), statistics.fmean(unions), steps, note=note)
    return [*rows, fflora]


# -- report --------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: Sequence[Row]) -> None:
    header = ("method", "own-test", "union", "val-union", "opt steps", "seconds", "note")
    body = [
        (r.method, fmt(r.own), fmt(r.union), fmt(r.val_union), fmt(r.steps, "d"), f"{r.seconds:.0f}", r.note)
        for r in rows
    ]
    n = len(header) - 1  # the note is last and unpadded
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(n)]
    for line in [header, *body]:
        cells = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:n], widths[1:], strict=True)]
        print("  ".join([*cells, line[n]]).rstrip())


def share_of_gain(rows: Sequence[Row]) -> str:
    """FedAvg's share of centralised training's union gain over the base model, or "n/a"."""
    union = {r.method: r.union for r in rows if r.union is not None}
    if not {"base", "fedavg", "centralised"} <= union.keys():
        return "n/a"
    gain = union["base"] - union["centralised"]
    if gain <= 0:  # centralised training did not help: the share is meaningless
        return "n/a"
    return f"{(union['base'] - union['fedavg']) / gain:.3f}"


def goal_lines(rows: Sequence[Row]) -> list[str]:
    union = {r.method: r.union for r in rows if r.union is not None}
    own = {r.method: r.own for r in rows if r.own is not None}
    beats_local = str(union["fedavg"] < union["local"]) if {"fedavg", "local"} <= union.keys() else "n/a"
    fflora = str(own["fflora"] < own["fedavg"]) if {"fflora", "fedavg"} <= own.keys() else "n/a"
    return [
        f"fedavg_beats_local_on_union: {beats_local}",
        f"fflora_beats_fedavg_on_own: {fflora}",
        "# goal: fedavg_share_of_centralised_gain >= 0.95 (union: base->fedavg / base->centralised gain)",
        f"fedavg_share_of_centralised_gain: {share_of_gain(rows)}",
    ]


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS and m not in STRATEGIES]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {', '.join(METHODS)} or any strategy")
    return names


def build_parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    """This bench's options (bench/fedit_judge.py adds its own to them)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--rounds", type=int, default=48, help="R: federated rounds")
    parser.add_argument("--steps", type=int, default=1, help="S: optimiser steps per client per round")
    parser.add_argument("--clients", type=int, default=8, help="N: partition.num_partitions")
    parser.add_argument(
        "--fraction", type=float, default=0.25, help="fed.fraction_train: K = fraction x N clients a round"
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="train.lr of every method")
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="constant",
        help="lr over the run: train.scheduler over an in-process method's steps, "
        "fed.lr_schedule over a federation's rounds",
    )
    parser.add_argument(
        "--server-lr",
        type=float,
        help="eta: the fedavg row's global adapter moves eta x the clients' mean update "
        "(default K, the clients a round; 1: plain FedAvg)",
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, in table order")
    parser.add_argument("--data", help="data.source: a local file or datasets name")
    parser.add_argument("--format", help="data.format of --data (e.g. dolly)")
    parser.add_argument("--column", help="category column: one client per largest category")
    parser.add_argument("--max-test", type=int, default=12, help="held-out examples per client")
    parser.add_argument("--output-dir", help="where federated runs go (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument(
        "--validation",
        action="store_true",
        help="also report the union loss on a validation split (up to --max-test held-out examples "
        "after each client's test ones; small clients may have none) of base, centralised and each "
        "federation's global adapter: choose settings on it, not on the test split",
    )
    parser.add_argument(
        "--seeds", help="comma-separated seeds: one table each, then their mean (default: the config's seed)"
    )
    return parser


def import_federated_stack() -> None:
    """Import the whole federated stack now: the source tree may change during a long bench,
    and modules first imported an hour in would not match those imported at the start."""
    for module in ("fedtune.federated.client_app", "fedtune.federated.server_app", "fedtune.report"):
        importlib.import_module(module)


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    methods = parse_methods(args.methods)
    import_federated_stack()

    try:
        seeds: list[int | None] = [int(x) for x in args.seeds.split(",")] if args.seeds else [None]
    except ValueError:
        parser.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    tables = []
    for seed in seeds:
        user = [*args.set, *([] if seed is None else [f"seed={seed}"])]
        rows = run_table(args, methods, user)
        tables.append(rows)
        for line in goal_lines(rows):
            print(line)
    if len(seeds) > 1:
        print(f"\nmean over seeds {args.seeds}:")
        summary = mean_rows(tables)
        print_table(summary)
        shares = " ".join(share_of_gain(t) for t in tables)
        print(f"fedavg_share_of_centralised_gain per seed: {shares}")
        for line in goal_lines(summary):
            print(line)


def run_table(
    args: argparse.Namespace, methods: Sequence[str], user: Sequence[str], visit: Visit | None = None
) -> list[Row]:
    """Every requested method at one seed; prints and returns the table (``visit``: see :data:`Visit`)."""
    tree = base_tree(args)
    cfg = method_config(tree, {}, user)
    if cfg.train.num_threads:  # the in-process methods too (clients set it in client_app)
        torch.set_num_threads(cfg.train.num_threads)
    bench = Bench(cfg, validation=args.validation)
    n, r, s = bench.num_clients, args.rounds, args.steps
    k = clients_per_round(cfg, n)
    total = k * r * s
    server_lr = float(k) if args.server_lr is None else args.server_lr
    log.info("%s of %s clients x %s rounds x %s steps = %s optimiser steps per method", k, n, r, s, total)
    in_process: dict[str, Callable[[], Row]] = {
        "base": lambda: run_base(bench, visit),
        "local": lambda: run_local(bench, total, visit),
        "centralised": lambda: run_centralised(bench, total, visit),
    }
    federated = [m for m in methods if m not in in_process and m in STRATEGIES]
    out = args.output_dir or (tempfile.mkdtemp(prefix="fedtune-quality-") if federated else "")
    rows: list[Row] = []
    for method in methods:
        t0 = time.perf_counter()
        log.info("method %s", method)
        if method in in_process:
            rows.append(in_process[method]())
        elif method not in STRATEGIES:
            rows.append(Row(method, note=f"not available: fed.strategy {method!r} is not registered"))
        else:
            settings = federated_settings(method, cfg, out, server_lr, args.schedule)
            method_cfg = method_config(tree, settings, user)
            try:
                rows.extend(run_federated(bench, method, method_cfg, visit))
            except Exception as err:  # one broken strategy must not cost the other rows
                log.exception("method %s failed", method)
                rows.append(Row(method, note=f"failed: {type(err).__name__}: {err}".splitlines()[0]))
        rows[-1].seconds = time.perf_counter() - t0  # fflora: on its last row, the whole run

    print(
        f"\nmodel {cfg.model.name}, seed {cfg.seed}, lr {cfg.train.lr:g} ({args.schedule}), {k} of {n}"
        f" clients a round x {r} rounds x {s} steps = {total} steps per method"
    )
    if federated:
        print(f"federated runs in {out}")
    print_table(rows)
    return rows


def mean_rows(tables: Sequence[Sequence[Row]]) -> list[Row]:
    """One row per method: the mean over seeds of own and union (sd of union in the note)."""
    out = []
    for row in tables[0]:
        same = [r for t in tables for r in t if r.method == row.method and r.union is not None]
        if len(same) != len(tables):
            out.append(Row(row.method, note="missing at some seed"))
            continue
        unions = [r.union for r in same if r.union is not None]
        owns = [r.own for r in same if r.own is not None]
        vals = [r.val_union for r in same if r.val_union is not None]
        sd = statistics.stdev(unions) if len(unions) > 1 else 0.0
        note = f"mean of {len(same)} seeds; union sd {sd:.4f}"
        seconds = sum(r.seconds for r in same)
        mean = Row(row.method, statistics.fmean(owns), statistics.fmean(unions), row.steps, seconds, note)
        mean.val_union = statistics.fmean(vals) if len(vals) == len(same) else None
        out.append(mean)
    return out


if __name__ == "__main__":
    main()
