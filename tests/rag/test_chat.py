"""``fedtune chat RUN --rag``: the training augmenter on each turn, and the passages it used shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import Config
from fedtune.errors import FedtuneError
from fedtune.models.load import load_tokenizer
from fedtune.rag.augment import HEADER, Evidence
from fedtune.rag.chat import SHOWN_CHARS, chat_retrieval, describe, describe_all
from fedtune.rundir import RunDir
from helpers import finished_tiny_run, run_cli

PRIME = "A prime number has exactly two divisors: one and the number itself, such as 2, 3, 5 and 7."


def _run(tmp_path: Path, config: str = "configs/rag-tiny.toml") -> tuple[RunDir, Config]:
    """A run directory of ``config`` with a final adapter (non-zero B), as a finished run leaves it."""
    return finished_tiny_run(tmp_path / "runs", config=config)  # type: ignore[no-any-return]


def _notes(tmp_path: Path) -> Path:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "primes.md").write_text(PRIME)
    (notes / "cats.md").write_text("Cats sleep for most of the day and hunt at dusk.")
    return notes


def test_a_turn_gets_case_and_reference_evidence_fitted_as_in_training(tmp_path: Path) -> None:
    _, cfg = _run(tmp_path)
    tokenizer = load_tokenizer(cfg.model)
    chat = chat_retrieval(cfg, tokenizer, case_source=str(_notes(tmp_path)))
    history = [{"role": "user", "content": "What is a prime number?"}]
    sent, used = chat.augment(history)
    assert history == [{"role": "user", "content": "What is a prime number?"}]  # the history is not changed
    assert used[0].origin == "case" and used[0].source == "primes.md"  # the one sharing its words
    assert {e.origin for e in used} == {"case", "reference"}  # both bases, queried apart
    assert all(e.source.startswith("wiki:") for e in used if e.origin == "reference")
    prompt = sent[-1]["content"]
    assert prompt.startswith(f"{HEADER}\n[case 1] ") and prompt.endswith(
        "\n\nQuestion: What is a prime number?"
    )
    assert "[reference 1] " in prompt
    assert chat.budget.source_tokens(sent) <= cfg.data.max_source_length  # fitted to data.max_source_length


def test_used_passages_are_described_by_origin_id_source_and_their_start() -> None:
    long = Evidence("reference", "wiki:Prime number", "wiki:Prime number", "word " * 40)
    line = describe(long, 1)
    assert line.startswith("[reference 1] wiki:Prime number (wiki:Prime number): word word")
    assert len(line.split("): ", 1)[1]) == SHOWN_CHARS and line.endswith("…")
    both = [
        Evidence("case", "a", "a.md", "x"),
        Evidence("reference", "b", "b", "y"),
        Evidence("case", "c", "c", "z"),
    ]
    assert [x.split("]")[0] for x in describe_all(both)] == ["[case 1", "[reference 1", "[case 2"]


def test_chat_command_shows_the_passages_before_each_answer(capsys, tmp_path: Path) -> None:
    run, _ = _run(tmp_path)
    code, out, err = run_cli(
        capsys,
        "chat",
        str(run.path),
        "--rag",
        "--case-base",
        str(_notes(tmp_path)),
        "--prompt",
        "What is a prime number?",
        "--prompt",
        "And a cat?",
        "--max-new-tokens",
        "3",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert "evidence> [case 1] primes.md (primes.md): A prime number has exactly two" in out
    assert any(x.startswith("evidence> [reference 1] wiki:") for x in lines)
    models = [i for i, x in enumerate(lines) if x.startswith("model>")]
    evidence = [i for i, x in enumerate(lines) if x.startswith("evidence>")]
    assert len(models) == 2 and evidence[0] < models[0] < evidence[-1] < models[1]  # before each answer
    assert "evidence> [case 1] cats.md" in out  # the second turn retrieves for its own question


def test_rag_needs_something_to_retrieve_from_and_case_base_needs_rag(capsys, tmp_path: Path) -> None:
    plain, cfg = _run(tmp_path, "configs/tiny.toml")  # no rag.reference
    with pytest.raises(FedtuneError, match="nothing to retrieve from"):
        chat_retrieval(cfg, load_tokenizer(cfg.model))
    code, _, err = run_cli(capsys, "chat", str(plain.path), "--rag", "--prompt", "hi")
    assert code == 2 and "nothing to retrieve from" in err
    code, _, err = run_cli(capsys, "chat", str(plain.path), "--case-base", str(tmp_path), "--prompt", "hi")
    assert code == 2 and "--case-base needs --rag" in err
    code, _, err = run_cli(
        capsys,
        "chat",
        str(plain.path),
        "--rag",
        "--case-base",
        str(tmp_path / "none.jsonl"),
        "--prompt",
        "hi",
    )
    assert code == 2 and "none.jsonl: no such file" in err
