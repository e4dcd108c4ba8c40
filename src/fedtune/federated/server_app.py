"""Flower ServerApp: rounds of train -> aggregate -> evaluate, checkpointed every round.

The round loop is Flower's ``Strategy.start`` loop with what an LLM run needs around it:
a discovery query (partition id and data size of every node), a round-0 evaluation of
the starting adapter, a checkpoint of the global adapter and the round's metrics after
every round, a start from the last complete round when resuming, and progress within a
round. Split learning joins through one :class:`~fedtune.split.rounds.RoundHook`. Two ways in:

- ``fedtune run`` builds the app with :func:`make_server_app` over a run directory it
  created (or one it resumes) and starts Flower's simulation runtime;
- ``flwr run .`` loads ``app`` below, which reads ``config-file`` (and dotted
  overrides) from the run config; ``resume-dir`` continues a run.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedtune.config import Config, apply_overrides, config_from_run_config
from fedtune.errors import FedtuneError
from fedtune.federated.progress import RoundProgress
from fedtune.federated.protocol import ProtocolError, QueryReply, RoundMetrics, query_message, read_reply
from fedtune.federated.records import from_record, to_record, to_torch
from fedtune.federated.secagg import secure_round
from fedtune.federated.strategies import AdapterStrategy, build_strategy, check_strategy
from fedtune.metrics import server_line
from fedtune.models.adapters import initial_adapter_state
from fedtune.privacy.plan import check_privacy
from fedtune.rundir import RunDir
from fedtune.split.rounds import RoundHook, round_hook

log = logging.getLogger(__name__)


def collect(
    grid: Grid,
    messages: Iterable[Message],
    timeout: float,
    on_reply: Callable[[int, int], None],
    poll: float = 0.2,
) -> list[Message]:
    """Send ``messages`` and gather the replies until all are in or ``timeout`` seconds pass.

    Flower's ``Grid.send_and_receive`` with a callback per reply (progress within a round)
    and a shorter poll; built on the Grid's public ``push_messages`` / ``pull_messages``.
    """
    pending = set(grid.push_messages(messages))
    total, replies = len(pending), []
    on_reply(0, total)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        if got:
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            on_reply(len(replies), total)
        elif pending:
            time.sleep(poll)
    return replies


def wait_for_nodes(grid: Grid, cfg: Config, poll: float = 0.5) -> list[int]:
    """The node ids, once ``fed.min_available_clients`` (else every partition) are connected."""
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
    return nodes


def discover(grid: Grid, cfg: Config, *, poll: float = 0.5) -> dict[int, int]:
    """Wait for the clients and ask each for its partition id: node id -> partition id."""
    nodes = wait_for_nodes(grid, cfg, poll)
    clients: dict[int, int] = {}
    for reply in grid.send_and_receive([query_message(cfg, n) for n in nodes], timeout=cfg.fed.timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise FedtuneError(f"client on node {node} failed to start: {reply.error.reason}")
        try:
            pid = read_reply(reply, QueryReply).partition_id
        except ProtocolError as err:
            raise FedtuneError(f"client on node {node} is not a fedtune client: {err}") from None
        if pid in clients.values():
            raise FedtuneError(f"two nodes claim partition-id {pid}")
        clients[node] = pid
    log.debug("clients (node -> partition): %s", clients)
    return clients


class Federation:
    """The rounds of one run: a strategy, a round hook, the run directory and progress."""

    def __init__(
        self,
        grid: Grid,
        cfg: Config,
        run: RunDir,
        clients: dict[int, int],
        hook: RoundHook,
        progress: RoundProgress,
    ) -> None:
        self.grid, self.cfg, self.run, self.hook, self.progress = grid, cfg, run, hook, progress
        self.strategy: AdapterStrategy = build_strategy(cfg, clients)
        self.strategy.run_dir = str(run.path.resolve())  # where simulated clients may keep state
        self.strategy.instruction_fields = hook.instruction_fields()

    def _phase(self, configure: Any, server_round: int, arrays: ArrayRecord, phase: str) -> list[Message]:
        messages = configure(server_round, arrays, ConfigRecord(), self.grid)
        return collect(
            self.grid,
            messages,
            self.cfg.fed.timeout,
            lambda done, total: self.progress.phase(phase, done, total),
        )

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        replies = self._phase(self.strategy.configure_evaluate, server_round, arrays, "evaluate")
        return self.strategy.aggregate_evaluate(server_round, replies)

    def train(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, MetricRecord | None]:
        self.hook.begin_round()
        if self.cfg.privacy.secagg.enabled:
            new_arrays, trained = self._secure_train(server_round, arrays)
        else:
            replies = self._phase(self.strategy.configure_train, server_round, arrays, "train")
            new_arrays, trained = self.strategy.aggregate_train(server_round, replies)
        if new_arrays is None:
            raise FedtuneError(f"round {server_round}: no client returned an update (see the log)")
        # float32 as checkpointed: a resumed run must continue from exactly what is on disk
        return to_record(from_record(new_arrays), "float32"), trained

    def _secure_train(
        self, server_round: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """SecAgg+: the strategy's instructions through Flower's workflow, the mean update back to it."""
        messages = self.strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid)

        def shown(stage: str, done: int, total: int) -> None:
            self.progress.phase(f"secagg {stage}", done, total)

        result = secure_round(self.grid, messages, self.cfg, on_stage=shown)
        traffic = {n: (sum(result.bytes_down[n]), sum(result.bytes_up[n])) for n in result.bytes_down}
        return self.strategy.aggregate_mean(
            server_round, result.mean_update, result.replies, result.weights, traffic
        )

    def _log(self, server_round: int, t0: float, train: Any, evaluated: Any, **extra: Any) -> dict[str, Any]:
        """Append the round's client lines and its server line to metrics.jsonl."""
        fit = RoundMetrics.from_record(train) if train is not None else None
        ev = RoundMetrics.from_record(evaluated) if evaluated is not None else None
        line = server_line(
            server_round,
            self.strategy.round_log,
            time.perf_counter() - t0,
            train_loss=fit.loss if fit else None,
            num_clients=fit.num_clients if fit else None,
            eval_loss=ev.loss if ev else None,
            **extra,
        )
        self.run.append_metrics([*self.strategy.round_log, line])
        self.strategy.round_log.clear()
        return dict(line)

    def rounds(self, current: dict[str, Any]) -> None:
        """Round 0 (when fresh), then every remaining round, each checkpointed; then ``final/``."""
        last = self.run.last_round()
        current = self.hook.client_state(current)
        self.strategy.restore(
            self.run.load_server_state(max(last, 0)), {k: v.numpy() for k, v in current.items()}
        )
        arrays = to_record(current, "float32")
        with self.progress.running(max(last, 0)):
            if last < 0:
                t0 = time.perf_counter()
                if self.cfg.fed.evaluate_before:
                    self.progress.start_round(0)
                    self._log(0, t0, None, self.evaluate(0, arrays))
                self.run.mark_complete(0)
                last = 0
            for server_round in range(last + 1, self.cfg.fed.rounds + 1):
                if self.strategy.dp is not None and self.strategy.dp.would_exceed():
                    self._stop_for_budget(server_round)
                    break
                arrays = self._round(server_round, arrays)
        state = from_record(arrays)
        lora = self.strategy.global_lora(state)
        final = self.run.save_final(self.hook.whole(to_torch(state)), self.cfg, lora=lora)
        if self.strategy.dp is not None:
            self.run.save_privacy(final, self.strategy.dp.summary())

    def _stop_for_budget(self, server_round: int) -> None:
        """End the run cleanly before ``server_round``, which would spend more than the target ε."""
        assert self.strategy.dp is not None
        spent, target = self.strategy.dp.spent()["epsilon"], self.cfg.privacy.target_epsilon
        reason = f"privacy budget: round {server_round} would take ε past privacy.target_epsilon={target}"
        logging.getLogger("flwr").warning(
            "%s (spent %.4g); stopping after round %s", reason, spent, server_round - 1
        )
        self.run.mark_stopped(reason)

    def _round(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        t0 = time.perf_counter()
        self.progress.start_round(server_round)
        arrays, trained = self.train(server_round, arrays)
        stats = self.hook.end_round()
        evaluated = self.evaluate(server_round, arrays)
        state = from_record(arrays)
        self.run.save_round(
            server_round,
            self.hook.whole(to_torch(state)),
            self.cfg,
            lora=self.strategy.global_lora(state),  # heterogeneous ranks: the global's own rank
            server_state=self.strategy.checkpoint(),
        )
        line = self._log(server_round, t0, trained, evaluated, **stats, **self.strategy.round_figures)
        self.run.mark_complete(server_round)
        self.progress.end_round(server_round, line)
        return arrays


def run_federation(
    grid: Grid, cfg: Config, run: RunDir, *, progress: bool = True, logger: logging.Logger | None = None
) -> None:
    """Run (or continue) the federation described by ``cfg`` into ``run``.

    ``progress``: a bar in a terminal, else one line per round to ``logger``.
    """
    clients = discover(grid, cfg)
    last = run.last_round()
    if last < 0:  # fresh run: seeded starting adapter, evaluated as round 0
        run.save_round(0, initial_adapter_state(cfg.model, seed=cfg.seed), cfg)
    run.rollback_to(max(last, 0))
    current = run.load_round(max(last, 0))
    hook = round_hook(cfg, current)
    try:
        shown = RoundProgress(cfg.fed.rounds, enabled=progress, logger=logger)
        Federation(grid, cfg, run, clients, hook, shown).rounds(current)
    finally:
        hook.stop()


def make_server_app(cfg: Config, run: RunDir, *, progress: bool = True) -> ServerApp:
    """A ServerApp bound to a config and run directory (what ``fedtune run`` starts)."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg, run, progress=progress)

    return server


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"fed": {"rounds": 2}}`` -> ``{"fed.rounds": 2}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _app_dir(grid: Grid) -> str:
    """Where the submitted app (the FAB) is installed on this host.

    Flower 1.41 has no public API for it; ``flwr.common.config.get_project_dir`` is the one
    function of a non-public Flower module fedtune uses (docs/architecture.md, Departures).
    """
    from flwr.common.config import get_project_dir

    return str(get_project_dir(grid.run.fab_id, grid.run.fab_version, grid.run.fab_hash))


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
        run_config.update(_flat(apply_overrides({}, overrides)))
        cfg = config_from_run_config(run_config, app_dir=_app_dir(grid))
        check_strategy(cfg)
        check_privacy(cfg)  # refuses a privacy target the plan cannot meet, before a run directory exists
        run = RunDir.create(cfg)
    # Flower forwards only its own logger's records to `flwr run --stream` and `flwr log`.
    flwr_log = logging.getLogger("flwr")
    flwr_log.info("fedtune run directory: %s", run.path.resolve())
    run_federation(grid, cfg, run, progress=True, logger=flwr_log)
