"""Split runs served split: head and tail in the server, the trunk on a trunk service.

A tiny split run (tiny-llama-4l cut 1 + 2 + 1) with a random adapter in every part is served
beside a plain run of the same base. The reference is fedtune's own unsplit greedy answer
(``load_run``); the trunk service is either the one the server starts or one this test runs
(``--trunk``), which the test stops to see the server answer 503 and go on.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from fedtune.data.tokenize import build_generation_input
from fedtune.inference import load_run
from fedtune.models.adapters import initial_adapter_state
from fedtune.rundir import RunDir
from fedtune.serve import SplitServing, build_app
from fedtune.split.client import TrunkClient
from fedtune.split.serve_trunk import load_trunk
from fedtune.split.server import TrunkOptim, TrunkService, serve
from helpers import finished_tiny_run, run_cli

SPLIT = ("model.name='tiny-llama-4l'", "split.enabled=true", "split.n_head=1", "split.n_tail=1")
HI = [{"role": "user", "content": "hi there"}]
NEW = 12


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a split run, a plain run of the same base), each with its own random adapter."""
    # named apart: a run folder's name (the model id) has the time only to the second
    split, cfg = finished_tiny_run(tmp_path_factory.mktemp("split"), *SPLIT, "run.name='split'")
    plain, _ = finished_tiny_run(tmp_path_factory.mktemp("plain"), SPLIT[0], "run.name='plain'")
    # B drawn at random (not a constant): the answer is not one token repeated, so it can differ
    gen = torch.Generator().manual_seed(1)
    state = initial_adapter_state(cfg.model, seed=0)
    state = {k: v if "lora_A" in k else torch.randn(v.shape, generator=gen) * 0.5 for k, v in state.items()}
    split.save_final(state, cfg)
    return split.path, plain.path


def _expected(run_dir: Path, *, chat: bool = True, base_only: bool = False) -> str:
    """fedtune's own unsplit greedy answer (HI as a chat, or "The" continued)."""
    loaded = load_run(run_dir, base_only=base_only)
    cfg = loaded.cfg
    if chat:
        ids = build_generation_input(HI, loaded.tokenizer, cfg.data.template, cfg.data.max_source_length)  # type: ignore[arg-type]
    else:
        ids = loaded.tokenizer("The", add_special_tokens=False)["input_ids"]
    out = loaded.model.generate(  # type: ignore[union-attr]
        input_ids=torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0
    )
    return str(loaded.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))


def _chat(client: TestClient, model: str, **extra: Any) -> Any:
    body = {"model": model, "messages": HI, "max_tokens": NEW, **extra}
    return client.post("/v1/chat/completions", json=body)


@pytest.fixture(scope="module")
def trunk_service(runs: tuple[Path, Path]) -> Iterator[tuple[TrunkService, grpc.Server, int]]:
    """The split run's trunk, served by this test (as ``fedtune serve-trunk --adapter RUN/final``)."""
    split, _ = runs
    cfg = RunDir.open(split).config()
    service = TrunkService(load_trunk(cfg, split / "final"), TrunkOptim(step_every=0))
    server, port = serve(service)
    yield service, server, port
    server.stop(0).wait()


def test_a_split_run_answers_across_the_split_as_the_unsplit_model(runs: tuple[Path, Path]) -> None:
    # Prepare
    split, plain = runs
    expected = _expected(split)
    # Execute: the server starts the trunk service itself
    with TestClient(build_app([split, plain])) as client:
        served = client.app.state.engine.catalogue.served  # type: ignore[attr-defined]
        address = served[split.name].split.address
        whole = _chat(client, split.name).json()
        streamed = _chat(client, split.name, stream=True).text
        body = {"model": split.name, "prompt": "The", "max_tokens": NEW}
        completion = client.post("/v1/completions", json=body)
        plain_answer = _chat(client, plain.name).json()
        engine_batches = sum(client.app.state.engine.batch_sizes.values())  # type: ignore[attr-defined]
    # Assert: the split answer is the unsplit model's, token for token, streamed or not
    assert address.startswith("127.0.0.1:") and served[plain.name].split is None
    assert len(set(expected.split())) > 2  # a real answer, not one token repeated
    assert whole["choices"][0]["message"]["content"] == expected
    assert whole["usage"]["completion_tokens"] == NEW and whole["choices"][0]["finish_reason"] == "length"
    chunks = [json.loads(e.removeprefix("data: ")) for e in streamed.split("\n\n") if e and "[DONE]" not in e]
    assert len(chunks) > 2
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert completion.json()["choices"][0]["text"] == _expected(split, chat=False)
    # the plain run still goes through the engine, and only it did
    assert plain_answer["choices"][0]["message"]["content"] == _expected(plain)
    assert engine_batches == 1
    # the trunk service the server started stopped with it
    with pytest.raises(ConnectionError, match="no connection"):
        TrunkClient(address, 64, timeout_s=1)


def test_unsplit_keeps_the_whole_model_here(runs: tuple[Path, Path]) -> None:
    split, _ = runs
    with TestClient(build_app([split], split=SplitServing(unsplit=True))) as client:
        assert client.app.state.engine.catalogue.served[split.name].split is None  # type: ignore[attr-defined]
        answer = _chat(client, split.name).json()["choices"][0]["message"]["content"]
        assert sum(client.app.state.engine.batch_sizes.values()) == 1  # type: ignore[attr-defined]
    assert answer == _expected(split)


def test_a_given_trunk_service_then_its_loss_is_a_503_and_the_server_goes_on(
    runs: tuple[Path, Path], trunk_service: tuple[TrunkService, grpc.Server, int]
) -> None:
    split, plain = runs
    _, server, port = trunk_service
    how = SplitServing(trunk=f"127.0.0.1:{port}", connect_timeout_s=1)
    with TestClient(build_app([split, plain], split=how)) as client:
        # Execute / Assert: across the given service, the unsplit model's answer
        assert _chat(client, split.name).json()["choices"][0]["message"]["content"] == _expected(split)
        server.stop(0).wait()  # the trunk service goes away
        lost = _chat(client, split.name)
        lost_stream = _chat(client, split.name, stream=True)
        others = [_chat(client, plain.name), _chat(client, "base")]
        # a service back on the same address serves the next request: each request connects afresh
        cfg = RunDir.open(split).config()
        again, _ = serve(TrunkService(load_trunk(cfg, split / "final"), TrunkOptim(step_every=0)), port=port)
        try:
            back = _chat(client, split.name).json()
        finally:
            again.stop(0).wait()
    for response in (lost, lost_stream):
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "trunk_unavailable" and f"127.0.0.1:{port}" in error["message"]
        assert split.name in error["message"]
    assert [r.status_code for r in others] == [200, 200]
    assert back["choices"][0]["message"]["content"] == _expected(split)


def test_an_unreachable_trunk_at_start_serves_the_rest(runs: tuple[Path, Path], caplog) -> None:
    split, plain = runs
    with socket_bound() as port:  # nothing answers gRPC there
        how = SplitServing(trunk=f"127.0.0.1:{port}", connect_timeout_s=0.5)
        with TestClient(build_app([split, plain], split=how)) as client:
            response = _chat(client, split.name)
            other = _chat(client, plain.name)
    assert "answer 503 until the service is up" in caplog.text
    assert response.status_code == 503 and response.json()["error"]["code"] == "trunk_unavailable"
    assert other.status_code == 200


@contextlib.contextmanager
def socket_bound() -> Iterator[int]:
    """A loopback port that is bound (so no one else takes it) but never accepts a connection."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


class _DropsAtStep:
    """A trunk forward hook that stops the service at its ``n``-th call: the service dies mid-answer."""

    def __init__(self, server: grpc.Server, n: int) -> None:
        self.server, self.n, self.calls = server, n, 0

    def __call__(self, *args: object) -> None:
        self.calls += 1
        if self.calls == self.n:
            self.server.stop(0)


def test_the_openai_client_streams_and_hears_a_service_that_dies_mid_answer(runs: tuple[Path, Path]) -> None:
    # Prepare: a trunk service that will stop at its 5th forward (prefill + 3 decode steps done)
    split, plain = runs
    cfg = RunDir.open(split).config()
    trunk = load_trunk(cfg, split / "final")
    server, port = serve(TrunkService(trunk, TrunkOptim(step_every=0)))
    how = SplitServing(trunk=f"127.0.0.1:{port}", connect_timeout_s=1)
    http = uvicorn.Server(uvicorn.Config(build_app([split, plain], split=how), host="127.0.0.1", port=0))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    try:
        while not http.started:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{http.servers[0].sockets[0].getsockname()[1]}/v1"
        api = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        # Execute: a whole stream, then one the service dies in
        stream = api.chat.completions.create(model=split.name, messages=HI, max_tokens=NEW, stream=True)  # type: ignore[arg-type]
        text = "".join(c.choices[0].delta.content or "" for c in stream)
        drop = _DropsAtStep(server, 5)
        trunk.register_forward_hook(drop)
        got: list[str] = []
        dying = api.chat.completions.create(model=split.name, messages=HI, max_tokens=NEW, stream=True)  # type: ignore[arg-type]
        with pytest.raises(openai.APIError, match=r"trunk service at 127\.0\.0\.1:\d+ is unavailable"):
            for chunk in dying:
                got.append(chunk.choices[0].delta.content or "")
        plain_answer = api.chat.completions.create(model=plain.name, messages=HI, max_tokens=NEW)  # type: ignore[arg-type]
        with pytest.raises(openai.InternalServerError) as caught:  # 503: the service is gone
            api.chat.completions.create(model=split.name, messages=HI, max_tokens=NEW)  # type: ignore[arg-type]
    finally:
        http.should_exit = True
        thread.join(timeout=30)
        server.stop(0).wait()
    # Assert
    assert text == _expected(split)
    assert "".join(got) and text.startswith("".join(got))  # some tokens came, then the error
    assert plain_answer.choices[0].message.content == _expected(plain)
    assert caught.value.status_code == 503


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--unsplit", "--trunk", "127.0.0.1:1"), "--trunk: with --unsplit"),
        (("--trunk", "127.0.0.1:1"), "give exactly one split run with it (split runs given: none)"),
    ],
)
def test_trunk_option_that_cannot_apply_is_refused(capsys, runs: tuple[Path, Path], args, message) -> None:
    split, plain = runs
    run = split if "--unsplit" in args else plain
    code, _, err = run_cli(capsys, "serve", str(run), *args)
    assert code != 0 and message in err and "Traceback" not in err
