"""`fedtune eval --generate`: answers per variant and client, scores per client and pooled, on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.errors import FedtuneError
from fedtune.eval.generate import Sampling
from fedtune.eval.generation import (
    Example,
    answer_rows,
    evaluate_generation,
    held_out_examples,
    read_answers,
    summarise,
)
from fedtune.rundir import RunDir
from helpers import run_cli


def test_held_out_examples_take_the_last_answer_as_reference() -> None:
    convs = [
        [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}],
        [{"role": "user", "content": "only a question"}],
        [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
    ]
    got = held_out_examples(convs, client=1, limit=None)
    assert [(e.index, e.reference) for e in got] == [(0, "a1"), (2, "a2")]
    assert got[0].prompt == [{"role": "user", "content": "q1"}]
    assert len(held_out_examples(convs, client=1, limit=1)) == 1
    assert got[0].id == Example(5, 9, [{"role": "user", "content": "q1"}], "x").id  # the prompt decides


def test_answer_rows_pair_examples_with_answers_by_position() -> None:
    q = [{"role": "user", "content": "q"}]
    plain = Example(3, 7, q, "ref")
    rag = Example(4, 1, [{"role": "user", "content": "evidence + q"}], "ref2", question=q)
    rows = answer_rows("adapter", [plain, rag], ["a1", "a2"])
    assert [(r["variant"], r["client"], r["index"], r["answer"]) for r in rows] == [
        ("adapter", 3, 7, "a1"),
        ("adapter", 4, 1, "a2"),
    ]
    assert rows[0]["question"] == q  # no retrieval: the question is the prompt
    assert rows[1]["question"] == q and rows[1]["prompt"] != q  # RAG: the question before the evidence
    assert rows[0]["id"] == rows[1]["id"] == plain.id  # the same question, the same id
    with pytest.raises(ValueError):
        answer_rows("adapter", [plain], ["a1", "a2"])  # one answer too many


def test_summarise_per_client_and_union() -> None:
    rows = [
        {"variant": "adapter", "client": 0, "reference": "yes", "answer": "yes"},
        {"variant": "adapter", "client": 1, "reference": "no", "answer": "maybe"},
        {"variant": "adapter", "client": 1, "reference": "up", "answer": "up"},
    ]
    out = summarise(rows)["adapter"]
    assert out["clients"]["0"]["exact_match"] == 1.0
    assert out["clients"]["1"]["exact_match"] == 0.5
    assert out["union"]["exact_match"] == pytest.approx(2 / 3)  # pooled over examples, not clients
    assert out["union"]["n"] == 3


def test_evaluate_generation_writes_both_files(tiny_run: RunDir) -> None:
    result = evaluate_generation(tiny_run.path, Sampling(max_new_tokens=4, batch_size=2), limit=2)
    assert set(result["variants"]) == {"base", "adapter"}  # not an FF-LoRA run: no personal variant
    on_disk = json.loads(tiny_run.generation_file.read_text())
    assert on_disk == result
    rows = [json.loads(line) for line in tiny_run.answers_file.read_text().splitlines()]
    clients = {r["client"] for r in rows}
    assert clients == {0, 1, 2}
    assert len(rows) == 2 * len(clients) * 2  # variants x clients x limit
    assert result["variants"]["adapter"]["union"]["n"] == 6
    base = [(r["id"], r["reference"]) for r in rows if r["variant"] == "base"]
    assert base == [(r["id"], r["reference"]) for r in rows if r["variant"] == "adapter"]  # same questions
    assert len(read_answers(tiny_run.path, "adapter")) == 6
    with pytest.raises(FedtuneError, match="no answers of variant 'personal'"):
        read_answers(tiny_run.path, "personal")


def test_eval_command_generates_and_prints(capsys, tiny_run: RunDir) -> None:
    code, out, err = run_cli(
        capsys, "eval", str(tiny_run.path), "--no-loss", "--generate", "--limit", "1", "--max-new-tokens", "3"
    )
    assert code == 0, err
    assert "ROUGE-L" in out and "union" in out
    assert tiny_run.generation_file.is_file()


def test_eval_refreshes_an_existing_report(capsys, tiny_run: RunDir) -> None:
    from fedtune.report import write_report

    server = {"round": 1, "phase": "server", "client": None, "train_loss": 2.0, "eval_loss": 1.9}
    (tiny_run.path / "metrics.jsonl").write_text(json.dumps(server) + "\n", encoding="utf-8")
    page = write_report(tiny_run.path)
    assert "Generation metrics" not in page.read_text()
    code, out, err = run_cli(
        capsys, "eval", str(tiny_run.path), "--no-loss", "--generate", "--limit", "1", "--max-new-tokens", "2"
    )
    assert code == 0, err
    assert "report:" in out
    assert "Generation metrics" in page.read_text() and "ROUGE-L" in page.read_text()


def test_eval_without_an_adapter_is_a_clear_error(capsys, tiny_run: RunDir) -> None:
    import shutil

    shutil.rmtree(tiny_run.path / "final")
    shutil.rmtree(tiny_run.path / "rounds" / "0001")
    code, _, err = run_cli(capsys, "eval", str(tiny_run.path), "--no-loss", "--generate")
    assert code == 2
    assert "error" in err
    assert not Path(tiny_run.generation_file).exists()


def test_fflora_rag_run_adds_personal_answers_with_evidence(tmp_path: Path) -> None:
    import torch

    from fedtune.models.adapters import initial_adapter_state, save_adapter_folder
    from helpers import finished_tiny_run

    run = finished_tiny_run(tmp_path, config="configs/rag-tiny.toml")[0]
    cfg = run.config()
    for pid in (0, 1):
        personal = initial_adapter_state(cfg.model, seed=3 + pid)
        personal = {k: v if "lora_A" in k else torch.full_like(v, 0.2) for k, v in personal.items()}
        save_adapter_folder(personal, cfg.model.lora, cfg.model, run.clients_dir / str(pid) / "personal-0001")

    result = evaluate_generation(run.path, Sampling(max_new_tokens=3), limit=1)

    assert list(result["variants"]) == ["base", "adapter", "personal"]
    assert result["variants"]["personal"]["union"]["n"] == 2  # 2 clients x 1 example
    rows = [json.loads(line) for line in run.answers_file.read_text().splitlines()]
    assert all(r["prompt"][-1]["content"].startswith("Evidence:") for r in rows)  # retrieved as in training
    assert all(not r["question"][-1]["content"].startswith("Evidence:") for r in rows)  # for the judge


def test_fflora_run_without_personal_adapters_fails_before_generating(tmp_path: Path) -> None:
    from helpers import finished_tiny_run

    run = finished_tiny_run(tmp_path, "fed.strategy='fflora'", "model.lora.personal_r=4")[0]
    with pytest.raises(FedtuneError, match=r"no personal adapter of client 0.*--no-personal"):
        evaluate_generation(run.path, Sampling(max_new_tokens=2), limit=1)
    assert not run.answers_file.exists()


def test_no_personal_generates_the_other_variants_of_an_fflora_run(capsys, tmp_path: Path) -> None:
    from helpers import finished_tiny_run, run_cli

    run = finished_tiny_run(tmp_path, "fed.strategy='fflora'", "model.lora.personal_r=4")[0]
    args = ["eval", str(run.path), "--no-loss", "--generate", "--max-new-tokens", "2", "--limit", "1"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "--no-personal" in err
    code, _, err = run_cli(capsys, *args, "--no-personal")
    assert code == 0, err
    assert list(json.loads(run.generation_file.read_text())["variants"]) == ["base", "adapter"]
