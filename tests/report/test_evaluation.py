"""The report shows what fedtune eval / judge wrote, and only that."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.report import write_report
from fedtune.report.evaluation import eval_sections


def test_no_eval_files_no_sections(tmp_path: Path) -> None:
    assert eval_sections(tmp_path) == ""


def test_sections_from_eval_files(run_dir: Path) -> None:
    (run_dir / "eval").mkdir()
    scores = {"n": 2, "rouge_l": 0.25, "bleu": 12.5, "exact_match": 0.5}
    gen = {
        "sampling": {"sample": False, "max_new_tokens": 8},
        "limit": 2,
        "variants": {"adapter": {"clients": {"0": scores}, "union": scores}},
    }
    (run_dir / "eval" / "generation.json").write_text(json.dumps(gen))
    lm = {"summary": [{"task": "fedtune_wiki_mc", "metric": "acc,none", "base": 0.25, "adapter": 0.5}]}
    (run_dir / "eval" / "lm_eval.json").write_text(json.dumps(lm))
    judge = {"judge": {"model": "m", "base_url": "u"}, "variant": "adapter", "mean_score": 6.5, "counts": {}}
    (run_dir / "eval" / "judge-single.json").write_text(json.dumps(judge))
    (run_dir / "eval" / "judge-vs-local.json").write_text("{broken")

    text = write_report(run_dir).read_text(encoding="utf-8")

    assert "<h2>Generation metrics</h2>" in text
    row = "".join(f'<td class="num">{c}</td>' for c in ("union", "2", "0.2500", "12.50", "0.5000"))
    assert row in text
    assert '<td class="num">0.2500</td><td class="num">0.5000</td></tr>' in text  # base, adapter
    assert "mean score 6.50 / 10 (adapter)" in text
    assert "judge-vs-local.json: not valid JSON" in text
