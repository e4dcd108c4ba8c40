"""The FedIT table, judged: held-out loss, ROUGE-L / BLEU and an LLM judge per method.

Methods (bench/quality.py's, at its step budget and settings; one seed): ``base``, ``local``
(each client's own adapter), ``fedavg`` (FedAvg with server step size K), ``fflora`` (each
client's global + personal adapter, fused) and ``centralised``. While a method's adapter is
active after its held-out loss (quality.py's ``visit`` hook), it answers the first
``--questions`` held-out questions of every client (a per-client model only its own client's),
greedily, in batches (``fedtune.eval.generation.answer``), the same questions for every method.
The answers are scored against the held-out references (``fedtune.eval.metrics``: ROUGE-L F1,
corpus BLEU) and judged with ``fedtune.eval.judge``: single-answer 1-10 grades of every method,
and pairwise FedAvg vs local-only (FedIT's protocol) and FedAvg vs base, each question asked in
both orders, the reference answer shown to the judge (as ``fedtune judge`` does by default).

The judge: by default ``fedtune serve`` started here on 127.0.0.1 (a free port) over a run
directory of the same config, model id ``base``: SmolLM2 itself, without adapter, with
``--max-prompt-tokens`` at ``--judge-context`` (the demo run's own ``data.max_source_length``,
128, is shorter than a judge prompt). The server is stopped by its PID when the judging ends or
fails. ``--follow-up`` (on by default) continues a reply that holds no score or verdict from
``Rating: [[`` / ``Verdict: [[`` (``fedtune judge --follow-up``; SmolLM2-135M never writes the
format by itself). ``--base-url`` and ``--model`` use any OpenAI-compatible endpoint instead
(the key from ``--api-key-env``, as ``fedtune judge`` reads it; ``--no-follow-up`` for one that
cannot continue a message, such as OpenAI's own); nothing is started then.

``--answers DIR`` judges the ``answers.jsonl`` an earlier run wrote to ``DIR`` instead of
training (no loss columns then): the same answers, another judge.

Usage: python bench/fedit_judge.py [--questions 4] [--rounds 48] [--judge-max-tokens 128]
       [--base-url URL --model NAME] [--no-follow-up] [--answers DIR] [--out DIR]
       [quality.py's options]
Writes ``answers.jsonl`` and ``judge.json`` (every rationale) to ``--out`` (default: a temp dir).
Last line: ``fedavg_rougeL_over_local: X`` (FedAvg's union ROUGE-L over local-only's).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


import quality as q  # bench/quality.py: the methods, their budget, the Bench and its visit hook
from fedtune.config import Config
from fedtune.data.tokenize import build_generation_input
from fedtune.eval.generate import Sampling
from fedtune.eval.generation import Answer, Example, answer, answer_rows, client_held_out
from fedtune.eval.judge import compare, grade, pair_prompt, question_text, single_prompt
from fedtune.eval.judge_client import Endpoint, JudgeClient, ReplyCache
from fedtune.eval.metrics import rouge_l, score
from fedtune.inference import Loaded
from fedtune.models.adapters import StateDict, initial_adapter_state
from fedtune.models.load import load_tokenizer
from fedtune.rundir import RunDir
from fedtune.serve.process import served

log = logging.getLogger("fedit_judge")
METHODS = ("base", "local", "fedavg", "fflora", "centralised")
LABELS = {
    "base": "base model",
    "local": "local only (each client's own adapter)",
    "fedavg": "FedAvg (server lr K)",
    "fflora": "FF-LoRA (global + own personal, fused)",
    "centralised": "centralised (pooled data)",
}
PAIRS = (("fedavg", "local"), ("fedavg", "base"))


@dataclass
class Collector:
    """quality.py's visit hook: the wanted methods' answers on every client's first questions."""

    questions: int
    sampling: Sampling
    wanted: Sequence[str]
    examples: dict[int, list[Example]] = field(default_factory=dict)
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    seconds: float = 0.0

    def __call__(self, bench: q.Bench, method: str, pid: int | None) -> None:
        if method not in self.wanted:
            return
        t0 = time.perf_counter()
        cfg = bench.cfg
        if not self.examples:
            for client in range(bench.num_clients):
                self.examples[client] = client_held_out(cfg, bench.tokenizer, client, self.questions)
            log.info("questions per client: %s", [len(e) for e in self.examples.values()])
        pids = range(bench.num_clients) if pid is None else [pid]
        exs = [e for p in pids for e in self.examples[p]]
        bench.model.eval()
        loaded = Loaded(cfg, bench.model, bench.tokenizer, adapter=None)
        self.answers.setdefault(method, []).extend(
            answer_rows(method, exs, answer(loaded, exs, self.sampling))
        )
        self.seconds += time.perf_counter() - t0


# -- the judge ------------------------------------------------------------------------
def judge_run_dir(cfg: Config, folder: Path, state: StateDict) -> Path:
    """A finished run directory of ``cfg`` (``fedtune serve`` serves its base model as ``base``)."""
    run = cfg.run.model_copy(update={"output_dir": str(folder), "name": "judge"})
    judge_cfg = cfg.model_copy(update={"run": run})
    rundir = RunDir.create(judge_cfg)
    rundir.save_round(1, state, judge_cfg)
    rundir.mark_complete(1)
    rundir.save_final(state, judge_cfg)
    return Path(rundir.path)


def local_judge(run_dir: Path, max_tokens: int, context: int, wait_s: float = 600.0) -> Any:
    """``fedtune serve RUN_DIR`` on 127.0.0.1 until the block ends; yields its API root."""
    return served(
        [run_dir], "--max-tokens", str(max_tokens), "--max-prompt-tokens", str(context), wait_s=wait_s
    )


def longest_prompt(answers: dict[str, list[Answer]], cfg: Config, tokenizer: Any) -> int:
    """Tokens in the longest judge prompt this run sends, rendered as ``fedtune serve`` renders it."""
    prompts = []
    for rows in answers.values():
        prompts += [single_prompt(question_text(a["question"]), a["answer"], a["reference"]) for a in rows]
    for ours, theirs in PAIRS:
        by_id = {a["id"]: a for a in answers.get(theirs, [])}
        prompts += [
            pair_prompt(question_text(a["question"]), a["answer"], by_id[a["id"]]["answer"], a["reference"])
            for a in answers.get(ours, [])
            if a["id"] in by_id
        ]
    uncut = 10**9
    return max(
        (len(build_generation_input(m, tokenizer, cfg.data.template, uncut)) for m in prompts), default=0
    )


def judge_all(
    client: JudgeClient, answers: dict[str, list[Answer]], concurrency: int, follow_up: bool
) -> dict[str, Any]:
    """Grades of every method's answers and the pairwise comparisons in :data:`PAIRS`."""
    out: dict[str, Any] = {"single": {}, "pairwise": {}}
    for method, rows in answers.items():
        log.info("judging %s: %d answers", method, len(rows))
        out["single"][method] = grade(client, rows, concurrency=concurrency, follow_up=follow_up)
    for ours, theirs in PAIRS:
        if ours in answers and theirs in answers:
            log.info("judging %s vs %s", ours, theirs)
            pair = (answers[ours], answers[theirs])
            result = compare(client, *pair, concurrency=concurrency, follow_up=follow_up)
            out["pairwise"][f"{ours}_vs_{theirs}"] = result
    return out


# -- report ---------------------------------------------------------------------------
def score_histogram(result: dict[str, Any]) -> str:
    """``score:count`` of the graded answers, highest score first."""
    counts = collections.Counter(i["score"] for i in result["items"] if i["score"] is not None)
    return " ".join(f"{s:g}:{n}" for s, n in sorted(counts.items(), reverse=True)) or "-"


_LOOSE = re.compile(r"rating\W{0,3}(\d+)", re.IGNORECASE)


def loose_ratings(result: dict[str, Any]) -> str:
    """A diagnostic, not a score: malformed replies that still wrote "Rating: N" without the brackets."""
    found = [
        m.group(1)
        for i in result["items"]
        if i["score"] is None
        for m in [_LOOSE.search(i["rationale"] or "")]
        if m
    ]
    counts = collections.Counter(found)
    return f"{len(found)}" + (
        f" ({' '.join(f'{k}:{n}' for k, n in sorted(counts.items()))})" if found else ""
    )


def verdict_positions(result: dict[str, Any]) -> str:
    """How often the judge named A, B, tie or nothing, over both orders (position bias shows here)."""
    counts = collections.Counter(v or "none" for i in result["items"] for v in i["verdicts"])
    return ", ".join(f"{k} {counts[k]}" for k in ("A", "B", "C", "none"))


def grade_vs_rouge(answers: dict[str, list[Answer]], judged: dict[str, Any]) -> str:
    """Spearman's rank correlation, over every graded answer, of the judge's grade and the answer's
    ROUGE-L against its reference: near 0, the grades carry nothing the reference does."""
    from scipy.stats import spearmanr

    by_id = {(m, a["id"]): a for m, mine in answers.items() for a in mine}
    pairs = [
        (rouge_l(by_id[m, i["id"]]["reference"], by_id[m, i["id"]]["answer"]), i["score"])
        for m, g in judged["single"].items()
        for i in g["items"]
        if i["score"] is not None and (m, i["id"]) in by_id
    ]
    if len(pairs) < 3:
        return f"n/a ({len(pairs)} graded answers)"
    rho, p = spearmanr([r for r, _ in pairs], [g for _, g in pairs])
    return f"rho {rho:.3f} (p {p:.3f}, {len(pairs)} graded answers)"


def print_report(
    rows: Sequence[q.Row], answers: dict[str, list[Answer]], judged: dict[str, Any]
) -> dict[str, float]:
    """The markdown table and the pairwise lines; returns each method's union ROUGE-L."""
    by_name = {r.method: r for r in rows}
    rouge: dict[str, float] = {}
    judge_head = "judge mean (n scored [after a follow-up] / malformed)"
    print(f"\n| method | held-out loss (own / union) | ROUGE-L | BLEU | {judge_head} |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        row, mine = by_name.get(method), answers.get(method)
        if not mine:
            note = row.note if row is not None else "not run"
            print(f"| {LABELS[method]} | - | - | - | - ({note}) |")
            continue
        s = score([a["reference"] for a in mine], [a["answer"] for a in mine])
        rouge[method] = s.rouge_l
        g = judged["single"].get(method)
        verdict = "-"
        if g is not None:
            mean = "-" if g["mean_score"] is None else f"{g['mean_score']:.2f}"
            failed = f", {g['counts']['failed']} failed" if g["counts"]["failed"] else ""
            c = g["counts"]
            verdict = f"{mean} ({c['graded']} [{c['graded_after_follow_up']}] / {c['malformed']}{failed})"
        loss = f"{q.fmt(row.own)} / {q.fmt(row.union)}" if row is not None else "- (saved answers)"
        print(f"| {LABELS[method]} | {loss} | {s.rouge_l:.4f} | {s.bleu:.2f} | {verdict} |")
    print()
    for method, g in judged["single"].items():
        print(
            f"judge scores {method} (score:count): {score_histogram(g)}; malformed replies with an"
            f" unbracketed 'Rating: N' (N:count): {loose_ratings(g)}"
        )
    print(f"judge grade vs ROUGE-L, per answer (Spearman): {grade_vs_rouge(answers, judged)}")
    for key, p in judged["pairwise"].items():
        c = p["counts"]
        rate = "-" if p["win_rate"] is None else f"{p['win_rate']:.3f}"
        tally = ", ".join(
            f"{k} {c[k]}" for k in ("win", "loss", "tie", "inconsistent", "malformed", "failed")
        )
        print(
            f"pairwise {key.replace('_vs_', ' vs ')}: win rate {rate} ({c['questions']} questions: {tally})"
        )
        print(f"  verdicts over both orders: {verdict_positions(p)}")
    return rouge


# -- main -----------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = q.build_parser(__doc__.splitlines()[0])
    parser.set_defaults(methods=",".join(METHODS))
    parser.add_argument("--questions", type=int, default=4, help="held-out questions per client")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer tokens (greedy)")
    parser.add_argument("--gen-batch", type=int, default=8, help="prompts per generation batch")
    parser.add_argument(
        "--base-url", help="an OpenAI-compatible API root to judge with (default: fedtune serve)"
    )
    parser.add_argument("--model", default="base", help="the judge's model name at --base-url")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable with the key")
    parser.add_argument("--judge-max-tokens", type=int, default=128, help="judge tokens per reply")
    parser.add_argument("--judge-context", type=int, default=2048, help="the local judge's prompt limit")
    parser.add_argument("--concurrency", type=int, default=16, help="judge requests in flight")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per judge request")
    parser.add_argument("--cache", type=Path, help="on-disk cache of judge replies (default: none)")
    parser.add_argument("--out", type=Path, help="folder for answers.jsonl and judge.json (default: temp)")
    parser.add_argument(
        "--follow-up",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue a reply without score/verdict from 'Rating: [[' (the endpoint must continue messages)",
    )
    parser.add_argument("--answers", type=Path, help="judge DIR/answers.jsonl of a run (no training)")
    args = parser.parse_args()
    if args.seeds and "," in args.seeds:
        parser.error("--seeds: one seed (this bench prints one table)")
    if args.model != "base" and not args.base_url:
        parser.error("--model names a model at --base-url; the local judge serves 'base'")
    return args


@dataclass
class Answered:
    """What the judging needs: the table's rows (none with --answers), the answers, the setting."""

    rows: list[q.Row]
    answers: dict[str, list[Answer]]
    cfg: Config
    tokenizer: Any
    start: StateDict
    seconds: str


def train_and_answer(args: argparse.Namespace, methods: Sequence[str], out: Path) -> Answered:
    """quality.py's table, every method answering as it goes; ``answers.jsonl`` written to ``out``."""
    t0 = time.perf_counter()
    sampling = Sampling(max_new_tokens=args.max_new_tokens, batch_size=args.gen_batch)
    collect = Collector(args.questions, sampling, [m for m in methods if m in METHODS])
    seen: dict[str, q.Bench] = {}

    def visit(bench: q.Bench, method: str, pid: int | None) -> None:
        seen["bench"] = bench
        collect(bench, method, pid)

    user = [*args.set, *([f"seed={args.seeds}"] if args.seeds else [])]
    rows = q.run_table(args, methods, user, visit)
    trained = time.perf_counter() - t0
    all_answers = [a for rows_ in collect.answers.values() for a in rows_]
    (out / "answers.jsonl").write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in all_answers))
    bench = seen["bench"]
    seconds = f"methods + generation {trained:.0f} s (generation {collect.seconds:.0f} s)"
    return Answered(rows, collect.answers, bench.cfg, bench.tokenizer, bench.start, seconds)


def saved_answers(args: argparse.Namespace, folder: Path) -> Answered:
    """``--answers DIR``: an earlier run's ``answers.jsonl``, by method; the config for the local judge."""
    answers: dict[str, list[Answer]] = {}
    for line in (folder / "answers.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        answers.setdefault(row["variant"], []).append(row)
    user = [*args.set, *([f"seed={args.seeds}"] if args.seeds else [])]
    cfg = q.method_config(q.base_tree(args), {}, user)
    start = initial_adapter_state(cfg.model, seed=cfg.seed)
    return Answered([], answers, cfg, load_tokenizer(cfg.model), start, f"answers from {folder}")


def judge_answers(args: argparse.Namespace, done: Answered, out: Path) -> tuple[dict[str, Any], Endpoint]:
    """Every judgement (:func:`judge_all`) by ``--base-url``'s judge or a local fedtune serve."""
    cache = ReplyCache(args.cache) if args.cache else None
    if args.base_url:
        key = os.environ.get(args.api_key_env) or None
        endpoint = Endpoint(args.base_url, args.model, key, args.timeout, max_tokens=args.judge_max_tokens)
        with JudgeClient(endpoint, cache) as client:
            return judge_all(client, done.answers, args.concurrency, args.follow_up), endpoint
    longest = longest_prompt(done.answers, done.cfg, done.tokenizer)
    log.info("longest judge prompt: %d tokens", longest)
    if longest > args.judge_context:
        raise SystemExit(f"a judge prompt of {longest} tokens: raise --judge-context ({args.judge_context})")
    run_dir = judge_run_dir(done.cfg, out, done.start)
    with local_judge(run_dir, args.judge_max_tokens, args.judge_context) as url:
        scope = f"fedtune serve {done.cfg.model.name} base --max-prompt-tokens {args.judge_context}"
        endpoint = Endpoint(
            url, "base", None, args.timeout, max_tokens=args.judge_max_tokens, cache_scope=scope
        )
        with JudgeClient(endpoint, cache) as client:
            return judge_all(client, done.answers, args.concurrency, args.follow_up), endpoint


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per judge request
    methods = q.parse_methods(args.methods)
    out = args.out or Path(tempfile.mkdtemp(prefix="fedtune-fedit-judge-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.answers:
        done = saved_answers(args, args.answers)
    else:
        q.import_federated_stack()
        done = train_and_answer(args, methods, out)
    t1 = time.perf_counter()
    judged, endpoint = judge_answers(args, done, out)
    judging = time.perf_counter() - t1
    judged["judge"] = {
        "base_url": endpoint.base_url,
        "model": endpoint.model,
        "max_tokens": args.judge_max_tokens,
        "follow_up": args.follow_up,
    }
    (out / "judge.json").write_text(json.dumps(judged, indent=2, ensure_ascii=False) + "\n")

    rouge = print_report(done.rows, done.answers, judged)
    n = {m: len(a) for m, a in done.answers.items()}
    what = (
        ""
        if args.answers
        else (f" (greedy, <= {args.max_new_tokens} tokens) of the first {args.questions} questions a client")
    )
    judge = f"judge {endpoint.model} at {endpoint.base_url}, <= {args.judge_max_tokens} tokens a reply"
    follow = ", follow-ups" if args.follow_up else ""
    print(f"\n{n} answers{what}; {judge}{follow}; {done.seconds}, judging {judging:.0f} s; files in {out}")
    ratio = (
        rouge["fedavg"] / rouge["local"] if {"fedavg", "local"} <= rouge.keys() and rouge["local"] else None
    )
    print(f"fedavg_rougeL_over_local: {'n/a' if ratio is None else f'{ratio:.3f}'}")


if __name__ == "__main__":
    main()
