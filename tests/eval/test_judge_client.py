"""Retries, backoff, failures and the cache of the judge client against a scripted endpoint."""

from __future__ import annotations

from pathlib import Path

from eval.fake_openai import fake_endpoint
from fedtune.eval.judge_client import Endpoint, JudgeClient, ReplyCache

MSG = [{"role": "user", "content": "rate this"}]


def test_429_then_success_backs_off() -> None:
    delays: list[float] = []
    script = lambda body, n: (429, "slow down") if n == 0 else (200, "Rating: [[9]]")  # noqa: E731
    with fake_endpoint(script) as fake:
        client = JudgeClient(Endpoint(fake.base_url, "m", backoff=0.5), sleep=delays.append)
        reply = client.ask(MSG)
        client.close()
    assert reply.content == "Rating: [[9]]" and reply.attempts == 2
    assert delays == [0.5]


def test_500s_exhaust_the_retries_with_doubling_delays() -> None:
    delays: list[float] = []
    with fake_endpoint(lambda body, n: (503, "down")) as fake:
        with JudgeClient(Endpoint(fake.base_url, "m", retries=3, backoff=1.0), sleep=delays.append) as client:
            reply = client.ask(MSG)
        assert len(fake.requests) == 4
    assert reply.content is None and reply.attempts == 4
    assert reply.error is not None and reply.error.startswith("HTTP 503")
    assert delays == [1.0, 2.0, 4.0]


def test_a_4xx_is_not_retried() -> None:
    with fake_endpoint(lambda body, n: (401, "bad key")) as fake:
        with JudgeClient(Endpoint(fake.base_url, "m", backoff=0), sleep=lambda s: None) as client:
            reply = client.ask(MSG)
        assert len(fake.requests) == 1
    assert reply.error is not None and "HTTP 401" in reply.error


def test_one_failing_question_does_not_stop_the_others() -> None:
    def script(body: dict, n: int) -> tuple[int, str]:
        return (500, "no") if "fail" in body["messages"][0]["content"] else (200, "ok")

    prompts = [[{"role": "user", "content": t}] for t in ("a", "fail", "b")]
    with fake_endpoint(script) as fake:
        client = JudgeClient(Endpoint(fake.base_url, "m", retries=1, backoff=0))
        replies = client.ask_many(prompts, concurrency=3)
        client.close()
    assert [r.content for r in replies] == ["ok", None, "ok"]


def test_cache_key_is_endpoint_model_and_prompt(tmp_path: Path) -> None:
    cache = ReplyCache(tmp_path)
    with fake_endpoint(lambda body, n: (200, f"reply {n}")) as fake:
        with JudgeClient(Endpoint(fake.base_url, "m"), cache) as client:
            assert client.ask(MSG).content == "reply 0"
            again = client.ask(MSG)
        with JudgeClient(Endpoint(fake.base_url, "other-model"), cache) as client:
            other = client.ask(MSG)
        assert len(fake.requests) == 2
    assert again.cached and again.content == "reply 0"
    assert not other.cached and other.content == "reply 1"


def test_two_endpoints_with_one_model_name_do_not_share_replies(tmp_path: Path) -> None:
    cache = ReplyCache(tmp_path)
    first, second = (
        fake_endpoint(lambda body, n: (200, "first")),
        fake_endpoint(lambda body, n: (200, "second")),
    )
    with first as one, second as two:
        with JudgeClient(Endpoint(one.base_url, "judge"), cache) as client:
            assert client.ask(MSG).content == "first"
        with JudgeClient(Endpoint(two.base_url, "judge"), cache) as client:
            reply = client.ask(MSG)
        assert len(two.requests) == 1
    assert not reply.cached and reply.content == "second"


def test_api_key_is_sent_as_bearer() -> None:
    with fake_endpoint(lambda body, n: (200, "x")) as fake:
        with JudgeClient(Endpoint(fake.base_url, "m", api_key="sk-test")) as client:
            client.ask(MSG)
        with JudgeClient(Endpoint(fake.base_url, "m")) as client:
            client.ask(MSG)
    assert fake.authorization == ["Bearer sk-test", None]


def test_a_cache_scope_stands_for_the_url(tmp_path: Path) -> None:
    """A judge restarted on another port (same scope) is not asked again; another scope is."""
    cache = ReplyCache(tmp_path)
    first, second = (
        fake_endpoint(lambda body, n: (200, "first")),
        fake_endpoint(lambda body, n: (200, "second")),
    )
    with first as one, second as two:
        with JudgeClient(Endpoint(one.base_url, "judge", cache_scope="local smollm2"), cache) as client:
            assert client.ask(MSG).content == "first"
        with JudgeClient(Endpoint(two.base_url, "judge", cache_scope="local smollm2"), cache) as client:
            same = client.ask(MSG)
        with JudgeClient(Endpoint(two.base_url, "judge", cache_scope="local smollm2 2048"), cache) as client:
            other = client.ask(MSG)
        assert len(two.requests) == 1
    assert same.cached and same.content == "first"
    assert not other.cached and other.content == "second"
