"""fedtune serve against a plain transformers loop: tokens/s and time to first token.

A run directory of configs/demo.toml (SmolLM2-135M-Instruct, the ``smollm2`` built-in) gets a
fresh LoRA adapter (B = 0, so the answer is SmolLM2's own, through the unmerged LoRA layers as
served). The same chat prompt is answered greedily with ``--max-tokens`` new tokens:

- plain: ``load_run`` (fedtune's own base + adapter) and one ``model.generate`` with a
  streamer that notes when the first new token comes;
- served: ``fedtune.serve`` under uvicorn in this process on loopback, 1, 4 and 16 concurrent
  streaming ``/v1/chat/completions`` requests (httpx, one thread each); time to first token
  is the first content chunk, tokens/s counts the answer's tokens (checked equal to the plain
  answer's text) over the wall time from the first request to the last ``[DONE]``.

The single-stream comparison alternates plain and served passes ``--repeats`` times (after a
warm-up of each) and takes the medians, so a change in the machine's load hits both alike.

Usage: python bench/serve.py [--max-tokens 64] [--repeats 3]
Last line: ``serve_over_plain_throughput: X`` = median single-stream served tokens/s over median
plain tokens/s (goal >= 0.95); the 4- and 16-stream aggregates are printed beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import uvicorn
from transformers.generation.streamers import BaseStreamer

from fedtune.config import load_config
from fedtune.data.tokenize import build_generation_input
from fedtune.inference import Loaded, load_run
from fedtune.models.adapters import initial_adapter_state
from fedtune.rundir import RunDir
from fedtune.serve import build_app

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}]


class FirstToken(BaseStreamer):
    """Notes the time of the first generated token (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.calls, self.at = 0, 0.0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def make_run(root: Path) -> Path:
    cfg = load_config("configs/demo.toml", [f"run.output_dir='{root}'", "rag.enabled=false"])
    run = RunDir.create(cfg)
    state = initial_adapter_state(cfg.model, seed=0)
    run.save_round(1, state, cfg)
    run.mark_complete(1)
    run.save_final(state, cfg)
    return run.path


@torch.no_grad()
def plain(loaded: Loaded, max_tokens: int) -> tuple[str, int, float, float]:
    """(answer, tokens, tokens/s, time to first token) of one generate call."""
    cfg, tok = loaded.cfg, loaded.tokenizer
    ids = torch.tensor([build_generation_input(PROMPT, tok, cfg.data.template, cfg.data.max_source_length)])  # type: ignore[arg-type]
    kwargs = {"max_new_tokens": max_tokens, "do_sample": False, "pad_token_id": tok.pad_token_id}
    first = FirstToken()
    start = time.perf_counter()
    out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=first, **kwargs)  # type: ignore[union-attr]
    wall = time.perf_counter() - start
    new = out[0, ids.shape[1] :].tolist()
    new = [t for t in new if t not in (tok.eos_token_id, tok.pad_token_id)]
    return str(tok.decode(new, skip_special_tokens=True)), len(new), len(new) / wall, first.at - start


def stream_once(url: str, model: str, max_tokens: int, t0: float) -> tuple[str, float]:
    """One streaming chat request: (its text, seconds from ``t0`` to the first content chunk)."""
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "stream": True}
    parts, ttft = [], 0.0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            content = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if content:
                ttft = ttft or time.perf_counter() - t0
                parts.append(content)
    return "".join(parts), ttft


def served(url: str, model: str, max_tokens: int, streams: int) -> tuple[list[str], float, float]:
    """(texts, wall seconds, mean time to first token) of ``streams`` concurrent requests."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: stream_once(url, model, max_tokens, t0), range(streams)))
    wall = time.perf_counter() - t0
    return [r[0] for r in results], wall, sum(r[1] for r in results) / streams


def start_server(run_dir: Path, port: int) -> uvicorn.Server:
    server = uvicorn.Server(
        uvicorn.Config(build_app([run_dir]), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--repeats", type=int, default=3, help="alternated single-stream passes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_run(Path(tmp))
        loaded = load_run(run_dir)
        server = start_server(run_dir, args.port)
        url, model = f"http://127.0.0.1:{args.port}", run_dir.name
        plain(loaded, args.max_tokens), served(url, model, args.max_tokens, 1)  # warm-up both
        plain_tps, single_tps = [], []
        for _ in range(args.repeats):  # alternated, so a load change hits both sides alike
            text, tokens, tps, plain_ttft = plain(loaded, args.max_tokens)
            plain_tps.append(tps)
            _, wall, _ = served(url, model, args.max_tokens, 1)
            single_tps.append(tokens / wall)
        base = statistics.median(plain_tps)
        print(
            f"plain      1 stream : {tokens} tokens, {base:7.2f} tokens/s (median of "
            f"{', '.join(f'{t:.2f}' for t in plain_tps)}), first token {plain_ttft * 1000:7.1f} ms"
        )
        single = statistics.median(single_tps)
        runs = ", ".join(f"{t:.2f}" for t in single_tps)
        print(f"served     1 stream : {single:7.2f} tokens/s (median of {runs})")
        for streams in (1, 4, 16):
            texts, wall, ttft = served(url, model, args.max_tokens, streams)
            same = sum(t.strip() == text.strip() for t in texts)
            tps = streams * tokens / wall
            print(
                f"served {streams:4d} streams: {tps:7.2f} tokens/s aggregate "
                f"({tps / base:.2f} x plain), first token {ttft * 1000:7.1f} ms mean, "
                f"{same}/{streams} answers equal plain's"
            )
        server.should_exit = True
    print(f"serve_over_plain_throughput: {single / base:.3f}")


if __name__ == "__main__":
    main()
