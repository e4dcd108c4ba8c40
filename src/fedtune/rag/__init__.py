"""Retrieval for FF-RAG: knowledge bases (bm25 + dense, fused by rank), prompts with evidence.

- :mod:`~fedtune.rag.sources`: documents from files, folders, ``datasets`` or the wiki; chunking.
- :mod:`~fedtune.rag.embed`: sentence-transformers embedders and their fingerprint.
- :mod:`~fedtune.rag.store`: the on-disk index folder (faiss + bm25s), build, add, search.
- :mod:`~fedtune.rag.fusion`: reciprocal rank fusion (pure).
"""
