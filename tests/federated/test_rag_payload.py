"""Payload audit of a RAG round: what leaves the clients, read back from every reply.

One round of configs/rag-tiny.toml (FF-LoRA + case base + reference base) runs through
Flower's simulation runtime with a ServerApp whose Grid keeps every reply, then two case
queries go out: one where the config shares the case bases, one where it does not. Every
string and byte of every reply (record names, ArrayRecord keys and array bytes, every
Config/MetricRecord value, error reasons) is searched for the clients' texts: their
questions, answers, case passages and the reference passages. Only a shared case query's
reply may carry text, and then only the client's own training cases.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.serverapp import Grid, ServerApp

from federated.payload import ADAPTER_KEY, RecordingGrid, adapter_keys, leaks, needles
from fedtune.config import Config, load_config
from fedtune.data.pipeline import client_conversations
from fedtune.federated.case_search import SearchResult, federated_search
from fedtune.federated.protocol import CASE_QUERY
from fedtune.federated.server_app import run_federation
from fedtune.federated.simulation import run_server_app
from fedtune.rag.augment import case_text, question_of
from fedtune.rag.client import reference_base
from fedtune.rundir import RunDir

pytestmark = pytest.mark.integration  # a Flower simulation (Ray)


@pytest.fixture(scope="module")
def audited(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Config, list[Message], dict[str, SearchResult]]:
    """One RAG round plus a shared and an unshared case query; (config, every reply, searches)."""
    out = tmp_path_factory.mktemp("rag-payload")
    cfg = load_config("configs/rag-tiny.toml", [f"run.output_dir='{out}'", "fed.rounds=1"])
    shared = load_config("configs/rag-tiny.toml", ["rag.share_case_base=true"])
    question = question_of(client_conversations(cfg, 0)[0][0]["messages"])
    recorded: list[Message] = []
    searches: dict[str, SearchResult] = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        rec = RecordingGrid(grid)
        run_federation(rec, cfg, RunDir.create(cfg), progress=False)  # type: ignore[arg-type]
        nodes = list(grid.get_node_ids())
        searches["shared"] = federated_search(rec, nodes, shared, question, 2)  # type: ignore[arg-type]
        searches["unshared"] = federated_search(rec, nodes, cfg, question, 2)  # type: ignore[arg-type]
        recorded.extend(rec.replies)

    run_server_app(cfg, server)
    return cfg, recorded, searches


def _client_texts(cfg: Config) -> dict[int, tuple[set[str], set[str]]]:
    """Per partition: (its training case passages, every text of its records)."""
    out = {}
    for pid in range(cfg.partition.num_partitions):
        train, test = client_conversations(cfg, pid)
        cases = {case_text(c["messages"]) for c in train}
        turns = {m["content"] for ds in (train, test) for c in ds for m in c["messages"]}
        out[pid] = (cases, cases | turns)
    return out


def test_train_evaluate_and_discovery_replies_carry_adapters_and_numbers_only(audited) -> None:
    cfg, replies, _ = audited
    kinds = [r.metadata.message_type for r in replies]
    assert kinds.count(MessageType.QUERY) == 2 and kinds.count(MessageType.TRAIN) == 2
    assert kinds.count(MessageType.EVALUATE) == 4  # round 0 and round 1
    kb = reference_base(cfg.rag)
    assert kb is not None
    private = set().union(*(texts for _, texts in _client_texts(cfg).values()))
    private_text = needles(private | {p.text for p in kb.passages})
    for reply in (r for r in replies if r.metadata.message_type != CASE_QUERY):
        assert not reply.has_error(), reply.error.reason
        assert set(reply.content.keys()) <= {"arrays", "metrics"}
        assert not any(isinstance(r, ConfigRecord) for r in reply.content.values())
        metrics = reply.content["metrics"]
        assert isinstance(metrics, MetricRecord) and all(isinstance(v, int | float) for v in metrics.values())
        if reply.metadata.message_type == MessageType.TRAIN:
            arrays = reply.content["arrays"]
            assert isinstance(arrays, ArrayRecord)
            fmt, keys = adapter_keys(arrays)
            assert all(ADAPTER_KEY.search(k) and "personal" not in k for k in keys)  # the global adapter
            assert fmt in ("float16", "float32", "int8.b64", "nf4.b64")  # float values or their codes
        assert not leaks(reply, private_text), reply.metadata.message_type


def test_a_case_query_is_refused_unless_shared_and_then_carries_only_own_training_cases(audited) -> None:
    cfg, replies, searches = audited
    texts = _client_texts(cfg)
    case_replies = [r for r in replies if r.metadata.message_type == CASE_QUERY]
    errors = [r for r in case_replies if r.has_error()]
    answers = [r for r in case_replies if not r.has_error()]
    assert len(errors) == 2 and len(answers) == 2
    everything = needles(set().union(*(t for _, t in texts.values())))
    for reply in errors:  # the refusal says why, and nothing of what the base holds
        assert "share_case_base is off" in (reply.error.reason or "")
        assert not leaks(reply, everything)
    unshared = searches["unshared"]
    assert unshared.passages == [] and unshared.answered == () and len(unshared.refused) == 2
    shared = searches["shared"]
    assert shared.answered == (0, 1) and not shared.refused
    assert {pid for p in shared.passages for pid in p.clients} == {0, 1}
    for p in shared.passages:  # a client's own training cases, nothing held out, no reference text
        assert all(p.text in texts[pid][0] for pid in p.clients)
    for reply in answers:  # the audit sees the shared text (so it would see a leak elsewhere)
        assert leaks(reply, needles(set().union(*(c for c, _ in texts.values()))))


def test_the_run_wrote_its_round(audited) -> None:
    cfg, _, _ = audited
    (run,) = Path(cfg.run.output_dir).iterdir()
    assert RunDir.open(run).last_round() == 1
