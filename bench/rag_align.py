"""Retriever-generator alignment, measured: does a federatedly trained query adapter help recall?

Each client scores the top ``--candidates`` reference passages of its training questions by
the generator's log-likelihood of the gold answer given each passage (fedtune.rag.align);
clients train the dense retriever's query adapter towards that distribution for
``--epochs`` each round from the global one, and the server averages it weighted by the
clients' question counts (fedavg), for ``--rounds`` rounds. Measured on the clients'
held-out questions: recall@1/5 and MRR of the gold article's passage in the reference base,
dense and hybrid, without and with the adapter; and the KL to the generator's targets on
the training questions.

Data: configs/rag.toml's (wiki-qa, non-IID by category; reference base: the wiki summaries);
``--set data.source=wiki-qa-described`` adds the questions asked by description, where dense
retrieval has room to improve (held-out recall is then also shown per question form).
Generator: the config's base model, or ``--adapter FOLDER`` (e.g. a run's final adapter).

Usage: python bench/rag_align.py [--config configs/rag.toml] [--questions 60] [--candidates 8]
       [--rounds 5] [--epochs 20] [--adapter FOLDER] [--set KEY=VALUE]
Last line: ``aligned_minus_plain_hybrid_recall_at_5: X`` (kept only if > 0).
"""

from __future__ import annotations

import argparse
import logging
import statistics
from functools import lru_cache

import numpy as np
import torch

from fedtune.config import Config, load_config
from fedtune.data.pipeline import client_conversations, partitions
from fedtune.data.wiki import categorised_articles, wiki_qa_records
from fedtune.federated.aggregation.fedavg import fedavg
from fedtune.models.adapters import attach_lora, load_adapter_state, read_adapter_folder
from fedtune.models.load import load_model, load_tokenizer
from fedtune.rag import align
from fedtune.rag.augment import Budget, Evidence, question_of
from fedtune.rag.client import reference_base
from fedtune.rag.embed import embed
from fedtune.rag.fusion import rrf
from fedtune.rag.store import KnowledgeBase

log = logging.getLogger("rag_align")


@lru_cache(maxsize=1)
def question_index() -> dict[str, tuple[str, str]]:
    """Every wiki-qa(-described) question (each is unique) -> (its article's passage id, its form)."""
    articles = categorised_articles()
    return {
        r["messages"][0]["content"]: (f"wiki:{r['article']}", r["form"])
        for r in wiki_qa_records(articles, described=True)
    }


def client_questions(cfg: Config, pid: int, limit: int) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """A client's (question, answer) training pairs (first ``limit``) and its held-out questions.

    A held-out question: ``question``, ``gold`` (its article's passage id) and ``form``.
    """
    train, test = client_conversations(cfg, pid)
    pairs = [(question_of(c), c[-1]["content"]) for c in train["messages"][:limit]]
    index = question_index()
    held = [
        {"question": q, "gold": index[q][0], "form": index[q][1]} for q in map(question_of, test["messages"])
    ]
    return pairs, held


def candidates(kb: KnowledgeBase, questions: list[str], m: int) -> list[list[int]]:
    """Row ids of each question's top ``m`` hybrid hits in the reference base."""
    index = {p.id: i for i, p in enumerate(kb.passages)}
    return [[index[h.passage.id] for h in hits] for hits in kb.search_many(questions, k=m, mode="hybrid")]


def client_targets(model, budget: Budget, kb: KnowledgeBase, pairs, m: int, tau_g: float):
    """(query embeddings, candidate embeddings, generator target distributions) of one client."""
    qs = [q for q, _ in pairs]
    rows = candidates(kb, qs, m)
    keep = [i for i, r in enumerate(rows) if len(r) == m]
    vectors = kb.dense_vectors()
    targets = []
    for i in keep:
        ev = [
            Evidence("reference", kb.passages[r].id, kb.passages[r].source, kb.passages[r].text)
            for r in rows[i]
        ]
        targets.append(align.softmax(align.answer_logliks(model, budget, *pairs[i], ev), tau_g))
    queries = embed(kb.embedder(), [qs[i] for i in keep])
    return queries, np.stack([vectors[rows[i]] for i in keep]), np.stack(targets)


def recall(kb: KnowledgeBase, held: list[dict[str, str]], adapter, depth: int = 50) -> dict[str, float]:
    """recall@1, recall@5 and MRR (within ``depth``) of the gold passage, dense and hybrid."""
    questions, golds = [h["question"] for h in held], [h["gold"] for h in held]
    qv = align.adapt_queries(embed(kb.embedder(), questions), adapter)
    _, dense = kb._dense.search(qv, depth)
    lexical = [[r for r, _ in row] for row in kb.bm25_ranking(questions, depth)]
    out: dict[str, float] = {}
    for mode in ("dense", "hybrid"):
        ranks = []
        for gold, d, lex in zip(golds, dense, lexical, strict=True):
            order = (
                [int(r) for r in d] if mode == "dense" else [r for r, _ in rrf([lex, [int(r) for r in d]])]
            )
            ids = [kb.passages[r].id for r in order]
            ranks.append(ids.index(gold) + 1 if gold in ids else None)
        out[f"{mode}_r@1"] = statistics.fmean(r is not None and r <= 1 for r in ranks)
        out[f"{mode}_r@5"] = statistics.fmean(r is not None and r <= 5 for r in ranks)
        out[f"{mode}_mrr"] = statistics.fmean(1 / r if r else 0.0 for r in ranks)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/rag.toml")
    parser.add_argument("--questions", type=int, default=60, help="training questions scored per client")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tau-g", type=float, default=0.5, help="temperature of the generator's targets")
    parser.add_argument("--tau-r", type=float, default=0.05, help="temperature of the retriever")
    parser.add_argument("--adapter", help="a peft adapter folder for the generator")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(args.config, args.set)
    kb = reference_base(cfg.rag)
    assert kb is not None, "rag.reference is needed"
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    if args.adapter:
        model = attach_lora(model, cfg.model.lora)
        load_adapter_state(model, read_adapter_folder(args.adapter))
    model.eval()
    budget = Budget.of(cfg, tok)
    clients, tests = [], []
    for pid in range(len(partitions(cfg))):
        pairs, test = client_questions(cfg, pid, args.questions)
        clients.append(client_targets(model, budget, kb, pairs, args.candidates, args.tau_g))
        tests += test
        log.info("client %s: %s training questions scored", pid, len(clients[-1][0]))
    dim = clients[0][0].shape[1]
    glob = align.identity_adapter(dim)
    kl0 = statistics.fmean(align.kl_to_targets(None, *c, tau_r=args.tau_r) for c in clients)
    for rnd in range(1, args.rounds + 1):
        local = [
            align.train_query_adapter(glob, *c, tau_r=args.tau_r, lr=args.lr, epochs=args.epochs, seed=rnd)
            for c in clients
        ]
        glob = fedavg(local, [len(c[0]) for c in clients])
        kl = statistics.fmean(align.kl_to_targets(glob, *c, tau_r=args.tau_r) for c in clients)
        log.info("round %s: mean KL to the generator's targets %.4f (start %.4f)", rnd, kl, kl0)
    plain, aligned = recall(kb, tests, None), recall(kb, tests, glob)
    print(f"\n{len(tests)} held-out questions, {len(clients)} clients, {args.rounds} x {args.epochs} epochs")
    print(f"train KL to generator targets: plain {kl0:.4f}  aligned {kl:.4f}")
    print(f"{'':<8}" + "".join(f"{k:>12}" for k in plain))
    for name, row in (("plain", plain), ("aligned", aligned)):
        print(f"{name:<8}" + "".join(f"{v:>12.4f}" for v in row.values()))
    for form in sorted({h["form"] for h in tests}):
        part = [h for h in tests if h["form"] == form]
        p, a = recall(kb, part, None), recall(kb, part, glob)
        print(
            f"{form} ({len(part)}): dense r@5 {p['dense_r@5']:.4f} -> {a['dense_r@5']:.4f}, "
            f"hybrid r@5 {p['hybrid_r@5']:.4f} -> {a['hybrid_r@5']:.4f}"
        )
    print(f"aligned_minus_plain_hybrid_recall_at_5: {aligned['hybrid_r@5'] - plain['hybrid_r@5']:.4f}")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
