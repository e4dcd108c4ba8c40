"""LLM-as-judge over a run's saved answers (``fedtune judge``; docs/evaluation.md).

Single-answer grading, MT-Bench style: the judge explains, then rates 1-10 as
``Rating: [[N]]``; the rationale is kept. Pairwise comparison, FedIT's protocol (federated vs
local-only): two runs' answers to the same questions (matched by the prompt's id), asked in
both orders; a win needs the same winner in both orders, any other pair of verdicts is a tie
(counted as inconsistent too). A judge answer without a score or verdict is counted as
malformed, a request that failed after its retries as failed; neither stops the others.

With ``follow_up`` (``fedtune judge --follow-up``), a reply that holds no score or verdict is
continued once: the judge's own reply, then ``Rating: [[`` (or ``Verdict: [[``), is sent back
as the begun assistant message for the endpoint to go on writing (a continuation, see
:mod:`.judge_client`), a few tokens long. A small judge that explains well but forgets the
format then still states its grade after its own explanation; such items are marked
``followed_up`` and counted apart. It needs an endpoint that continues a final assistant message
(fedtune serve, vLLM); OpenAI's own API does not.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedtune.data.types import Conversation
from fedtune.errors import FedtuneError
from fedtune.eval.generation import Answer, read_answers
from fedtune.eval.judge_client import JudgeClient, Messages, Reply
from fedtune.io import write_text_atomic
from fedtune.rundir import RunDir

SYSTEM = "You are a helpful assistant."
CRITERIA = "helpfulness, relevance, accuracy, depth and level of detail"
SINGLE = (
    "[Instruction]\n"
    "Act as an impartial judge and rate the quality of the AI assistant's answer to the user "
    "question below. Consider {criteria}.{reference_note} Begin with a short, objective "
    "explanation. Then rate the answer from 1 to 10, written exactly in this format: "
    '"Rating: [[N]]", for example "Rating: [[6]]".\n\n'
    "[Question]\n{question}\n\n{reference}"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
PAIR = (
    "[Instruction]\n"
    "Act as an impartial judge and compare the answers of two AI assistants to the user "
    "question below. Consider {criteria}.{reference_note} Neither the order in which the "
    "answers appear nor their length may influence you. Begin with a short, objective "
    'comparison. Then give your verdict, written exactly as "[[A]]" if assistant A is '
    'better, "[[B]]" if assistant B is better, or "[[C]]" for a tie.\n\n'
    "[Question]\n{question}\n\n{reference}"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
REFERENCE_NOTE = " A correct reference answer is given: judge correctness against it."
REFERENCE = "[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"

RATING_LEAD = "\n\nRating: [["
VERDICT_LEAD = "\n\nVerdict: [["
FOLLOW_UP_TOKENS = 8

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_rating(text: str) -> float | None:
    """The last ``[[N]]`` in ``text`` when 1 <= N <= 10, else None (malformed)."""
    found = _RATING.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if 1.0 <= value <= 10.0 else None


def parse_verdict(text: str) -> str | None:
    """The last ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie) in ``text``, else None (malformed)."""
    found = _VERDICT.findall(text)
    return found[-1] if found else None


def question_text(prompt: Conversation) -> str:
    """The question a judge sees: the user's turn, or a multi-turn prompt as ``User:/Assistant:`` lines."""
    turns = [m for m in prompt if m["role"] != "system"]
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in turns)


def _ref(reference: str | None) -> dict[str, str]:
    if not reference:
        return {"reference_note": "", "reference": ""}
    return {"reference_note": REFERENCE_NOTE, "reference": REFERENCE.format(reference=reference)}


def single_prompt(question: str, answer: str, reference: str | None) -> Messages:
    """The messages that ask for one answer's rating."""
    user = SINGLE.format(criteria=CRITERIA, question=question, answer=answer, **_ref(reference))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def pair_prompt(question: str, answer_a: str, answer_b: str, reference: str | None) -> Messages:
    """The messages that ask which of two answers is better (A first)."""
    user = PAIR.format(
        criteria=CRITERIA, question=question, answer_a=answer_a, answer_b=answer_b, **_ref(reference)
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def combine(first: str, second: str) -> str:
    """One question's outcome for "ours" from the verdict with ours as A, then with ours as B.

    ``win`` / ``loss`` when both orders agree, ``tie`` when both say tie, else ``inconsistent``
    (scored as a tie).
    """
    ours_first = {"A": "win", "B": "loss", "C": "tie"}[first]
    ours_second = {"B": "win", "A": "loss", "C": "tie"}[second]
    return ours_first if ours_first == ours_second else "inconsistent"


def _judged(
    client: JudgeClient,
    prompts: list[Messages],
    parse: Callable[[str], Any],
    *,
    concurrency: int,
    lead: str | None,
) -> tuple[list[Reply], list[Any], dict[int, Reply]]:
    """The replies, each one's parsed score or verdict, and the follow-ups asked (by index).

    ``lead``: follow a reply with text and nothing parsed up with the reply + ``lead``
    continued (None: no follow-up); the continuation is parsed after the lead's ``[[``.
    """
    replies = client.ask_many(prompts, concurrency)
    _check_failures(replies, client.endpoint.url)
    values = [parse(r.content) if r.content is not None else None for r in replies]
    todo = [i for i, (r, v) in enumerate(zip(replies, values, strict=True)) if v is None and r.content]
    if lead is None or not todo:
        return replies, values, {}
    asks = [
        [*prompts[i], {"role": "assistant", "content": (replies[i].content or "").rstrip() + lead}]
        for i in todo
    ]
    more = client.ask_many(asks, concurrency, max_tokens=FOLLOW_UP_TOKENS, continuation=True)
    for i, reply in zip(todo, more, strict=True):
        values[i] = parse("[[" + reply.content) if reply.content is not None else None
    return replies, values, dict(zip(todo, more, strict=True))


def _check_failures(replies: Sequence[Reply], url: str) -> None:
    failed = [r for r in replies if r.content is None]
    if replies and len(failed) == len(replies):
        raise FedtuneError(
            f"judge endpoint {url}: all {len(replies)} requests failed; last: {failed[-1].error}"
        )


def _counts(replies: Sequence[Reply]) -> dict[str, int]:
    return {
        "requests": len(replies),
        "failed": sum(r.content is None for r in replies),
        "cached": sum(r.cached for r in replies),
    }


def grade(
    client: JudgeClient,
    answers: Sequence[Answer],
    *,
    concurrency: int = 4,
    reference: bool = True,
    follow_up: bool = False,
) -> dict[str, Any]:
    """Rate every answer; ``{"counts", "mean_score", "per_client", "items"}``."""
    prompts = [
        single_prompt(
            question_text(a.get("question") or a["prompt"]),
            a["answer"],
            a["reference"] if reference else None,
        )
        for a in answers
    ]
    lead = RATING_LEAD if follow_up else None
    replies, scores, extra = _judged(client, prompts, parse_rating, concurrency=concurrency, lead=lead)
    items = []
    for i, (a, r, score) in enumerate(zip(answers, replies, scores, strict=True)):
        item = {"id": a["id"], "client": a["client"], "index": a["index"], "score": score}
        items.append(item | {"rationale": r.content, "error": r.error})
        if i in extra:
            items[-1]["followed_up"] = extra[i].content
    scored = [i for i in items if i["score"] is not None]
    per_client: dict[str, dict[str, float]] = {}
    for c in sorted({i["client"] for i in scored}):
        mine = [i["score"] for i in scored if i["client"] == c]
        per_client[str(c)] = {"n": len(mine), "mean_score": sum(mine) / len(mine)}
    counts = _counts(replies) | {
        "graded": len(scored),
        "malformed": sum(i["score"] is None and i["rationale"] is not None for i in items),
        "followed_up": len(extra),
        "graded_after_follow_up": sum(i["score"] is not None for i in items if "followed_up" in i),
    }
    mean = sum(i["score"] for i in scored) / len(scored) if scored else None
    return {"counts": counts, "mean_score": mean, "per_client": per_client, "items": items}


def compare(
    client: JudgeClient,
    ours: Sequence[Answer],
    theirs: Sequence[Answer],
    *,
    concurrency: int = 4,
    reference: bool = True,
    follow_up: bool = False,
) -> dict[str, Any]:
    """Pairwise verdicts on the questions both sets answered, both orders asked."""
    by_id = {a["id"]: a for a in theirs}
    pairs = [(a, by_id[a["id"]]) for a in ours if a["id"] in by_id]
    if not pairs:
        raise FedtuneError("the two runs' answers share no question (answers are matched by prompt)")
    prompts = []
    for a, b in pairs:
        q, ref = question_text(a.get("question") or a["prompt"]), a["reference"] if reference else None
        prompts += [
            pair_prompt(q, a["answer"], b["answer"], ref),
            pair_prompt(q, b["answer"], a["answer"], ref),
        ]
    lead = VERDICT_LEAD if follow_up else None
    replies, verdicts, extra = _judged(client, prompts, parse_verdict, concurrency=concurrency, lead=lead)
    items = []
    tally = dict.fromkeys(("win", "loss", "tie", "inconsistent", "malformed", "failed"), 0)
    for k, (a, _) in enumerate(pairs):
        r1, r2 = replies[2 * k], replies[2 * k + 1]
        v1, v2 = verdicts[2 * k], verdicts[2 * k + 1]
        if r1.content is None or r2.content is None:
            outcome = "failed"
        elif v1 is None or v2 is None:
            outcome = "malformed"
        else:
            outcome = combine(v1, v2)
        tally[outcome] += 1
        items.append(
            {
                "id": a["id"],
                "client": a["client"],
                "outcome": outcome,
                "verdicts": [v1, v2],
                "judgments": [r1.content, r2.content],
                "errors": [r1.error, r2.error],
            }
        )
        if 2 * k in extra or 2 * k + 1 in extra:
            items[-1]["followed_up"] = [
                e.content if (e := extra.get(j)) else None for j in (2 * k, 2 * k + 1)
            ]
    decided = tally["win"] + tally["loss"] + tally["tie"] + tally["inconsistent"]
    ties = tally["tie"] + tally["inconsistent"]
    win_rate = (tally["win"] + 0.5 * ties) / decided if decided else None
    counts = _counts(replies) | {"questions": len(pairs), "followed_up": len(extra)} | tally
    return {"counts": counts, "win_rate": win_rate, "items": items}


def judge_run(
    client: JudgeClient,
    run_dir: str | Path,
    *,
    against: str | Path | None = None,
    variant: str = "adapter",
    against_variant: str = "adapter",
    limit: int | None = None,
    concurrency: int = 4,
    reference: bool = True,
    follow_up: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Grade ``run_dir``'s answers, or compare them with ``against``'s; write and return the file."""
    run = RunDir.open(run_dir)
    ours = read_answers(run.path, variant)[:limit]
    head: dict[str, Any] = {"run": str(run.path), "variant": variant}
    head["judge"] = {"base_url": client.endpoint.base_url, "model": client.endpoint.model}
    if against is None:
        result = head | grade(client, ours, concurrency=concurrency, reference=reference, follow_up=follow_up)
        path = run.judge_single_file
    else:
        theirs = read_answers(against, against_variant)
        head |= {"against": str(RunDir.open(against).path), "against_variant": against_variant}
        result = head | compare(
            client, ours, theirs, concurrency=concurrency, reference=reference, follow_up=follow_up
        )
        path = run.judge_vs_file(against)
    write_text_atomic(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return path, result
