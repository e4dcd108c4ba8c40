"""What fedtune's knowledge base costs against faiss + sentence-transformers + bm25s used directly.

Both sides index the same passages (a seeded subset of the categorised wiki summaries,
chunked as the reference base is) with the same embedder, in one process on the same cores:

- fedtune: :func:`fedtune.rag.store.build` (dedup, embed, probe, faiss + bm25s written to a
  folder atomically), then ``KnowledgeBase.search(q, k=5, mode=...)`` one query at a time;
- plain: the few lines a script would write: ``SentenceTransformer.encode`` (defaults,
  unit-length), ``faiss.IndexFlatIP``, ``bm25s.tokenize`` (English stop words and stems,
  PyStemmer) + ``BM25.index``,
  both saved to a folder with the passages; a query is encoded and searched, BM25-retrieved,
  or both (top 20 each) fused by RRF (k = 60).

Builds alternate fedtune, plain, fedtune, plain (ABAB); queries alternate which side goes
first. The model's own forward time on a typical augmented example (a wiki-qa question with
two retrieved passages, fitted by the ``[rag]`` budget) puts retrieval's cost in proportion.

Usage: python bench/rag_cost.py [--passages 1000] [--queries 200] [--builds 2] [--model smollm2]
Last line: ``query_latency_ratio: X`` (hybrid p50, fedtune / plain; goal <= 1.1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bm25s
import faiss
import numpy as np
import Stemmer

K, DEPTH, RRF_K = 5, 20, 60
STEMMER = Stemmer.Stemmer("english")


class Plain:
    """The same index built and queried with the libraries directly."""

    def __init__(self, model) -> None:
        self.model = model

    def build(self, texts: list[str], out: Path) -> None:
        vectors = self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.bm25 = bm25s.BM25()
        self.bm25.index(
            bm25s.tokenize(texts, stopwords="en", stemmer=STEMMER, show_progress=False), show_progress=False
        )
        out.mkdir()
        faiss.write_index(self.index, str(out / "dense.faiss"))
        self.bm25.save(str(out / "bm25"))
        with (out / "passages.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)

    def bm25_rows(self, query: str, k: int) -> list[int]:
        docs, scores = self.bm25.retrieve(
            bm25s.tokenize(query, stopwords="en", stemmer=STEMMER, show_progress=False),
            k=k,
            show_progress=False,
        )
        return [int(d) for d, s in zip(docs[0], scores[0], strict=True) if s > 0]

    def dense_rows(self, query: str, k: int) -> list[int]:
        _, rows = self.index.search(self.model.encode([query], normalize_embeddings=True), k)
        return [int(r) for r in rows[0] if r >= 0]

    def search(self, query: str, mode: str) -> list[int]:
        if mode == "bm25":
            return self.bm25_rows(query, K)
        if mode == "dense":
            return self.dense_rows(query, K)
        fused: dict[int, float] = {}
        for rows in (self.bm25_rows(query, DEPTH), self.dense_rows(query, DEPTH)):
            for rank, row in enumerate(rows, start=1):
                fused[row] = fused.get(row, 0.0) + 1.0 / (RRF_K + rank)
        return sorted(fused, key=lambda r: -fused[r])[:K]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def forward_ms(model_name: str, kb, question: str, answer: str, runs: int) -> tuple[int, float]:
    """Tokens and median forward time (ms, batch 1, no grad) of one augmented training example."""
    import torch

    from fedtune.config.rag import RagConfig
    from fedtune.config.sections import DataConfig, ModelConfig
    from fedtune.data.tokenize import tokenize_conversation
    from fedtune.data.types import message
    from fedtune.models.load import load_model, load_tokenizer
    from fedtune.rag.augment import Budget, Evidence, augment

    cfg, data, rag = ModelConfig(name=model_name), DataConfig(), RagConfig()
    tokenizer, model = load_tokenizer(cfg), load_model(cfg).eval()
    hits = kb.search(question, k=rag.k_reference)
    evidence = [Evidence("reference", h.passage.id, h.passage.source, h.passage.text) for h in hits]
    conv = [message("user", question), message("assistant", answer)]
    budget = Budget(tokenizer, data.template, data.max_source_length, rag.max_passage_tokens)
    conv, _ = augment(conv, evidence, budget)
    ids = tokenize_conversation(
        conv,
        tokenizer,
        data.template,
        max_source_length=data.max_source_length,
        max_target_length=data.max_target_length,
    )["input_ids"]
    batch = torch.tensor([ids])
    times = []
    with torch.no_grad():
        for i in range(runs + 2):
            t0 = time.perf_counter()
            model(input_ids=batch)
            if i >= 2:  # two warm-up passes
                times.append((time.perf_counter() - t0) * 1000)
    return len(ids), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--passages", type=int, default=1000, help="articles in the subset (a few chunk into more)"
    )
    parser.add_argument("--queries", type=int, default=200, help="single queries timed per mode and side")
    parser.add_argument("--builds", type=int, default=2, help="builds per side (ABAB...)")
    parser.add_argument("--model", default="smollm2", help="the generator whose forward time is compared")
    parser.add_argument("--forward-runs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedder", default="all-MiniLM-L6-v2")
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    from fedtune.data.wiki import article_text, categorised_articles, first_sentence
    from fedtune.rag.embed import embed, load_embedder, resolve_embedder
    from fedtune.rag.sources import Doc, to_passages
    from fedtune.rag.store import MODES, KnowledgeBase, build

    print(f"load average (1, 5, 15 min) at start: {os.getloadavg()}  cores: {os.cpu_count()}")
    rng = random.Random(args.seed)
    articles = categorised_articles()
    articles = rng.sample(articles, min(args.passages, len(articles)))
    docs = [Doc(id=f"wiki:{a['title']}", source=f"wiki:{a['title']}", text=article_text(a)) for a in articles]
    passages = list(to_passages(docs))
    texts = [p.text for p in passages]
    asked = rng.sample(articles, min(args.queries, len(articles)))
    queries = [f"What is {a['title']}?" for a in asked]
    print(
        f"passages: {len(passages)} ({len(articles)} articles)  queries: {len(queries)}  "
        f"embedder: {args.embedder}"
    )

    # both models loaded (and warmed) before any timing
    embed(load_embedder(args.embedder), texts[:32])
    plain = Plain(SentenceTransformer(resolve_embedder(args.embedder)))
    plain.model.encode(texts[:32])

    tmp = Path(tempfile.mkdtemp(prefix="fedtune-rag-cost-"))
    build_s: dict[str, list[float]] = {"fedtune": [], "plain": []}
    for i in range(args.builds):
        for side in ("fedtune", "plain"):
            t0 = time.perf_counter()
            if side == "fedtune":
                build(passages, tmp / f"fedtune-{i}", embedder=args.embedder)
            else:
                plain.build(texts, tmp / f"plain-{i}")
            build_s[side].append(time.perf_counter() - t0)
    fed_tput = len(passages) / statistics.mean(build_s["fedtune"])
    plain_tput = len(passages) / statistics.mean(build_s["plain"])
    print("\nindex build (embed + index + write), seconds per build, in the order run ABAB:")
    for side, secs in build_s.items():
        print(
            f"  {side:<8} {[round(s, 2) for s in secs]}  "
            f"-> {len(passages) / statistics.mean(secs):.1f} passages/s"
        )

    kb = KnowledgeBase.open(tmp / "fedtune-0")
    for mode in MODES:  # first queries load the indexes and the embedder check
        kb.search(queries[0], k=K, mode=mode)
        plain.search(queries[0], mode)
    lat: dict[str, dict[str, list[float]]] = {m: {"fedtune": [], "plain": []} for m in MODES}
    agree = 0
    for mode in MODES:
        for i, q in enumerate(queries):
            order = ("fedtune", "plain") if i % 2 == 0 else ("plain", "fedtune")
            got = {}
            for side in order:
                t0 = time.perf_counter()
                if side == "fedtune":
                    got[side] = [h.passage.id for h in kb.search(q, k=K, mode=mode)]
                else:
                    got[side] = [passages[r].id for r in plain.search(q, mode)]
                lat[mode][side].append((time.perf_counter() - t0) * 1000)
            agree += got["fedtune"] == got["plain"]
    print(
        f"\nsingle-query latency, ms ({len(queries)} queries per mode and side, alternating which goes first)"
    )
    print(
        f"{'mode':<7} {'fedtune p50':>11} {'p99':>7} {'plain p50':>10} {'p99':>7} "
        f"{'p50 ratio':>9} {'p99 ratio':>9}"
    )
    for mode in MODES:
        f, p = lat[mode]["fedtune"], lat[mode]["plain"]
        print(
            f"{mode:<7} {pct(f, 50):11.2f} {pct(f, 99):7.2f} {pct(p, 50):10.2f} {pct(p, 99):7.2f} "
            f"{pct(f, 50) / pct(p, 50):9.3f} {pct(f, 99) / pct(p, 99):9.3f}"
        )
    print(f"same top-{K} on both sides: {agree} of {len(queries) * len(MODES)} queries")

    art = asked[0]
    tokens, fwd = forward_ms(args.model, kb, queries[0], first_sentence(art["extract"]), args.forward_runs)
    hybrid_p50 = pct(lat["hybrid"]["fedtune"], 50)
    print(
        f"\n{args.model} forward, one augmented example ({tokens} tokens, batch 1, no grad): "
        f"{fwd:.1f} ms (median)"
    )
    print(
        f"hybrid query (fedtune p50) / forward: {hybrid_p50 / fwd:.3f}; "
        f"an example queries 2 bases: {2 * hybrid_p50 / fwd:.3f} of a forward pass"
    )
    print(f"load average (1, 5, 15 min) at end: {os.getloadavg()}")
    print(f"build_throughput_ratio: {fed_tput / plain_tput:.3f}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"query_latency_ratio: {hybrid_p50 / pct(lat['hybrid']['plain'], 50):.3f}")


if __name__ == "__main__":
    main()
