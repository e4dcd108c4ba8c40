"""Hand-written ``eval/answers.jsonl`` rows, for judge tests that need no generation."""

from __future__ import annotations

import json

from fedtune.rundir import RunDir


def write_answers(run: RunDir, answers: list[str], variant: str = "adapter") -> None:
    rows = [
        {
            "variant": variant,
            "client": i % 2,
            "index": i,
            "id": f"q{i}",
            "prompt": [{"role": "user", "content": f"question {i}?"}],
            "reference": f"reference {i}",
            "answer": a,
        }
        for i, a in enumerate(answers)
    ]
    run.eval_dir.mkdir(exist_ok=True)
    run.answers_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
