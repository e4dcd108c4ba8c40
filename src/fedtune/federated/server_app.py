"""Flower ServerApp: rounds of train -> aggregate -> evaluate, checkpointed every round.

The round loop is Flower's ``Strategy.start`` loop with what an LLM run needs
around it: a discovery query (partition id and data size of every node), a
round-0 evaluation of the starting adapter, a checkpoint of the global adapter and
the round's metrics after every round, and a start from the last complete round
when resuming. Two ways in:

- ``fedtune run`` builds the app with :func:`make_server_app` over a run directory it
  created (or one it resumes) and starts Flower's simulation runtime;
- ``flwr run .`` loads ``app`` below, which reads ``config-file`` (and dotted
  overrides) from the run config; ``resume-dir`` continues a run.
"""

from __future__ import annotations

import logging
import shlex
import time
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.config import flatten_dict, get_project_dir
from flwr.serverapp import Grid, ServerApp
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedtune.config import Config, apply_overrides, config_from_run_config
from fedtune.errors import FedtuneError
from fedtune.federated.records import from_record, to_record, to_torch
from fedtune.federated.strategies import AdapterStrategy, build_strategy
from fedtune.models.adapters import initial_adapter_state
from fedtune.rundir import RunDir

if TYPE_CHECKING:
    from fedtune.split.host import TrunkHost

log = logging.getLogger(__name__)


def discover(grid: Grid, cfg: Config, *, poll: float = 0.5) -> dict[int, int]:
    """Wait for the clients and ask each for its partition id: node id -> partition id."""
    expected = cfg.fed.min_available_clients or cfg.partition.num_partitions
    start = time.monotonic()
    next_note = start + 30
    while len(nodes := list(grid.get_node_ids())) < expected:
        now = time.monotonic()
        if now > start + cfg.fed.timeout:
            raise FedtuneError(f"only {len(nodes)} of {expected} clients connected within fed.timeout")
        if now > next_note:  # a mismatch with the number of SuperNodes looks like a hang otherwise
            logging.getLogger("flwr").warning(
                "waiting for clients: %s of %s connected "
                "(partition.num_partitions / fed.min_available_clients)",
                len(nodes),
                expected,
            )
            next_note = now + 30
        time.sleep(poll)
    config = ConfigRecord({"server-round": 0, "fedtune-config": cfg.to_toml()})
    messages = [
        Message(content=RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=node)
        for node in nodes
    ]
    clients: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.fed.timeout):
        if reply.has_error():
            raise FedtuneError(
                f"client on node {reply.metadata.src_node_id} failed to start: {reply.error.reason}"
            )
        pid = int(reply.content["metrics"]["partition-id"])  # type: ignore[index, arg-type]
        if pid in clients.values():
            raise FedtuneError(f"two nodes claim partition-id {pid}")
        clients[reply.metadata.src_node_id] = pid
    log.debug("clients (node -> partition): %s", clients)
    return clients


def _server_line(
    server_round: int, entries: list[dict[str, Any]], train: Any, evaluate: Any, seconds: float
) -> dict:
    line: dict[str, Any] = {
        "round": server_round,
        "phase": "server",
        "client": None,
        "bytes_up": sum(e["bytes_up"] for e in entries),
        "bytes_down": sum(e["bytes_down"] for e in entries),
        "seconds": seconds,
    }
    if train is not None:
        line["train_loss"] = float(train["train-loss"])
        line["num_clients"] = int(train["num-clients"])
    if evaluate is not None:
        line["eval_loss"] = float(evaluate["eval-loss"])
    return line


def run_federation(grid: Grid, cfg: Config, run: RunDir, *, progress: bool = True) -> None:
    """Run (or continue) the federation described by ``cfg`` into ``run``."""
    clients = discover(grid, cfg)
    last = run.last_round()
    if last < 0:  # fresh run: seeded starting adapter, evaluated as round 0
        run.save_round(0, initial_adapter_state(cfg.model, seed=cfg.seed), cfg)
    run.rollback_to(max(last, 0))
    current = run.load_round(max(last, 0))
    trunk = start_trunk_host(cfg, current) if cfg.split.enabled else None
    try:
        _rounds(grid, cfg, run, clients, current, trunk, progress=progress)
    finally:
        if trunk is not None:
            trunk.stop()


def _rounds(
    grid: Grid,
    cfg: Config,
    run: RunDir,
    clients: dict[int, int],
    current: dict[str, Any],
    trunk: TrunkHost | None,
    *,
    progress: bool,
) -> None:
    """The round loop. In a split run Flower carries only the client-side (head + tail) adapter;
    the trunk's lives in ``trunk`` and joins it in every checkpoint."""
    strategy: AdapterStrategy = build_strategy(cfg, clients)
    strategy.run_dir = str(run.path.resolve())  # where simulated clients may keep personal state
    last = run.last_round()
    extra = ConfigRecord()
    if trunk is not None:
        current = {k: v for k, v in current.items() if k not in trunk.keys}
        extra = ConfigRecord({"trunk-addresses": list(trunk.addresses)})

    def whole(state: Any) -> dict[str, Any]:  # torch state dict of every adapter weight
        return {**to_torch(state), **(trunk.adapter_state() if trunk is not None else {})}

    strategy.load_server_state(
        run.load_server_state(max(last, 0)), {k: v.numpy() for k, v in current.items()}
    )
    arrays = to_record(current, "float32")
    if last < 0:
        if cfg.fed.evaluate_before:
            t0 = time.perf_counter()
            evaluated = strategy.aggregate_evaluate(
                0,
                grid.send_and_receive(
                    strategy.configure_evaluate(0, arrays, extra, grid), timeout=cfg.fed.timeout
                ),
            )
            run.append_metrics(
                [
                    *strategy.round_log,
                    _server_line(0, strategy.round_log, None, evaluated, time.perf_counter() - t0),
                ]
            )
            strategy.round_log.clear()
        run.mark_complete(0)
        last = 0
    bar = Progress(
        TextColumn("[bold]federated rounds"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.description}"),
        TimeElapsedColumn(),
        disable=not progress,
    )
    with bar:
        task = bar.add_task("", total=cfg.fed.rounds, completed=last)
        for server_round in range(last + 1, cfg.fed.rounds + 1):
            t0 = time.perf_counter()
            if trunk is not None:
                trunk.begin_round()
            replies = grid.send_and_receive(
                strategy.configure_train(server_round, arrays, extra, grid), timeout=cfg.fed.timeout
            )
            new_arrays, trained = strategy.aggregate_train(server_round, replies)
            if new_arrays is None:
                raise FedtuneError(f"round {server_round}: no client returned an update (see the log)")
            trunk_stats = {}
            if trunk is not None:
                trunk_stats = trunk.round_stats()
                trunk.end_round()  # hierarchical: the replicas' trunk adapters averaged
            # float32 as checkpointed: Flower's optimisers can return float64 (numpy scalar
            # promotion), and a resumed run must continue from exactly what is on disk
            arrays = to_record(from_record(new_arrays), "float32")
            evaluated = strategy.aggregate_evaluate(
                server_round,
                grid.send_and_receive(
                    strategy.configure_evaluate(server_round, arrays, extra, grid),
                    timeout=cfg.fed.timeout,
                ),
            )
            line = _server_line(
                server_round, strategy.round_log, trained, evaluated, time.perf_counter() - t0
            )
            line.update(trunk_stats)
            state = from_record(arrays)
            run.save_round(
                server_round,
                whole(state),
                cfg,
                lora=strategy.global_lora(state),  # heterogeneous ranks: the global's own rank
                server_state=strategy.server_state(),
            )
            run.append_metrics([*strategy.round_log, line])
            run.mark_complete(server_round)
            strategy.round_log.clear()
            loss = (
                f"eval {line['eval_loss']:.3f}" if "eval_loss" in line else f"train {line['train_loss']:.3f}"
            )
            bar.update(task, completed=server_round, description=loss)
    state = from_record(arrays)
    run.save_final(whole(state), cfg, lora=strategy.global_lora(state))


def start_trunk_host(cfg: Config, state: dict[str, Any]) -> TrunkHost:
    """Load the model, keep its trunk with the adapter ``state`` and serve it (``split.mode``)."""
    from fedtune.split.host import TrunkHost
    from fedtune.split.lm import parts_from_config

    trunk = parts_from_config(cfg).trunk
    trunk.load_adapter_state_dict(state)
    return TrunkHost(trunk, cfg.split, cfg.split.trunk_lr or cfg.train.lr, cfg.train.grad_accum)


def make_server_app(cfg: Config, run: RunDir, *, progress: bool = True) -> ServerApp:
    """A ServerApp bound to a config and run directory (what ``fedtune run`` starts)."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, run, progress=progress)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``, configured by the run config.

    ``config-file`` is a fedtune TOML; a relative path is read from the installed app
    (the FAB that ``flwr run`` shipped), not from the process's working directory, which
    is whatever directory the SuperLink was started in. ``overrides`` holds
    space-separated dotted ``KEY=VALUE`` settings, as ``fedtune run --set`` takes them
    (Flower refuses run-config keys that pyproject does not declare, so they cannot be
    keys of their own). ``resume-dir`` continues a run directory on this host.
    """
    run_config = dict(context.run_config)
    resume = str(run_config.pop("resume-dir", "") or "")
    overrides = shlex.split(str(run_config.pop("overrides", "") or ""))
    if resume:
        if overrides:
            raise FedtuneError("resume-dir continues a run with its own config.toml; drop overrides")
        run = RunDir.open(resume)
        cfg = run.config()
    else:
        run_config.update(flatten_dict(apply_overrides({}, overrides)))
        app_dir = get_project_dir(grid.run.fab_id, grid.run.fab_version, grid.run.fab_hash)
        cfg = config_from_run_config(run_config, app_dir=app_dir)
        run = RunDir.create(cfg)
    # Flower forwards only its own logger's records to `flwr run --stream` and `flwr log`.
    logging.getLogger("flwr").info("fedtune run directory: %s", run.path.resolve())
    run_federation(grid, cfg, run, progress=False)
