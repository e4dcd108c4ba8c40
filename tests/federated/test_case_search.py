"""Federated case-base search: the wire pair, fusion by rank, the client's consent, the fan-out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from federated.fakes import error_reply
from fedtune.config import Config, load_config
from fedtune.data.pipeline import client_conversations
from fedtune.errors import FedtuneError
from fedtune.federated import client_app
from fedtune.federated.case_search import federated_search, short_reason
from fedtune.federated.protocol import (
    CASE_QUERY,
    CaseHits,
    CaseQuery,
    ProtocolError,
    case_query_message,
    read_reply,
    reply_message,
)
from fedtune.rag.augment import case_text
from fedtune.rag.federated import CasePassage, fuse

A, B, C = (
    "Question: What is A? Answer: a.",
    "Question: What is B? Answer: b.",
    "Question: What is C? Answer: c.",
)


@pytest.fixture(autouse=True)
def _task_identity():
    from federated.fakes import task_identity

    yield from task_identity()


def _hits(pid: int, *texts: str) -> CaseHits:
    return CaseHits(
        partition_id=pid,
        texts=texts,
        ids=tuple(f"case:{i}" for i in range(len(texts))),
        sources=tuple(f"record {i}" for i in range(len(texts))),
        ranks=tuple(range(1, len(texts) + 1)),
    )


def _passages(hits: CaseHits) -> list[CasePassage]:
    rows = zip(hits.ranks, hits.ids, hits.sources, hits.texts, strict=True)
    return [CasePassage(hits.partition_id, *row) for row in rows]


# -- fusion (pure) ----------------------------------------------------------------------------
def test_fusion_sums_reciprocal_ranks_of_the_same_passage_across_clients() -> None:
    fused = fuse({1: _passages(_hits(1, C, A)), 0: _passages(_hits(0, A, B))}, k=3)
    # A: 1/61 (client 0, #1) + 1/62 (client 1, #2); C: 1/61; B: 1/62
    assert [p.text for p in fused] == [A, C, B]
    assert [p.score for p in fused] == pytest.approx([1 / 61 + 1 / 62, 1 / 61, 1 / 62])
    assert [p.found for p in fused] == [((0, 1), (1, 2)), ((1, 1),), ((0, 2),)]
    assert [p.rank for p in fused] == [1, 2, 3] and fused[0].clients == (0, 1)
    assert fused[0].id == "case:0" and fused[0].source == "record 0"  # from client 0, the first holder


def test_fusion_breaks_ties_by_partition_id_and_keeps_the_top_k() -> None:
    fused = fuse({1: _passages(_hits(1, C)), 0: _passages(_hits(0, B))}, k=1)
    assert [(p.text, p.clients) for p in fused] == [(B, (0,))]  # both 1/61: client 0 first
    assert fuse({}, k=3) == []


# -- the wire pair ----------------------------------------------------------------------------
def test_case_query_and_hits_round_trip_as_text_in_config_records(tiny_config: Config) -> None:
    msg = case_query_message(CaseQuery(tiny_config, "What is A?", 3), 5)
    assert msg.metadata.message_type == CASE_QUERY == "query.case"
    back = CaseQuery.from_content(msg.content).check()
    assert (back.question, back.k, back.config) == ("What is A?", 3, tiny_config)
    hits = _hits(2, A, B)
    content = hits.to_content()
    assert set(content) == {"config"}  # text: a ConfigRecord, no arrays
    assert CaseHits.from_content(content).check() == hits
    empty = CaseHits(partition_id=4)
    assert CaseHits.from_content(empty.to_content()).check() == empty  # no passages: fields left off


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"ids": ("x",)}, "ids"), ({"ranks": (2, 1)}, "ranks"), ({"sources": ()}, "sources")],
)
def test_case_hits_with_mismatched_fields_are_refused(fields: dict, field: str) -> None:
    good = {"texts": (A, B), "ids": ("a", "b"), "sources": ("s", "s"), "ranks": (1, 2)}
    with pytest.raises(ProtocolError, match=f"field '{field}'"):
        CaseHits(partition_id=0, **{**good, **fields}).check()


def test_a_blank_question_or_no_k_is_refused(tiny_config: Config) -> None:
    with pytest.raises(ProtocolError, match="'question'"):
        CaseQuery(tiny_config, "  ", 3).check()
    with pytest.raises(ProtocolError, match="'k'"):
        CaseQuery(tiny_config, "q", 0).check()


# -- the server's fan-out over a Grid ---------------------------------------------------------
class _Grid:
    """Nodes 11 and 12 answer with ``answers``; node 13 refuses; node 14 never answers."""

    def __init__(self, answers: dict[int, CaseHits]) -> None:
        self.answers, self.sent = answers, {}

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{msg.metadata.dst_node_id}"  # as the runtime assigns
            self.sent[msg.metadata.message_id] = msg
        return list(self.sent)

    def pull_messages(self, ids):  # type: ignore[no-untyped-def]
        out = []
        for mid in ids:
            msg = self.sent[mid]
            node = msg.metadata.dst_node_id
            if node in self.answers:
                out.append(reply_message(self.answers[node], msg))
            elif node == 13:
                out.append(error_reply(msg, "partition 2: rag.share_case_base is off, case base not shared"))
        return out


def test_federated_search_fuses_the_answers_and_reports_refusals(tiny_config: Config) -> None:
    grid = _Grid({11: _hits(0, A, B), 12: _hits(1, C, A)})
    result = federated_search(grid, [11, 12, 13, 14], tiny_config, "What is A?", 3, timeout=0.3)  # type: ignore[arg-type]
    assert [p.text for p in result.passages] == [A, C, B]
    assert result.passages[0].found == ((0, 1), (1, 2))
    assert result.answered == (0, 1)
    assert set(result.refused) == {13, 14}
    assert "share_case_base is off" in result.refused[13] and "no reply" in result.refused[14]
    query = CaseQuery.from_content(grid.sent["m11"].content)
    assert (query.question, query.k) == ("What is A?", 3)


# -- the client's handler ---------------------------------------------------------------------
def _cases_config(tmp_path: Path, *overrides: str) -> Config:
    """Two clients of four Q&A records each (topics fruit / space), bm25 case search."""
    rows = [(t, f"What colour is {thing}?", colour) for t, pairs in TOPICS.items() for thing, colour in pairs]
    path = tmp_path / "cases.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {
                    "topic": t,
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                }
            )
            + "\n"
            for t, q, a in rows
        )
    )
    return load_config(
        "configs/tiny.toml",
        [
            f"data.source='{path}'",
            "partition.column='topic'",
            "partition.num_partitions=2",
            "rag.mode='bm25'",
            *overrides,
        ],
    )


TOPICS = {
    "fruit": [("a banana", "Yellow."), ("a lime", "Green."), ("a plum", "Purple."), ("a cherry", "Red.")],
    "space": [("Mars", "Red."), ("Neptune", "Blue."), ("the Moon", "Grey."), ("the Sun", "White.")],
}


def _ask_client(cfg: Config, question: str, node: dict, k: int = 2) -> Message:
    context = Context(1, 1, {"num-partitions": 2, **node}, RecordDict(), {})
    return client_app.case_query(case_query_message(CaseQuery(cfg, question, k), 1), context)


def test_a_sharing_client_answers_with_its_own_training_cases_best_first(tmp_path: Path) -> None:
    cfg = _cases_config(tmp_path, "rag.share_case_base=true")
    train, test = client_conversations(cfg, 0)
    question = train[0]["messages"][0]["content"]
    reply = _ask_client(cfg, question, {"partition-id": 0, "state-dir": str(tmp_path / "node0")})
    hits = read_reply(reply, CaseHits).check()
    own = {case_text(c["messages"]) for c in train}
    assert hits.partition_id == 0 and hits.ranks == (1, 2)
    assert hits.texts[0] == case_text(train[0]["messages"])  # its own record: every word matches
    assert set(hits.texts) <= own  # only the training split: never a held-out record
    assert not {case_text(c["messages"]) for c in test} & set(hits.texts)


def test_a_client_refuses_unless_sharing_is_on_and_its_node_can_veto(tmp_path: Path) -> None:
    off = _cases_config(tmp_path)
    on = _cases_config(tmp_path, "rag.share_case_base=true")
    node = {"partition-id": 1, "state-dir": str(tmp_path / "node1")}
    with pytest.raises(FedtuneError, match="share_case_base is off"):
        _ask_client(off, "What colour is Mars?", node)
    with pytest.raises(FedtuneError, match="share_case_base is off"):  # the owner's word wins
        _ask_client(on, "What colour is Mars?", {**node, "rag.share_case_base": "false"})
    reply = _ask_client(off, "What colour is Mars?", {**node, "rag.share_case_base": True})
    assert read_reply(reply, CaseHits).partition_id == 1


# -- `fedtune kb ask` through Flower's simulation runtime ------------------------------------
@pytest.mark.integration
def test_kb_ask_fuses_both_clients_top_cases_as_searched_on_each_client(capsys) -> None:
    from fedtune.rag.augment import question_of
    from fedtune.rag.federated import search_own_cases
    from helpers import run_cli

    cfg = load_config("configs/rag-tiny.toml", ["rag.share_case_base=true"])
    question = question_of(client_conversations(cfg, 1)[0][0]["messages"])
    args = ["--config", "configs/rag-tiny.toml", "--set", "rag.share_case_base=true", "-k", "4"]
    code, out, err = run_cli(capsys, "kb", "ask", *args, "--json", question)
    assert code == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    # what each client's own search gives, fused here by hand's rule: the same list
    local = {
        pid: [CasePassage(pid, h.rank, h.passage.id, h.passage.source, h.passage.text) for h in hits]
        for pid in (0, 1)
        if (hits := search_own_cases(cfg, pid, question, 4))
    }
    want = fuse(local, 4)
    assert [(g["text"], [tuple(f) for f in g["found"]]) for g in got] == [
        (w.text, list(w.found)) for w in want
    ]
    assert {pid for g in got for pid in g["clients"]} == {0, 1}
    own = case_text(client_conversations(cfg, 1)[0][0]["messages"])
    assert [g["found"] for g in got if g["text"] == own] == [[[1, 1]]]  # client 1's best for its own question
    assert (
        got[0]["found"][0][1] == got[1]["found"][0][1] == 1
    )  # the two #1s lead (RRF ties: partition 0 first)


@pytest.mark.parametrize(
    "reason",
    [
        "<class 'fedtune.errors.FedtuneError'>:<'partition 1: not shared'>",
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run()\n  File x\n"
        "    raise X\nflwr.clientapp.client_app.ClientAppException: \n"
        "Exception ClientAppException occurred. Message: partition 1: not shared'>",
        "partition 1: not shared",
    ],
)
def test_a_refusal_is_reported_as_the_clients_own_message(reason: str) -> None:
    assert short_reason(reason) == "partition 1: not shared"
