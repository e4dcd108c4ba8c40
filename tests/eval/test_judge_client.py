"""Retries, backoff, failures and the cache of the judge client against a scripted endpoint."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from eval.fake_openai import Raw, fake_endpoint
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


def test_a_slow_reply_times_out_and_is_retried() -> None:
    def script(body: dict, n: int) -> tuple[int, str]:
        if n == 0:
            time.sleep(2.0)  # longer than the client's timeout
        return 200, "late but here"

    with fake_endpoint(script) as fake:
        endpoint = Endpoint(fake.base_url, "m", timeout=0.5, retries=1, backoff=0)
        with JudgeClient(endpoint, sleep=lambda s: None) as client:
            reply = client.ask(MSG)
        assert len(fake.requests) == 2
    assert reply.content == "late but here" and reply.attempts == 2


def test_timeouts_on_every_try_are_an_error_naming_the_timeout() -> None:
    def script(body: dict, n: int) -> tuple[int, str]:
        time.sleep(2.0)  # every try: longer than the client's timeout
        return 200, "never in time"

    with fake_endpoint(script) as fake:
        endpoint = Endpoint(fake.base_url, "m", timeout=0.5, retries=1, backoff=0)
        with JudgeClient(endpoint, sleep=lambda s: None) as client:
            reply = client.ask(MSG)
    assert reply.content is None and reply.attempts == 2
    assert reply.error == "timed out after 0.5 s"


def test_ask_many_has_requests_in_flight_together() -> None:
    """Four requests meet at a barrier: only four in flight at once pass it (one at a time would time out)."""
    barrier = threading.Barrier(4, timeout=20)

    def script(body: dict, n: int) -> tuple[int, str]:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return 500, "alone at the barrier"
        return 200, "together"

    prompts = [[{"role": "user", "content": str(i)}] for i in range(4)]
    with (
        fake_endpoint(script) as fake,
        JudgeClient(Endpoint(fake.base_url, "m", timeout=30, retries=0)) as client,
    ):
        replies = client.ask_many(prompts, concurrency=4)
    assert [r.content for r in replies] == ["together"] * 4


def test_retry_after_is_honoured_when_longer_than_the_backoff() -> None:
    delays: list[float] = []

    def script(body: dict, n: int) -> tuple[int, str] | Raw:
        if n == 0:
            return Raw(429, '{"error": "slow down"}', {"Retry-After": "3"})
        if n == 1:
            return Raw(503, '{"error": "busy"}', {"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"})
        return 200, "ok"

    with (
        fake_endpoint(script) as fake,
        JudgeClient(Endpoint(fake.base_url, "m", backoff=0.5), sleep=delays.append) as client,
    ):
        reply = client.ask(MSG)
    assert reply.content == "ok" and reply.attempts == 3
    assert delays == [3.0, 1.0]  # 3 s asked for > 0.5 s; an HTTP date falls back to the backoff (0.5 x 2)


def test_a_200_without_a_message_is_an_error_not_retried() -> None:
    with fake_endpoint(lambda body, n: Raw(200, '{"choices": []}')) as fake:
        with JudgeClient(Endpoint(fake.base_url, "m", backoff=0), sleep=lambda s: None) as client:
            reply = client.ask(MSG)
        assert len(fake.requests) == 1
    assert reply.content is None
    assert reply.error is not None and reply.error.startswith("HTTP 200 without choices[0].message.content")
