"""Generation metrics of a run: answers on every client's held-out split, scored per client and pooled.

Variants: ``base`` (the adapter disabled), ``adapter`` (the run's final global adapter) and,
for FF-LoRA runs, ``personal`` (each client's global + personal adapter, fused as the client
uses it). RAG runs answer with evidence in front of each question, retrieved as in training
(:func:`fedtune.data.pipeline.client_examples`). Writes ``eval/answers.jsonl`` and
``eval/generation.json`` (docs/evaluation.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedtune.config import Config
from fedtune.data.pipeline import client_conversations, client_examples, partitions
from fedtune.data.tokenize import build_generation_input
from fedtune.data.types import Conversation
from fedtune.errors import FedtuneError
from fedtune.eval.generate import Sampling, adapter_off, generate_batched
from fedtune.eval.metrics import score
from fedtune.inference import Loaded, load_run
from fedtune.io import write_text_atomic
from fedtune.models.adapters import check_adapter_folder
from fedtune.rundir import RunDir

log = logging.getLogger(__name__)

Answer = dict[
    str, Any
]  # a line of answers.jsonl: variant, client, index, id, prompt, question, reference, answer


@dataclass(frozen=True)
class Example:
    """One held-out example: the conversation up to its last answer, and that answer.

    ``question`` is the prompt before retrieval put evidence in (RAG runs; else ``prompt``).
    """

    client: int
    index: int
    prompt: Conversation
    reference: str
    question: Conversation | None = None

    @property
    def id(self) -> str:
        """The question's digest: the same question has the same id in every run (pairwise judging)."""
        text = json.dumps(self.question or self.prompt, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def held_out_examples(
    conversations: Sequence[Conversation],
    client: int,
    limit: int | None,
    originals: Sequence[Conversation] | None = None,
) -> list[Example]:
    """The first ``limit`` conversations that end with an answer, as :class:`Example` s.

    ``originals``: the same conversations before retrieval (RAG runs), row for row.
    """
    out: list[Example] = []
    for i, conv in enumerate(conversations):
        if limit is not None and len(out) >= limit:
            break
        if len(conv) >= 2 and conv[-1]["role"] == "assistant":
            question = list(originals[i][:-1]) if originals is not None else None
            out.append(Example(client, i, list(conv[:-1]), conv[-1]["content"], question))
    return out


def client_held_out(cfg: Config, tokenizer: Any, pid: int, limit: int | None) -> list[Example]:
    """Client ``pid``'s held-out examples as the model sees them (with evidence in RAG runs)."""
    seen = list(client_examples(cfg, tokenizer, pid)[1]["messages"])
    originals = list(client_conversations(cfg, pid)[1]["messages"]) if cfg.rag.enabled else None
    return held_out_examples(seen, pid, limit, originals)


def answer(loaded: Loaded, examples: Sequence[Example], sampling: Sampling) -> list[str]:
    """The loaded model's answers to ``examples``, rendered with the run's template and limits."""
    cfg = loaded.cfg
    prompts = [
        build_generation_input(e.prompt, loaded.tokenizer, cfg.data.template, cfg.data.max_source_length)
        for e in examples
    ]
    assert loaded.model is not None
    return generate_batched(loaded.model, loaded.tokenizer, prompts, sampling)


def summarise(rows: Sequence[Answer]) -> dict[str, Any]:
    """Scores per variant: ``{variant: {"clients": {id: scores}, "union": scores}}``."""
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        clients = sorted({r["client"] for r in mine})
        per = {
            str(c): score(
                [r["reference"] for r in mine if r["client"] == c],
                [r["answer"] for r in mine if r["client"] == c],
            ).as_dict()
            for c in clients
        }
        union = score([r["reference"] for r in mine], [r["answer"] for r in mine]).as_dict()
        out[variant] = {"clients": per, "union": union}
    return out


def answer_rows(variant: str, examples: Sequence[Example], answers: Sequence[str]) -> list[Answer]:
    """``answers.jsonl`` lines of one variant: each example with its answer (paired by position)."""
    return [
        {
            "variant": variant,
            "client": e.client,
            "index": e.index,
            "id": e.id,
            "prompt": e.prompt,
            "question": e.question or e.prompt,
            "reference": e.reference,
            "answer": a,
        }
        for e, a in zip(examples, answers, strict=True)
    ]


def is_fflora(cfg: Config) -> bool:
    """Whether the run's clients keep personal adapters (the ``personal`` variant)."""
    return cfg.fed.strategy == "fflora"


def evaluate_generation(
    run_dir: str | Path, sampling: Sampling, *, limit: int | None = None, personal: bool = True
) -> dict[str, Any]:
    """Generate and score every variant on every client's held-out split; write the files.

    Returns ``generation.json``'s content. ``limit`` caps the examples per client;
    ``personal`` (FF-LoRA runs) adds the ``personal`` variant. A missing adapter folder (global
    or personal) fails before anything is generated.
    """
    run = RunDir.open(run_dir)
    tuned = load_run(run.path)
    cfg = tuned.cfg
    examples = {pid: client_held_out(cfg, tuned.tokenizer, pid, limit) for pid in range(len(partitions(cfg)))}
    rows: list[Answer] = []
    variants: list[tuple[str, Callable[[int], Loaded]]] = [
        ("base", lambda _: tuned),
        ("adapter", lambda _: tuned),
    ]
    if personal and is_fflora(cfg):
        for pid in examples:  # every personal adapter found before anything is generated
            try:
                check_adapter_folder(run.latest_personal(pid))
            except FedtuneError as err:
                raise FedtuneError(f"{err} (--no-personal: generate without the personal variant)") from None
        variants.append(("personal", lambda pid: load_run(run.path, client=pid)))
    for variant, loader in variants:
        for pid, exs in examples.items():
            log.info("generating: %s, client %d, %d examples", variant, pid, len(exs))
            loaded = loader(pid)
            with adapter_off(loaded.model, variant == "base"):
                answers = answer(loaded, exs, sampling)
            rows.extend(answer_rows(variant, exs, answers))
    result = {
        "run": str(run.path),
        "sampling": asdict(sampling),
        "limit": limit,
        "variants": summarise(rows),
    }
    write_text_atomic(run.answers_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_text_atomic(run.generation_file, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def read_answers(run_dir: str | Path, variant: str) -> list[Answer]:
    """``eval/answers.jsonl``'s rows of ``variant``; a FedtuneError when there are none."""
    run = RunDir.open(run_dir)
    path = run.answers_file
    if not path.is_file():
        raise FedtuneError(f"{path}: no answers yet; run `fedtune eval {run.path} --generate` first")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise FedtuneError(f"{path}:{n}: not JSON ({err.msg})") from None
        if row.get("variant") == variant:
            rows.append(row)
    if not rows:
        raise FedtuneError(f"{path}: no answers of variant {variant!r}")
    return rows
