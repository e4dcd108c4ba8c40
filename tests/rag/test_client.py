"""A client's retrieval: its case base, the two bases queried apart, decline examples, the split."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from fedtune.config import ModelConfig, RagConfig, load_config
from fedtune.data.types import message
from fedtune.models.load import load_tokenizer
from fedtune.rag.augment import Budget, case_text
from fedtune.rag.client import augment_dataset, augment_split, case_base, decline_set, reference_base
from fedtune.rag.retrieve import Retriever
from fedtune.rag.store import KnowledgeBase

FACTS = {
    "Ada Lovelace": "Ada Lovelace was an English mathematician who wrote the first computer program.",
    "Alan Turing": "Alan Turing was a British computer scientist who formalised computation.",
    "Marie Curie": "Marie Curie was a physicist and chemist who researched radioactivity.",
    "Isaac Newton": "Isaac Newton was an English physicist who formulated the laws of motion.",
    "Grace Hopper": "Grace Hopper was an American computer scientist who invented the first compiler.",
}
REFERENCE_ONLY = {
    "Rosalind Franklin": "Rosalind Franklin was a chemist whose X-ray images showed DNA's helix."
}


def qa(name: str, answer: str, template: str = "What is {}?") -> list:
    return [message("user", template.format(name)), message("assistant", answer)]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(name="tiny-llama"))


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "reference.jsonl"
    docs = {**FACTS, **REFERENCE_ONLY}
    path.write_text("".join(json.dumps({"text": f"{k}. {v}"}) + "\n" for k, v in docs.items()))
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory, reference_file):
    cfg = RagConfig(enabled=True, reference=str(reference_file), k_case=2, k_reference=1, mode="bm25")
    train = [qa(k, v) for k, v in FACTS.items()]
    cases = case_base(train, cfg, tmp_path_factory.mktemp("home"), None)
    return cfg, train, cases, reference_base(cfg)


def test_case_base_is_the_training_records_and_is_built_once(bases, tmp_path_factory):
    cfg, train, cases, _ = bases
    assert isinstance(cases, KnowledgeBase)
    assert sorted(p.text for p in cases.passages) == sorted(case_text(c) for c in train)
    assert case_base(train, cfg, cases.path.parent.parent, None).path == cases.path  # content-addressed


def test_decline_set_takes_a_rounded_share():
    assert len(decline_set(12, 0.25, seed=0)) == 3
    assert decline_set(12, 0.25, seed=0) == decline_set(12, 0.25, seed=0)
    assert decline_set(10, 0.0, seed=1) == set()


def test_training_example_never_retrieves_its_own_record(bases, tokenizer):
    cfg, train, cases, ref = bases
    budget = Budget(tokenizer, "chat", max_source_length=512, max_passage_tokens=64)
    out, stats = augment_dataset(Dataset.from_dict({"messages": train}), Retriever(cfg, cases, ref), budget)
    for conv, original in zip(out["messages"], train, strict=True):
        prompt = conv[0]["content"]
        assert case_text(original) not in prompt  # its own record is excluded ...
        assert prompt.count("[case ") == 2 and prompt.count("[reference ") == 1  # ... two others come
        assert prompt.index("[case 1]") < prompt.index("[reference 1]")
        assert conv[-1]["content"] == original[-1]["content"]
    assert stats["case"] == 10 and stats["reference"] == 5 and stats["declines"] == 0
    assert stats["reference_task"] == 5 and stats["case_task"] == 0  # only the reference holds the answers


def test_paraphrase_finds_its_sibling_case_and_the_reference(bases, tokenizer):
    cfg, _, cases, ref = bases
    budget = Budget(tokenizer, "chat", max_source_length=512, max_passage_tokens=64)
    asked = [qa("Ada Lovelace", FACTS["Ada Lovelace"], "Tell me briefly about {}.")]
    out, stats = augment_dataset(Dataset.from_dict({"messages": asked}), Retriever(cfg, cases, ref), budget)
    assert stats["case_task"] == 1  # its sibling case holds the answer
    prompt = out["messages"][0][0]["content"]
    assert "[case 1] Question: What is Ada Lovelace?" in prompt
    assert "[reference 1] Ada Lovelace." in prompt


def test_decline_examples_get_no_passage_holding_the_answer(bases, tokenizer):
    cfg, train, cases, ref = bases
    budget = Budget(tokenizer, "chat", max_source_length=512, max_passage_tokens=64)
    ds = Dataset.from_dict({"messages": train})
    out, stats = augment_dataset(ds, Retriever(cfg, cases, ref), budget, decline_fraction=0.4, seed=3)
    declined = [c for c in out["messages"] if c[-1]["content"] == cfg.decline_text]
    assert stats["declines"] == len(declined) == 2
    for conv in declined:
        original = next(o for o in train if o[0]["content"] == conv[0]["content"].rsplit("Question: ", 1)[1])
        assert original[-1]["content"] not in conv[0]["content"]


def test_paired_decline_examples_sit_beside_their_answer_examples(bases, tokenizer):
    cfg, train, cases, ref = bases
    budget = Budget(tokenizer, "chat", max_source_length=512, max_passage_tokens=64)
    categories = [f"c{i}" for i in range(len(train))]
    ds = Dataset.from_dict({"messages": train, "category": categories})
    retriever = Retriever(cfg, cases, ref)
    out, stats = augment_dataset(ds, retriever, budget, decline_fraction=0.4, decline_mode="pair", seed=3)
    chosen = decline_set(len(train), 0.4, 3)  # the same two examples as replace mode's
    # 5 answer examples, each chosen one followed by its decline example: 5 + 2 rows
    expected = [(i, d) for i in range(len(train)) for d in ((False, True) if i in chosen else (False,))]
    assert stats["examples"] == len(out) == 7 and stats["declines"] == 2
    assert out["category"] == [categories[i] for i, _ in expected]
    for conv, (i, declined) in zip(out["messages"], expected, strict=True):
        question, answer = train[i][0]["content"], train[i][-1]["content"]
        assert conv[0]["content"].endswith(f"Question: {question}")
        assert conv[-1]["content"] == (cfg.decline_text if declined else answer)
        assert (answer in conv[0]["content"]) is (not declined)  # a reference passage holds it
    with pytest.raises(ValueError, match=r"rag\.decline_mode: 'swap'"):
        augment_dataset(ds, retriever, budget, decline_fraction=0.4, decline_mode="swap")


def test_split_builds_the_case_base_from_train_only(tokenizer, reference_file, tmp_path):
    cfg = load_config(
        "configs/tiny.toml",
        [
            "rag.enabled=true",
            f"rag.reference='{reference_file}'",
            "rag.mode='bm25'",
            "data.max_source_length=256",
        ],
    )
    train = Dataset.from_dict({"messages": [qa(k, v) for k, v in FACTS.items()]})
    test = Dataset.from_dict({"messages": [qa(k, v) for k, v in REFERENCE_ONLY.items()]})
    new_train, new_test = augment_split(cfg, tokenizer, train, test, state_dir=str(tmp_path))
    prompt = new_test["messages"][0][0]["content"]
    assert "[reference 1] Rosalind Franklin." in prompt
    assert "Rosalind" not in "".join(c[0]["content"].split("Question:")[0] for c in new_train["messages"])
    (folder,) = (tmp_path / "kb" / "case").iterdir()  # indexed under the node's state dir
    assert len(KnowledgeBase.open(folder)) == len(FACTS)


def test_split_puts_the_instruction_in_train_and_test_prompts(tokenizer, reference_file, tmp_path):
    cfg = load_config(
        "configs/tiny.toml",
        [
            "rag.enabled=true",
            f"rag.reference='{reference_file}'",
            "rag.mode='bm25'",
            "rag.decline_fraction=0.5",
            "rag.instruction='Answer from the evidence, else reply: {decline_text}'",
            "data.max_source_length=256",
        ],
    )
    train = Dataset.from_dict({"messages": [qa(k, v) for k, v in FACTS.items()]})
    test = Dataset.from_dict({"messages": [qa(k, v) for k, v in REFERENCE_ONLY.items()]})
    new_train, new_test = augment_split(cfg, tokenizer, train, test, state_dir=str(tmp_path))
    line = f"\n\nAnswer from the evidence, else reply: {cfg.rag.decline_text}\n\nQuestion: "
    prompts = [c[0]["content"] for c in [*new_train["messages"], *new_test["messages"]]]
    assert prompts and all(line in p for p in prompts)
    declined = [c for c in new_train["messages"] if c[-1]["content"] == cfg.rag.decline_text]
    assert len(declined) == round(0.5 * len(FACTS))  # the decline examples carry it too


@pytest.mark.parametrize(("mode", "rows"), [("replace", 5), ("pair", 7)])
def test_split_takes_the_decline_mode_from_the_config(tokenizer, reference_file, tmp_path, mode, rows):
    overrides = ["rag.enabled=true", f"rag.reference='{reference_file}'", "rag.mode='bm25'"]
    overrides += ["rag.decline_fraction=0.4", f"rag.decline_mode='{mode}'", "data.max_source_length=256"]
    cfg = load_config("configs/tiny.toml", overrides)
    train = Dataset.from_dict({"messages": [qa(k, v) for k, v in FACTS.items()]})
    test = Dataset.from_dict({"messages": [qa(k, v) for k, v in REFERENCE_ONLY.items()]})
    new_train, _ = augment_split(cfg, tokenizer, train, test, state_dir=str(tmp_path))
    targets = [c[-1]["content"] for c in new_train["messages"]]
    assert len(targets) == rows and targets.count(cfg.rag.decline_text) == 2  # 2 of 5 declined either way
