"""The federated case-base search (``query.case``): a question out, each client's top passages back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flwr.app import Message, MessageType

from fedtune.config import Config
from fedtune.federated.protocol.wire import ProtocolError, Wire

CASE_QUERY = f"{MessageType.QUERY}.case"  # Flower routes it to the ClientApp's @app.query("case")


@dataclass(frozen=True)
class CaseQuery(Wire):
    """A search of the clients' case bases (:data:`CASE_QUERY`): each returns its top ``k`` for ``question``.

    Answered only where ``rag.share_case_base`` (the SuperNode's, else ``config``'s) allows; else an error.
    """

    scalars: ClassVar[str] = "config"
    config: Config
    question: str
    k: int

    def check(self) -> CaseQuery:
        """A non-blank question and a positive ``k``."""
        if not self.question.strip() or self.k <= 0:
            bad = "question" if not self.question.strip() else "k"
            raise ProtocolError(f"case query: field {bad!r} is {getattr(self, bad)!r}; expected text, k > 0")
        return self


@dataclass(frozen=True)
class CaseHits(Wire):
    """A client's top passages for a :class:`CaseQuery`, best first: text, id, source, rank in its own base.

    No retriever scores: those of bases built apart are not comparable, ranks are. Text needs a ConfigRecord.
    """

    scalars: ClassVar[str] = "config"
    partition_id: int
    texts: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    ranks: tuple[int, ...] = ()

    def check(self) -> CaseHits:
        """One id, source and rank per text; ranks 1, 2, ... in order."""
        for name, want in (("ids", None), ("sources", None), ("ranks", tuple(range(1, len(self.texts) + 1)))):
            got = getattr(self, name)
            if len(got) != len(self.texts) or (want is not None and got != want):
                raise ProtocolError(f"case hits: field {name!r} is {list(got)} for {len(self.texts)} texts")
        return self


def case_query_message(query: CaseQuery, node_id: int) -> Message:
    """A Flower ``query.case`` message carrying ``query`` to node ``node_id``."""
    return Message(content=query.to_content(), message_type=CASE_QUERY, dst_node_id=node_id)
