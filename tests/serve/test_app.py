"""The OpenAI-compatible app through FastAPI's TestClient: answers, streaming, batching, 4xx errors."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from fedtune.data.tokenize import build_generation_input
from fedtune.errors import FedtuneError
from fedtune.inference import load_run
from fedtune.models.adapters import initial_adapter_state, save_adapter_folder
from fedtune.serve import Engine, Limits, build_app, create_app, load_catalogue
from helpers import finished_tiny_run, greedy_text, run_cli

HI = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run whose client 1 kept a personal adapter (as FF-LoRA clients do)."""
    run, cfg = finished_tiny_run(tmp_path_factory.mktemp("runs"))
    personal = initial_adapter_state(cfg.model, seed=3)
    personal = {k: v if "lora_A" in k else torch.full_like(v, 0.2) for k, v in personal.items()}
    save_adapter_folder(personal, cfg.model.lora, cfg.model, run.path / "clients" / "1" / "personal-0001")
    return run.path


@pytest.fixture(scope="module")
def client(run_dir: Path) -> Any:
    with TestClient(build_app([run_dir], Limits(max_tokens=64, max_body_bytes=4096))) as c:
        yield c


def _chat(client: TestClient, model: str, **extra: Any) -> Any:
    body = {"model": model, "messages": HI, "max_tokens": 6, **extra}
    return client.post("/v1/chat/completions", json=body)


def _expected(run_dir: Path, client_id: int | None = None, max_new: int = 6) -> str:
    """fedtune's own greedy answer for HI (not stripped: the server sends the text as decoded)."""
    loaded = load_run(run_dir, client=client_id)
    cfg = loaded.cfg
    ids = build_generation_input(HI, loaded.tokenizer, cfg.data.template, cfg.data.max_source_length)  # type: ignore[arg-type]
    return greedy_text(loaded, ids, max_new)


def test_models_lists_the_base_the_run_and_the_personal_client(client: TestClient, run_dir: Path) -> None:
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["base", run_dir.name, f"{run_dir.name}/client-1"]
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("which", ["run", "client"])
def test_chat_answers_as_fedtunes_own_model(client: TestClient, run_dir: Path, which: str) -> None:
    model, pid = (run_dir.name, None) if which == "run" else (f"{run_dir.name}/client-1", 1)
    body = _chat(client, model).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == _expected(run_dir, pid)
    assert body["usage"]["completion_tokens"] <= 6


@pytest.mark.parametrize("which", ["base", "run", "client"])
def test_each_id_switches_to_its_own_adapters(client: TestClient, run_dir: Path, which: str) -> None:
    # requests alternate between ids: each must get its own adapters, not the previous request's
    model = {"base": "base", "run": run_dir.name, "client": f"{run_dir.name}/client-1"}[which]
    for other in ("base", run_dir.name, f"{run_dir.name}/client-1"):
        client.post("/v1/completions", json={"model": other, "prompt": "The", "max_tokens": 1})
        body = client.post("/v1/completions", json={"model": model, "prompt": "The", "max_tokens": 12}).json()
        assert body["choices"][0]["text"] == _expected_completion(run_dir, which, "The", 12)


def _expected_completion(run_dir: Path, which: str, prompt: str, max_new: int) -> str:
    loaded = load_run(run_dir, base_only=which == "base", client=1 if which == "client" else None)
    return greedy_text(loaded, loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"], max_new)


def test_the_ids_answer_differently(run_dir: Path) -> None:
    # else the switching test above could pass with one model for all
    answers = {which: _expected_completion(run_dir, which, "The", 12) for which in ("base", "run", "client")}
    assert len(set(answers.values())) == 3, answers


def test_stream_is_openai_chunks_ending_done_and_says_the_same(client: TestClient, run_dir: Path) -> None:
    whole = _chat(client, run_dir.name).json()["choices"][0]["message"]["content"]
    text = _chat(client, run_dir.name, stream=True).text
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole


def test_concurrent_requests_share_a_batch_and_answer_as_alone(client: TestClient, run_dir: Path) -> None:
    prompts = ["a", "hello there, how are you", "one two three", "x y"]

    def ask(prompt: str) -> str:
        body = {"model": run_dir.name, "prompt": prompt, "max_tokens": 8}
        return str(client.post("/v1/completions", json=body).json()["choices"][0]["text"])

    alone = [ask(p) for p in prompts]
    engine = client.app.state.engine  # type: ignore[attr-defined]
    engine.batch_sizes.clear()
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, prompts))
    assert together == alone
    assert max(engine.batch_sizes) > 1  # some of them were generated together


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "messages": HI}, 404, "model"),
        ({"model": "base"}, 400, "messages"),
        ({"model": "base", "messages": HI, "max_tokens": 65}, 400, "max_tokens"),
        ({"model": "base", "messages": HI, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "base", "messages": HI, "n": 2}, 400, "n"),
        ({"model": "base", "messages": HI, "stop": ["\n"]}, 400, "stop"),
        ({"model": "base", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ({"model": "base", "messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
        ({"model": "base", "messages": HI, "pad": "x" * 5000}, 413, None),
    ],
)
def test_bad_requests_are_openai_errors_and_the_server_goes_on(
    client: TestClient, body: dict[str, Any], status: int, param: str | None
) -> None:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert _chat(client, "base", max_tokens=2).status_code == 200


def test_malformed_json_and_unknown_route(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"


class _BlockedModel(torch.nn.Module):
    """A model whose ``generate`` waits until released: a generation that takes as long as we like."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def generate(self, **kwargs: Any) -> None:
        self.started.set()
        self.release.wait(timeout=30)


def test_the_event_loop_answers_while_a_generation_runs(run_dir: Path) -> None:
    # Prepare: the real catalogue, its model swapped for one that blocks inside generate
    catalogue = load_catalogue([run_dir])
    blocked = _BlockedModel()
    catalogue.model = blocked
    with TestClient(create_app(Engine(catalogue))) as client, ThreadPoolExecutor(1) as pool:
        # Execute: a chat request that hangs in generation
        pending = pool.submit(_chat, client, "base")
        assert blocked.started.wait(timeout=30)
        # Assert: the server still answers, then the hung request completes once released
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 200
        assert not pending.done()
        blocked.release.set()
        assert pending.result(timeout=30).status_code == 200


def test_serve_command_on_a_folder_that_is_not_a_run(capsys, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "serve", str(tmp_path))
    assert code == 2 and "Traceback" not in err


def test_continue_final_message_goes_on_writing_the_assistants_reply(
    client: TestClient, run_dir: Path
) -> None:
    # vLLM's extension, used by the judge's follow-up: the reply is begun by the caller
    begun = [*HI, {"role": "assistant", "content": "Rating: [["}]
    body = _chat(client, run_dir.name, messages=begun, continue_final_message=True).json()
    loaded = load_run(run_dir)
    cfg = loaded.cfg
    ids = build_generation_input(HI, loaded.tokenizer, cfg.data.template, cfg.data.max_source_length)  # type: ignore[arg-type]
    ids += loaded.tokenizer("Rating: [[", add_special_tokens=False)["input_ids"]
    out = loaded.model.generate(  # type: ignore[union-attr]
        input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    expected = loaded.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert body["choices"][0]["message"]["content"] == expected
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_continue_final_message_needs_an_assistant_message_last(client: TestClient) -> None:
    response = _chat(client, "base", continue_final_message=True)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "continue_final_message"


def _prompt_tokens(client: TestClient, prompt: str) -> int:
    body = {"model": "base", "prompt": prompt, "max_tokens": 1}
    return int(client.post("/v1/completions", json=body).json()["usage"]["prompt_tokens"])


def test_prompts_are_cut_to_the_runs_length_unless_the_server_says_more(run_dir: Path) -> None:
    long_prompt = " ".join(["one two three four"] * 100)  # 400 words: past the run's max_source_length
    loaded = load_run(run_dir)
    source_length, tokens = (
        loaded.cfg.data.max_source_length,
        len(loaded.tokenizer(long_prompt, add_special_tokens=False)["input_ids"]),
    )
    assert tokens == 400 > source_length
    with TestClient(create_app(Engine(load_catalogue([run_dir])))) as default:
        assert _prompt_tokens(default, long_prompt) == source_length
    limits = Limits(max_prompt_tokens=1000)
    with TestClient(create_app(Engine(load_catalogue([run_dir])), limits)) as longer:
        assert _prompt_tokens(longer, long_prompt) == tokens


def test_a_prompt_limit_past_the_models_positions_is_refused(run_dir: Path) -> None:
    with pytest.raises(FedtuneError, match=r"max-prompt-tokens 4096 .* 2048 positions"):
        build_app([run_dir], Limits(max_prompt_tokens=4096))
