"""Retrieval quality of a fedtune knowledge base on wiki-qa's held-out questions: BM25, dense, hybrid.

The authoritative base is the categorised wiki summaries (``article_text``, chunked like
``rag.reference = "wiki"``), indexed with :func:`fedtune.rag.store.build` and cached under
``~/.cache/fedtune/bench/`` (keyed by article count, embedder and content), so reruns skip
the embedding. The questions are ``--dataset``'s (default ``wiki-qa-described``, the issue's
set: questions from titles and from descriptions, answered by first sentences; see
:func:`fedtune.data.wiki.wiki_qa_records`): "What is T?", for half the articles "Tell me
briefly about T.", and for every article with a telling description 'What is the subject
described as "1968 film by Stanley Kubrick"?'. They are partitioned one client per
category (the ``category`` partitioner) with each client's held-out split taken as in a
run (``split_train_test``, ``data.test_fraction`` 0.2, seed ``seed + client``);
``--questions`` of the held-out ones are sampled. A question's gold is its article's
passage (any chunk of it). The title forms name the article (BM25 and dense find nearly
all); the described form must be matched by meaning; a table breaks recall@5 down by form.

Usage: python bench/rag_retrieval.py [--dataset wiki-qa-described|wiki-qa] [--articles N]
       [--questions 500] [--seed 0]
Last line: ``hybrid_recall_at_5: X`` (goal >= 0.90, and above bm25 and dense alone).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KS = (1, 5, 10)
FORMS = {"title": "What is T?", "paraphrase": "Tell me briefly...", "described": "by description"}


def gold_ranks(kb, queries: list[str], gold: list[str], mode: str) -> list[int | None]:
    """The rank (1-based) of the first passage of the gold article per query, None if not in the top 10."""
    hits = kb.search_many(queries, k=max(KS), mode=mode)
    return [
        next((h.rank for h in row if h.passage.source == want), None)
        for row, want in zip(hits, gold, strict=True)
    ]


def scores(ranks: list[int | None]) -> dict[str, float]:
    out = {f"r@{k}": statistics.mean(r is not None and r <= k for r in ranks) for k in KS}
    out["mrr@10"] = statistics.mean(1.0 / r if r else 0.0 for r in ranks)
    return out


def recall5(ranks: dict[str, list[int | None]], idx: list[int]) -> dict[str, float]:
    """Recall@5 per mode over the queries ``idx``."""
    return {m: statistics.mean(r[i] is not None and r[i] <= 5 for i in idx) for m, r in ranks.items()}


def table(title: str, n: int, rows: dict[str, dict[str, float]]) -> None:
    print(f"\n{title} ({n} queries)")
    print(f"{'mode':<8} {'r@1':>6} {'r@5':>6} {'r@10':>6} {'mrr@10':>7}")
    for mode, s in rows.items():
        print(f"{mode:<8} {s['r@1']:6.3f} {s['r@5']:6.3f} {s['r@10']:6.3f} {s['mrr@10']:7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=0, help="a seeded subset of articles (0: all)")
    parser.add_argument("--questions", type=int, default=500, help="held-out questions sampled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedder", default="all-MiniLM-L6-v2")
    parser.add_argument("--dataset", default="wiki-qa-described", choices=("wiki-qa-described", "wiki-qa"))
    args = parser.parse_args()

    from fedtune.data.builtin import BUILTINS
    from fedtune.data.partition import partition_dataset, split_train_test
    from fedtune.data.wiki import article_text, categorised_articles
    from fedtune.models.load import cache_dir
    from fedtune.rag.sources import Doc, to_passages
    from fedtune.rag.store import LEXICAL, MANIFEST, MODES, KnowledgeBase, build

    articles = categorised_articles()
    if 0 < args.articles < len(articles):
        keep = set(random.Random(args.seed).sample(range(len(articles)), args.articles))
        articles = [a for i, a in enumerate(articles) if i in keep]
    kept = {a["title"] for a in articles}

    # the base: every article as wiki:TITLE documents, chunked as the reference base is
    docs = [Doc(id=f"wiki:{a['title']}", source=f"wiki:{a['title']}", text=article_text(a)) for a in articles]
    passages = list(to_passages(docs))
    digest = hashlib.sha1("\n".join([str(LEXICAL), *(p.text for p in passages)]).encode()).hexdigest()[:10]
    slug = args.embedder.replace("/", "_")
    folder = cache_dir() / "bench" / f"wiki-{len(articles)}-{slug}-{digest}"
    if (folder / MANIFEST).exists():
        kb = KnowledgeBase.open(folder)
        print(f"index: {folder} (cached, {len(kb)} passages)")
    else:
        t0 = time.perf_counter()
        kb = build(passages, folder, embedder=args.embedder, progress=True)
        secs = time.perf_counter() - t0
        print(f"index: {folder} (built: {len(kb)} passages in {secs:.1f} s, {len(kb) / secs:.1f} passages/s)")
    print(f"articles: {len(articles)}  passages: {len(kb)}  embedder: {args.embedder}")

    # held-out questions per client, one client per category, as a run splits them
    ds = BUILTINS.get(args.dataset)()
    ds = ds.filter(lambda r: r["article"] in kept)
    categories = sorted(set(ds["category"]))
    parts = partition_dataset(ds, name="category", num_partitions=len(categories), seed=args.seed)
    held_out = []
    for cid, part in enumerate(parts):
        _, test = split_train_test(part, 0.2, args.seed + cid)
        held_out += [(cid, r) for r in test]
    sample = random.Random(args.seed).sample(held_out, min(args.questions, len(held_out)))
    questions = [r["messages"][0]["content"] for _, r in sample]
    gold = [f"wiki:{r['article']}" for _, r in sample]
    forms = [r["form"] for _, r in sample]
    print(
        f"questions: {len(ds)} {args.dataset} in {len(parts)} clients, "
        f"{len(held_out)} held out, {len(sample)} sampled"
    )

    t0 = time.perf_counter()
    ranks = {mode: gold_ranks(kb, questions, gold, mode) for mode in MODES}
    print(f"search: {time.perf_counter() - t0:.1f} s for {len(questions)} questions x {len(MODES)} modes")
    main_rows = {mode: scores(r) for mode, r in ranks.items()}
    table(f"held-out {args.dataset} questions", len(questions), main_rows)

    print("\nby question form (recall@5)")
    print(f"{'form':<28} {'n':>4} {'bm25':>6} {'dense':>6} {'hybrid':>6}")
    for form, example in FORMS.items():
        idx = [i for i, f in enumerate(forms) if f == form]
        if idx:
            r5 = recall5(ranks, idx)
            label = f"{form} ({example})"
            print(f"{label:<28} {len(idx):>4} {r5['bm25']:6.3f} {r5['dense']:6.3f} {r5['hybrid']:6.3f}")

    print("\nper client (recall@5)")
    print(f"{'client':>6} {'category':<28} {'n':>4} {'bm25':>6} {'dense':>6} {'hybrid':>6}")
    for cid, part in enumerate(parts):
        idx = [i for i, (c, _) in enumerate(sample) if c == cid]
        if not idx:
            continue
        r5 = recall5(ranks, idx)
        print(
            f"{cid:>6} {part['category'][0]:<28} {len(idx):>4} "
            f"{r5['bm25']:6.3f} {r5['dense']:6.3f} {r5['hybrid']:6.3f}"
        )

    best_single = max(main_rows["bm25"]["r@5"], main_rows["dense"]["r@5"])
    print(f"\nhybrid recall@5 above the best single mode: {main_rows['hybrid']['r@5'] > best_single}")
    print(f"hybrid_recall_at_5: {main_rows['hybrid']['r@5']:.3f}")


if __name__ == "__main__":
    main()
