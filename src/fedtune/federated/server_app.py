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

import contextlib
import logging
import shlex
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedtune.config import Config, apply_overrides, config_from_run_config
from fedtune.errors import FedtuneError
from fedtune.federated.failures import PhaseOutcome, deadline_key, phase_deadline, phase_outcome, train_quorum
from fedtune.federated.nodes import Discovered, collect, discover, wait_for_nodes
from fedtune.federated.progress import RoundProgress
from fedtune.federated.protocol import EvaluateReply, RoundMetrics, TrainReply, read_reply
from fedtune.federated.records import from_record, to_record, to_torch
from fedtune.federated.secagg import secure_round
from fedtune.federated.strategies import AdapterStrategy, build_strategy, check_strategy
from fedtune.metrics import server_line
from fedtune.models.adapters import initial_adapter_state
from fedtune.privacy.plan import check_privacy
from fedtune.rundir import RunDir
from fedtune.split.rounds import RoundHook, round_hook

__all__ = ["Federation", "RoundFailed", "app", "collect", "discover", "make_server_app", "wait_for_nodes"]

log = logging.getLogger(__name__)
_FLWR_LOG = logging.getLogger("flwr")  # Flower forwards only its own logger to `flwr run --stream`


class RoundFailed(FedtuneError):
    """A round fell below its train quorum after its retries."""


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
        self.clients = clients  # node id -> partition id
        self.sampled = 0  # clients sent the last phase's instructions
        self.strategy: AdapterStrategy = build_strategy(cfg, clients)
        self.strategy.run_dir = str(run.path.resolve())  # where simulated clients may keep state
        self.strategy.instruction_fields = hook.instruction_fields()

    def _phase(self, configure: Any, server_round: int, arrays: ArrayRecord, phase: str) -> PhaseOutcome:
        """Send a phase's instructions, wait up to the deadline; a failure line per failed client."""
        messages = list(configure(server_round, arrays, ConfigRecord(), self.grid))
        replies = collect(
            self.grid,
            messages,
            phase_deadline(self.cfg),
            lambda done, total: self.progress.phase(phase, done, total),
        )
        kind = TrainReply if phase == "train" else EvaluateReply
        check = (lambda msg: self.strategy.decode(read_reply(msg, TrainReply))) if phase == "train" else None
        outcome = phase_outcome(
            server_round, phase, messages, replies, kind, self.clients, deadline_key(self.cfg), check
        )
        for line in outcome.failures:
            if phase == "train":
                line["attempt"] = self.strategy.attempt
            self.progress.logger.warning(
                "round %s %s: client %s failed: %s", server_round, phase, line["client"], line["cause"]
            )
        self.strategy.round_log.extend(outcome.failures)
        self.sampled = len(messages)
        return outcome

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        outcome = self._phase(self.strategy.configure_evaluate, server_round, arrays, "evaluate")
        return self.strategy.aggregate_evaluate(server_round, outcome.good)

    def _quorate_train(
        self, server_round: int, arrays: ArrayRecord
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The train phase, retried on a fresh sample while below the quorum; then aggregated.

        The aggregate is over exactly the good replies. Below the quorum after
        ``fed.round_retries`` retries, the round's failure lines are written and RoundFailed raised.
        """
        retries = self.cfg.fed.round_retries
        for attempt in range(retries + 1):
            self.strategy.attempt = attempt
            outcome = self._phase(self.strategy.configure_train, server_round, arrays, "train")
            # capped by the sample: a DP round's Poisson sample may be smaller, even empty
            need = min(train_quorum(self.cfg.fed, self.sampled), self.sampled)
            if len(outcome.good) >= need:
                return self.strategy.aggregate_train(server_round, outcome.good)
            note = (
                f"round {server_round}: {len(outcome.good)} good train replies of {self.sampled} sampled "
                f"clients, below the quorum of {need} (fed.min_train_replies, fed.min_train_fraction)"
            )
            self.progress.logger.warning(
                "%s%s", note, "; retrying on a fresh sample" if attempt < retries else ""
            )
        self.run.append_metrics(self.strategy.round_log)
        self.strategy.round_log.clear()
        raise RoundFailed(f"{note} after {retries} retries (fed.round_retries)")

    def train(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, MetricRecord | None]:
        self.hook.begin_round()
        if self.cfg.privacy.secagg.enabled:
            new_arrays, trained = self._secure_train(server_round, arrays)
        else:
            new_arrays, trained = self._quorate_train(server_round, arrays)
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
    grid: Grid,
    cfg: Config,
    run: RunDir,
    *,
    progress: bool = True,
    logger: logging.Logger | None = None,
    discovered: Discovered | None = None,
) -> None:
    """Run (or continue) the federation described by ``cfg`` into ``run``.

    ``progress``: a bar in a terminal, else one line per round to ``logger``. ``discovered``:
    the clients if the caller already ran :func:`discover`. A failure is recorded in
    ``state.json`` (:meth:`RunDir.mark_failed`), logged as one ``fedtune run FAILED`` line
    and raised again; the complete rounds stay, for a resume.
    """
    say = logger or log  # fedtune run: fedtune's logger; flwr run: Flower's, which reaches the CLI
    try:
        found = discovered or discover(grid, cfg, logger=say)
        last = run.last_round()
        if last < 0:  # fresh run: seeded starting adapter, evaluated as round 0
            run.save_round(0, initial_adapter_state(cfg.model, seed=cfg.seed), cfg)
        run.rollback_to(max(last, 0))
        if run.failed() is not None:  # resumed: the failure is behind it (even one after the last round)
            run.mark_complete(run.last_round())
        run.append_metrics({**line, "round": max(last, 0)} for line in found.failures)
        current = run.load_round(max(last, 0))
        hook = round_hook(cfg, current)
        try:
            shown = RoundProgress(cfg.fed.rounds, enabled=progress, logger=logger)
            Federation(grid, cfg, run, found.clients, hook, shown).rounds(current)
        finally:
            hook.stop()
    except Exception as err:
        cause = str(err) if isinstance(err, FedtuneError) else f"{type(err).__name__}: {err}"
        run.mark_failed(cause)
        say.error("fedtune run FAILED after round %s: %s", run.last_round(), cause)
        raise


def make_server_app(cfg: Config, run: RunDir, *, progress: bool = True) -> ServerApp:
    """A ServerApp bound to a config and run directory (what ``fedtune run`` starts).

    A FedtuneError ends the app quietly: it is in ``state.json``, which ``fedtune run`` reads.
    """
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        with contextlib.suppress(FedtuneError):
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
        cfg = run.resume_config()
    else:
        run_config.update(_flat(apply_overrides({}, overrides)))
        cfg = config_from_run_config(run_config, app_dir=_app_dir(grid))
        check_strategy(cfg)
        check_privacy(cfg)  # refuses a privacy target the plan cannot meet, before a run directory exists
    try:
        found = discover(grid, cfg, logger=_FLWR_LOG)  # before a run directory: a failed start leaves none
    except FedtuneError as err:
        _FLWR_LOG.error("fedtune run FAILED: %s", err)
        raise
    if not resume:
        run = RunDir.create(cfg)
    _FLWR_LOG.info("fedtune run directory: %s", run.path.resolve())
    run_federation(grid, cfg, run, progress=True, logger=_FLWR_LOG, discovered=found)
    if cfg.run.report:
        from fedtune.report import write_report

        write_report(run.path)
        _FLWR_LOG.info("report: %s", run.report_page.resolve())
