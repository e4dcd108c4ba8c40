"""collect(): send and gather replies over the Grid's push/pull, a callback per reply, a deadline."""

from __future__ import annotations

from types import SimpleNamespace

from fedtune.federated.server_app import collect


class _Grid:
    """Replies arrive one per pull; message ``m3`` never answers."""

    def __init__(self) -> None:
        self.pulls = 0

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        return [m for m in messages]

    def pull_messages(self, ids):  # type: ignore[no-untyped-def]
        self.pulls += 1
        ready = sorted(i for i in ids if i != "m3")[:1]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


def test_replies_are_gathered_with_progress_until_all_or_the_deadline() -> None:
    seen: list[tuple[int, int]] = []
    grid = _Grid()
    replies = collect(grid, ["m1", "m2"], 5.0, lambda done, total: seen.append((done, total)), poll=0.0)  # type: ignore[arg-type]
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1", "m2"]
    assert seen == [(0, 2), (1, 2), (2, 2)] and grid.pulls == 2
    late = collect(_Grid(), ["m1", "m3"], 0.05, lambda *_: None, poll=0.01)  # type: ignore[arg-type]
    assert [r.metadata.reply_to_message_id for r in late] == ["m1"]  # m3 missed the deadline
