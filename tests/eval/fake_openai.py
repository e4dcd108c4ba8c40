"""A scripted OpenAI-compatible endpoint on loopback: POST /v1/chat/completions only."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Raw:
    """A scripted reply sent as it is: ``body`` verbatim (no completion wrapped around it), headers added."""

    status: int
    body: str
    headers: dict[str, str] = field(default_factory=dict)


# (request body, how many requests came before) -> (status, reply text) or a Raw reply;
# the script runs in the request's own thread, so it may sleep or wait for others.
Script = Callable[[dict[str, Any], int], "tuple[int, str] | Raw"]


@dataclass
class Fake:
    base_url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    authorization: list[str | None] = field(default_factory=list)


def completion(text: str) -> str:
    return json.dumps(
        {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        }
    )


@contextmanager
def fake_endpoint(script: Script) -> Iterator[Fake]:
    lock = threading.Lock()
    fake = Fake("")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                n = len(fake.requests)
                fake.requests.append(body)
                fake.authorization.append(self.headers.get("Authorization"))
            headers: dict[str, str] = {}
            if self.path != "/v1/chat/completions":
                status, payload = 404, '{"error": "not found"}'
            else:
                reply = script(body, n)
                if isinstance(reply, Raw):
                    status, payload, headers = reply.status, reply.body, reply.headers
                else:
                    status, text = reply
                    payload = completion(text) if status == 200 else json.dumps({"error": text})
            data = payload.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.base_url = f"http://127.0.0.1:{server.server_port}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def user_text(body: dict[str, Any]) -> str:
    """The last user message's text (a continuation ends with the assistant's begun reply)."""
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
