"""The tiny corpus of the knowledge-base tests (14 passages and 2 duplicates of them)."""

from __future__ import annotations

from fedtune.rag.sources import Passage

# Distinct topics; a query word appears only where noted, so bm25 results can be listed by hand
# (bm25 stems English words: "volcano" matches "Volcanoes", "river" "rivers").
TEXTS = [
    "Volcanoes erupt molten lava and ash from deep inside the earth.",
    "Mount Etna in Sicily is the most active volcano in Europe.",
    "Honey bees collect nectar from flowers and make honey in the hive.",
    "Bumblebees are larger and hairier than honey bees.",
    "Python is a programming language popular for data science.",
    "Rust is a systems programming language focused on memory safety.",
    "The Amazon river flows through the rainforest of South America.",
    "The Nile is the longest river in Africa.",
    "A violin has four strings and is played with a bow.",
    "The piano has eighty-eight black and white keys.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "Chess is a board game for two players on a checkered board.",
    "Bread is baked from flour, water, yeast and salt.",
    "Glaciers are slow rivers of ice that carve valleys.",
]
CORPUS = [Passage(id=f"p{i}", source=f"corpus.jsonl:{i + 1}", text=t) for i, t in enumerate(TEXTS)]
# two duplicates: one verbatim, one differing only in case and spacing
DUPLICATES = [
    Passage(id="dup-verbatim", source="extra.jsonl:1", text=TEXTS[0]),
    Passage(id="dup-folded", source="extra.jsonl:2", text="the NILE is  the longest\nriver in africa."),
]
INFO = {"sources": [{"source": "corpus.jsonl", "chunk_size": 200, "overlap": 40}]}
