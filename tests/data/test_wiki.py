"""The wiki-qa builders: question forms, telling descriptions, the described set's records."""

from __future__ import annotations

from fedtune.data.wiki import first_sentence, telling_descriptions, wiki_qa_records


def _art(title: str, description: str, extract: str) -> dict[str, str]:
    return {"title": title, "description": description, "extract": extract, "category": "C"}


ARTICLES = [
    _art("Ada Lovelace", "English mathematician (1815–1852)", "Ada Lovelace was a mathematician. She wrote."),
    _art("Bus", "Large road vehicle", "A bus is a road vehicle. It carries people."),
    _art("Coach", "large road VEHICLE", "A coach is a bus. Long trips."),  # Bus's, case-folded
    _art("Dune", "1965 Dune novel", "Dune is a novel. By Herbert."),  # names its title
    _art("Etna", "", "Etna is a volcano. In Sicily."),  # none
]


def test_only_unique_descriptions_without_the_title_are_telling() -> None:
    assert telling_descriptions(ARTICLES) == {"Ada Lovelace"}


def test_described_records_add_one_question_by_description() -> None:
    records = wiki_qa_records(ARTICLES, paraphrase_fraction=0.0, described=True)

    assert [(r["article"], r["form"]) for r in records] == [
        ("Ada Lovelace", "title"),
        ("Ada Lovelace", "described"),
        ("Bus", "title"),
        ("Coach", "title"),
        ("Dune", "title"),
        ("Etna", "title"),
    ]
    ada = records[1]["messages"]
    assert ada[0]["content"] == 'What is the subject described as "English mathematician (1815–1852)"?'
    assert ada[1]["content"] == "Ada Lovelace was a mathematician."
    assert records[0]["messages"][0]["content"] == "What is Ada Lovelace?"


def test_described_leaves_the_other_records_as_they_were() -> None:
    plain = wiki_qa_records(ARTICLES, paraphrase_fraction=0.5, seed=3)
    described = wiki_qa_records(ARTICLES, paraphrase_fraction=0.5, seed=3, described=True)

    assert [r for r in described if r["form"] != "described"] == plain
    assert {r["form"] for r in plain} <= {"title", "paraphrase"}


def test_first_sentence_ends_at_a_sentence_end_and_caps_words() -> None:
    # no end after a capital ("U.S."): only after a lower-case letter, digit or ")"
    assert first_sentence("The U.S. Army is big. It fights.") == "The U.S. Army is big."
    assert first_sentence("one two three four", max_words=2) == "one two"
