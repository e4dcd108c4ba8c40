"""The code base's own rules, checked on the source: sizes, no import cycle, Flower's public
API only, and record keys written in one module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
FILES = sorted(SRC.rglob("*.py"))
PROTOCOL = SRC / "fedtune" / "federated" / "protocol"  # the package that owns every record key
# Flower's public app APIs; ``flwr.simulation`` starts the simulation runtime.
FLOWER_PUBLIC = ("flwr.app", "flwr.serverapp", "flwr.clientapp", "flwr.simulation")
# (file, module): Flower beyond its public app APIs; docs/architecture.md ("Departures") says why
FLOWER_EXCEPTIONS = {
    ("fedtune/federated/server_app.py", "flwr.common.config"),  # the installed app's folder
    # the node worker's channel carries Flower's own message protobuf, as Flower does between processes
    ("fedtune/federated/protocol/node.py", "flwr.common.serde"),
    ("fedtune/federated/protocol/node.py", "flwr.proto.message_pb2"),
    ("fedtune/federated/protocol/node.py", "flwr.proto.recorddict_pb2"),
    # SecAgg+ exists only in Flower's legacy API: its workflow, mod and their record layouts
    ("fedtune/federated/secagg.py", "flwr.common"),
    ("fedtune/federated/secagg.py", "flwr.server"),
    ("fedtune/federated/secagg.py", "flwr.server.compat.grid_client_proxy"),
    ("fedtune/federated/secagg.py", "flwr.server.strategy"),
    ("fedtune/federated/secagg.py", "flwr.server.workflow"),
    ("fedtune/federated/secagg.py", "flwr.server.workflow.secure_aggregation.secaggplus_workflow"),
    ("fedtune/federated/secagg_client.py", "flwr.client.mod"),
    ("fedtune/federated/protocol/messages.py", "flwr.common.secure_aggregation.secaggplus_constants"),
    ("fedtune/federated/protocol/secagg.py", "flwr.common"),
    ("fedtune/federated/protocol/secagg.py", "flwr.common.secure_aggregation.secaggplus_constants"),
    ("fedtune/federated/protocol/secagg.py", "flwr.compat.common.recorddict_compat"),
    ("fedtune/federated/protocol/secagg.py", "flwr.server.workflow.constant"),
}


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_modules_stay_under_400_lines() -> None:
    long = {str(p.relative_to(SRC)): n for p in FILES if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring does not count
    return 0 if not body else (body[-1].end_lineno or 0) - body[0].lineno + 1


def test_functions_stay_under_60_lines() -> None:
    long = [
        f"{p.relative_to(SRC)}:{node.lineno} {node.name} ({_body_lines(node)} lines)"
        for p in FILES
        for node in ast.walk(_tree(p))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _body_lines(node) > 60
    ]
    assert not long


def _imports() -> dict[str, set[str]]:
    """Module -> fedtune modules it imports (at any depth: a lazy import is still a dependency)."""
    modules = {_module(p): p for p in FILES}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedtune"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                graph[name] |= subs
                if len(subs) < len(node.names) and node.module in modules:
                    graph[name].add(node.module)
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names} & modules.keys()
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_cycle() -> None:
    assert not _cycles(_imports())


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]


def test_only_flowers_public_api() -> None:
    bad = []
    for path in FILES:
        rel = str(path.relative_to(SRC))
        for node in ast.walk(_tree(path)):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
                if node.module.startswith("flwr"):
                    bad += [f"{rel}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.split(".")[0] != "flwr" or name == "flwr":
                    continue
                if not name.startswith(FLOWER_PUBLIC) and (rel, name) not in FLOWER_EXCEPTIONS:
                    bad.append(f"{rel}: {name}")
            if isinstance(node, ast.Attribute) and node.attr in ("_check_and_log_replies", "m_t", "v_t"):
                bad.append(f"{rel}:{node.lineno}: .{node.attr}")
    assert not bad


def _record_keys(path: Path) -> list[str]:
    """String keys read from or written into Flower records outside the protocol module."""
    found = []
    for node in ast.walk(_tree(path)):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "content"
            and isinstance(node.slice, ast.Constant)
        ):
            found.append(f"{node.lineno}: content[{node.slice.value!r}]")
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", "")
            in (
                "ConfigRecord",
                "MetricRecord",
                "RecordDict",
            )
            and node.args
            and isinstance(node.args[0], ast.Dict)
            and node.args[0].keys
        ):
            found.append(f"{node.lineno}: {node.func.id}({{...}})")  # type: ignore[attr-defined]
    return found


def test_record_keys_are_written_only_in_the_protocol_package() -> None:
    assert any(_record_keys(p) for p in PROTOCOL.glob("*.py"))  # the check sees the keys where they are
    elsewhere = {
        str(p.relative_to(SRC)): keys
        for p in FILES
        if not p.is_relative_to(PROTOCOL) and (keys := _record_keys(p))
    }
    assert not elsewhere


@pytest.mark.parametrize("text", ['msg.content["config"]', 'MetricRecord({"loss": 1.0})'])
def test_the_record_key_check_catches_a_hand_spelt_key(tmp_path: Path, text: str) -> None:
    path = tmp_path / "m.py"
    path.write_text(f"x = {text}\n")
    assert _record_keys(path)
