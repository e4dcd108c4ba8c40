"""The report's evaluation sections: what ``fedtune eval`` and ``fedtune judge`` wrote in ``eval/``.

Each section appears only when its file exists; a file that is not valid JSON is shown as
such rather than failing the whole report.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from fedtune.rundir import JUDGE_VS, RunDir


def _read(path: Path) -> dict[str, Any] | str | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        return f"{path.name}: not valid JSON ({err.msg})"
    return doc if isinstance(doc, dict) else f"{path.name}: not a JSON object"


def _num(value: object, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "\n".join(
        "<tr>" + "".join(f'<td class="num">{html.escape(c)}</td>' for c in row) + "</tr>" for row in rows
    )
    return f"<table>\n<thead><tr>{th}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _generation(doc: dict[str, Any]) -> str:
    rows = []
    for variant, res in doc.get("variants", {}).items():
        for client, s in [*res.get("clients", {}).items(), ("union", res.get("union", {}))]:
            rows.append(
                [
                    variant,
                    str(client),
                    str(s.get("n", "-")),
                    _num(s.get("rouge_l"), ".4f"),
                    _num(s.get("bleu"), ".2f"),
                    _num(s.get("exact_match"), ".4f"),
                ]
            )
    s = doc.get("sampling", {})
    how = "sampled" if s.get("sample") else "greedy"
    note = f"<p>{how}, max {s.get('max_new_tokens')} new tokens, limit {doc.get('limit')} per client</p>"
    return note + _table(["variant", "client", "n", "ROUGE-L", "BLEU", "exact match"], rows)


def _lm_eval(doc: dict[str, Any]) -> str:
    rows = [
        [str(r["task"]), str(r["metric"]), _num(r.get("base"), ".4f"), _num(r.get("adapter"), ".4f")]
        for r in doc.get("summary", [])
    ]
    return _table(["task", "metric", "base", "adapter"], rows)


def _judge(doc: dict[str, Any]) -> str:
    judge = doc.get("judge", {})
    counts = ", ".join(f"{k} {v}" for k, v in doc.get("counts", {}).items())
    who = f"judge {html.escape(str(judge.get('model')))} at {html.escape(str(judge.get('base_url')))}"
    if "against" in doc:
        what = f"win rate vs {html.escape(str(doc['against']))}: {_num(doc.get('win_rate'), '.3f')}"
    else:
        what = (
            f"mean score {_num(doc.get('mean_score'), '.2f')} / 10 ({html.escape(str(doc.get('variant')))})"
        )
    return f"<p>{what}; {who}; {html.escape(counts)}</p>"


def eval_sections(run_dir: Path | str) -> str:
    """HTML for the evaluation files of ``run_dir`` (empty when there are none)."""
    run = RunDir(run_dir)
    parts = []
    judges = [run.judge_single_file, *sorted(run.eval_dir.glob(f"{JUDGE_VS}*.json"))]
    for title, path, render in [
        ("Generation metrics", run.generation_file, _generation),
        ("lm-evaluation-harness", run.lm_eval_file, _lm_eval),
        *[("LLM-as-judge", p, _judge) for p in judges],
    ]:
        doc = _read(path)
        if doc is None:
            continue
        body = f"<p>{html.escape(doc)}</p>" if isinstance(doc, str) else render(doc)
        parts.append(f"<h2>{title}</h2>\n{body}")
    return "\n".join(parts)
