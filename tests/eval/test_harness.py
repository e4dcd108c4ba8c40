"""`fedtune eval --tasks`: lm-eval on base and adapter with fedtune's shipped wiki task, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.errors import FedtuneError
from fedtune.eval.harness import TASKS_DIR, _absolute_data_files, summary_rows, task_specs
from fedtune.eval.taskdata import WIKI_GEN, WIKI_MC, jsonl, wiki_gen_records, wiki_mc_records
from fedtune.rundir import RunDir
from helpers import run_cli


def test_shipped_task_data_is_what_taskdata_builds() -> None:
    assert WIKI_MC.read_text(encoding="utf-8") == jsonl(wiki_mc_records())
    first = wiki_mc_records()[0]
    assert len(first["choices"]) == 4 and 0 <= first["label"] < 4
    assert WIKI_GEN.read_text(encoding="utf-8") == jsonl(wiki_gen_records())
    gen = wiki_gen_records()[0]
    title = gen["question"].removeprefix("What is ").removesuffix("?")
    assert gen["answer"].startswith(title.split()[0])  # the article's own first sentence


def test_relative_data_files_are_read_beside_the_yaml() -> None:
    folder = Path("/tasks")
    got = _absolute_data_files({"test": "a.jsonl", "train": ["/abs/b.jsonl", "c.jsonl"]}, folder)
    assert got == {"test": "/tasks/a.jsonl", "train": ["/abs/b.jsonl", "/tasks/c.jsonl"]}
    _, specs = task_specs(["fedtune_wiki_mc"], TASKS_DIR)
    assert specs[0]["dataset_kwargs"]["data_files"] == {"test": str(WIKI_MC)}


@pytest.mark.integration  # indexes lm-eval's own tasks (seconds)
def test_unknown_task_names_it() -> None:
    with pytest.raises(FedtuneError, match=r"unknown lm-eval task.*no_such_task_xyz"):
        task_specs(["no_such_task_xyz"], TASKS_DIR)


def test_summary_rows_pair_base_and_adapter() -> None:
    results = {
        "adapter": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 4}},
        "base": {"t": {"alias": "t", "acc,none": 0.25, "acc_stderr,none": 0.1, "sample_len": 4}},
    }
    assert summary_rows(results) == [{"task": "t", "metric": "acc,none", "base": 0.25, "adapter": 0.5}]


def _eval_task(capsys, run: RunDir, task: str, limit: int) -> tuple[dict, str]:
    """``fedtune eval RUN --no-loss --tasks TASK --limit N``: (lm_eval.json, stdout); exit 0 asserted."""
    args = ("--no-loss", "--tasks", task, "--limit", str(limit))
    code, out, err = run_cli(capsys, "eval", str(run.path), *args)
    assert code == 0, err
    return json.loads(run.lm_eval_file.read_text()), out


def test_eval_tasks_on_tiny_llama(capsys, tiny_run: RunDir) -> None:
    doc, out = _eval_task(capsys, tiny_run, "fedtune_wiki_mc", 4)
    for variant in ("base", "adapter"):
        res = doc["results"][variant]["fedtune_wiki_mc"]
        assert res["sample_len"] == 4  # --limit examples were run
        assert res["acc,none"] in {0.0, 0.25, 0.5, 0.75, 1.0}  # a mean over 4 examples
    assert "fedtune_wiki_mc" in out


def test_the_generation_task_scores_free_text_answers_by_bleu_and_chrf(capsys, tiny_run: RunDir) -> None:
    doc, _ = _eval_task(capsys, tiny_run, "fedtune_wiki_gen", 2)
    for variant in ("base", "adapter"):
        res = doc["results"][variant]["fedtune_wiki_gen"]
        assert res["sample_len"] == 2
        assert 0 <= res["bleu,none"] <= 100 and 0 <= res["chrf,none"] <= 100
    assert {r["metric"] for r in doc["summary"]} == {"bleu,none", "chrf,none"}


@pytest.mark.integration  # indexes lm-eval's own tasks (seconds)
def test_eval_unknown_task_exits_non_zero(capsys, tiny_run: RunDir) -> None:
    code, out, err = run_cli(capsys, "eval", str(tiny_run.path), "--tasks", "nope_task_42")
    assert code == 2
    assert "nope_task_42" in err
    assert "held-out loss" not in out  # checked before the loss evaluation, not after
    assert not tiny_run.lm_eval_file.exists()


def test_adapter_off_switches_lm_evals_model_to_the_base(tiny_run: RunDir) -> None:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from fedtune.eval.generate import adapter_off
    from fedtune.inference import load_run

    loaded = load_run(tiny_run.path)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1)
    req = [Instance("loglikelihood", doc={}, arguments=("Question: What is X?\nAnswer:", " a thing"), idx=0)]
    tuned = lm.loglikelihood(req)[0][0]
    with adapter_off(loaded.model, True):
        base = lm.loglikelihood(req)[0][0]
    assert base != tuned
    assert lm.loglikelihood(req)[0][0] == tuned  # the adapter is back on after the block


def test_a_task_whose_data_is_missing_is_a_clear_error(capsys, tiny_run: RunDir, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    yaml = (TASKS_DIR / "fedtune_wiki_mc.yaml").read_text().replace("fedtune_wiki_mc", "my_mc")
    (tasks / "my_mc.yaml").write_text(yaml.replace("wiki_mc.jsonl", "missing.jsonl"))
    code, _, err = run_cli(
        capsys, "eval", str(tiny_run.path), "--no-loss", "--tasks", "my_mc", "--include-path", str(tasks)
    )
    assert code == 2
    assert "my_mc" in err and "could not be loaded" in err
    assert not tiny_run.lm_eval_file.exists()
