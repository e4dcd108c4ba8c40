"""``fedtune eval`` and ``fedtune judge``: held-out loss, generation metrics, lm-eval tasks, LLM-as-judge.

The library is :mod:`fedtune.eval`; this module only parses arguments and prints tables. A
bad input raises :class:`~fedtune.errors.FedtuneError` (exit status 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

out = Console()
RunDirArg = Annotated[Path, typer.Argument(help="a run directory written by `fedtune run`")]


def eval_(
    run_dir: RunDirArg,
    loss: Annotated[bool, typer.Option(help="held-out loss per client, base and adapter")] = True,
    generate: Annotated[
        bool, typer.Option(help="answer each client's held-out split; ROUGE-L, BLEU, exact match")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="--generate: tokens per answer")] = 64,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="--generate: sample or greedy")] = False,
    temperature: Annotated[float, typer.Option(min=0.0, help="--sample: temperature")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="--sample: nucleus mass")] = 0.9,
    seed: Annotated[int, typer.Option(help="--sample: seed")] = 0,
    limit: Annotated[
        int | None, typer.Option(min=1, help="examples per client (--generate) / per task (--tasks)")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="prompts per generation / harness batch")] = 8,
    personal: Annotated[
        bool,
        typer.Option(
            help="--generate on FF-LoRA runs: also each client's global + personal adapter"
            " (needs the clients' personal adapters in RUN_DIR)"
        ),
    ] = True,
    tasks: Annotated[
        str | None, typer.Option(help="lm-evaluation-harness tasks, comma-separated, on base and adapter")
    ] = None,
    include_path: Annotated[
        Path | None, typer.Option(help="--tasks: a folder of task YAMLs (default: fedtune's own tasks)")
    ] = None,
) -> None:
    """Held-out loss, generation metrics and lm-eval tasks: base model vs the run's final adapter.

    Results go to RUN_DIR/eval/ (generation.json, answers.jsonl, lm_eval.json); see
    docs/evaluation.md.
    """
    prepared = None
    if tasks is not None:  # unknown task names fail before any model loads
        from fedtune.eval.harness import prepare_tasks

        prepared = prepare_tasks([t.strip() for t in tasks.split(",") if t.strip()], include_path)
    if loss:
        _eval_loss(run_dir)
    if generate:
        from fedtune.eval.generate import Sampling
        from fedtune.eval.generation import evaluate_generation

        sampling = Sampling(max_new_tokens, sample, temperature, top_p, seed, batch_size)
        result = evaluate_generation(run_dir, sampling, limit=limit, personal=personal)
        out.print(_scores_table(f"generation: {run_dir}", result["variants"]))
    if prepared is not None:
        from fedtune.eval.harness import run_tasks

        harness = run_tasks(run_dir, prepared, limit=limit, batch_size=batch_size)
        out.print(_harness_table(f"lm-eval: {run_dir}", harness["summary"]))
    if generate or tasks is not None:
        _refresh_report(run_dir)


def _refresh_report(run_dir: Path) -> None:
    """Rewrite an existing report so it shows the new results (``fedtune report`` makes a first one)."""
    from fedtune.report import write_report
    from fedtune.rundir import RunDir

    if RunDir(run_dir).report_page.exists():
        out.print(f"report: {write_report(run_dir)}")


def _eval_loss(run_dir: Path) -> None:
    from fedtune.inference import evaluate_clients, load_run

    tuned = evaluate_clients(load_run(run_dir))  # first: a missing or corrupt adapter fails at once
    base = evaluate_clients(load_run(run_dir, base_only=True))
    table = Table(title=f"held-out loss: {run_dir}")
    for col in ("client", "base", "adapter", "change"):
        table.add_column(col, justify="right")
    for pid in sorted(base):
        table.add_row(str(pid), f"{base[pid]:.4f}", f"{tuned[pid]:.4f}", f"{tuned[pid] - base[pid]:+.4f}")
    out.print(table)


def _scores_table(title: str, variants: dict[str, Any]) -> Table:
    table = Table(title=title)
    for col in ("variant", "client", "n", "ROUGE-L", "BLEU", "exact match"):
        table.add_column(col, justify="right")
    for variant, res in variants.items():
        for client, s in [*res["clients"].items(), ("union", res["union"])]:
            table.add_row(
                variant,
                client,
                str(s["n"]),
                f"{s['rouge_l']:.4f}",
                f"{s['bleu']:.2f}",
                f"{s['exact_match']:.4f}",
            )
    return table


def _harness_table(title: str, summary: list[dict[str, object]]) -> Table:
    table = Table(title=title)
    for col in ("task", "metric", "base", "adapter"):
        table.add_column(col, justify="right")
    for row in summary:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))
    return table


def judge(
    run_dir: RunDirArg,
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible API root, e.g. http://localhost:8000/v1")],
    model: Annotated[str, typer.Option(help="the judge model's name at the endpoint")],
    against: Annotated[
        Path | None, typer.Option(help="pairwise: compare with this run's answers (both orders asked)")
    ] = None,
    api_key_env: Annotated[
        str, typer.Option(help="environment variable holding the API key")
    ] = "OPENAI_API_KEY",
    variant: Annotated[
        str, typer.Option(help="which answers of RUN_DIR: base, adapter, personal")
    ] = "adapter",
    against_variant: Annotated[str, typer.Option(help="which answers of --against")] = "adapter",
    limit: Annotated[int | None, typer.Option(min=1, help="judge the first N answers only")] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="requests in flight")] = 4,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds per request")] = 60.0,
    retries: Annotated[int, typer.Option(min=0, help="retries on 429/5xx/timeouts/connection errors")] = 4,
    backoff: Annotated[float, typer.Option(min=0.0, help="seconds before the first retry (doubles)")] = 1.0,
    max_tokens: Annotated[int, typer.Option(min=1, help="judge tokens per answer")] = 1024,
    reference: Annotated[bool, typer.Option(help="show the judge the reference answer")] = True,
    cache: Annotated[
        Path | None, typer.Option(help="on-disk cache of judge replies (default: FEDTUNE_CACHE/judge)")
    ] = None,
    use_cache: Annotated[
        bool, typer.Option("--use-cache/--no-cache", help="read and write the cache")
    ] = True,
    follow_up: Annotated[
        bool,
        typer.Option(
            help="a reply without score/verdict: ask the judge to continue it with 'Rating: [[' "
            "(endpoints with continue_final_message: fedtune serve, vLLM)"
        ),
    ] = False,
) -> None:
    """LLM-as-judge of the answers `fedtune eval --generate` saved: 1-10 grades, or pairwise with --against.

    Any OpenAI-compatible endpoint (only POST BASE_URL/chat/completions is used). Results go
    to RUN_DIR/eval/judge-single.json or judge-vs-<other run>.json; see docs/evaluation.md.
    """
    import os

    from fedtune.eval.judge import judge_run
    from fedtune.eval.judge_client import Endpoint, JudgeClient, ReplyCache
    from fedtune.models.load import cache_dir

    endpoint = Endpoint(
        base_url, model, os.environ.get(api_key_env) or None, timeout, retries, backoff, max_tokens=max_tokens
    )
    with JudgeClient(endpoint, ReplyCache(cache or cache_dir() / "judge") if use_cache else None) as client:
        path, result = judge_run(
            client,
            run_dir,
            against=against,
            variant=variant,
            against_variant=against_variant,
            limit=limit,
            concurrency=concurrency,
            reference=reference,
            follow_up=follow_up,
        )
    counts = ", ".join(f"{k} {v}" for k, v in result["counts"].items())
    if against is None:
        score = result["mean_score"]
        out.print(f"mean score: {'-' if score is None else f'{score:.2f}'} / 10 ({counts})")
    else:
        rate = result["win_rate"]
        out.print(f"win rate vs {against}: {'-' if rate is None else f'{rate:.3f}'} ({counts})")
    out.print(f"wrote {path}")
    _refresh_report(run_dir)
