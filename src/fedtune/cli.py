"""The ``fedtune`` command: run, node, partition, data, eval, chat, export, serve, report, kb, ...

Each command is a thin shell over the library; see ``fedtune --help``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from fedtune.cli_ask import kb_ask
from fedtune.cli_eval import eval_, judge
from fedtune.cli_kb import kb_app
from fedtune.errors import FedtuneError

if TYPE_CHECKING:
    from fedtune.config import Config
    from fedtune.inference import Loaded
    from fedtune.rag.chat import ChatRetrieval

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Data files: convert between formats.")
app.add_typer(data_app, name="data")
app.add_typer(kb_app, name="kb")
kb_app.command("ask")(kb_ask)  # the federated search runs Flower: its own module, beside kb's
app.command("eval")(eval_)  # eval and judge: their own module (cli_eval.py)
app.command()(judge)

console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="dotted override, e.g. fed.rounds=5")]
RunDirArg = Annotated[Path, typer.Argument(help="a run directory written by `fedtune run`")]


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault(
        "PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning"
    )  # Ray workers too
    logging.basicConfig(
        level=logging.WARNING, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)]
    )
    logging.getLogger("fedtune").setLevel(logging.INFO)
    import flwr  # noqa: F401  (configures its logger on import; quieten it after)

    # Flower's INFO lines and its run_simulation deprecation notice would bury the progress
    # bars; fedtune logs client failures itself.
    logging.getLogger("flwr").setLevel(logging.ERROR)
    logging.getLogger("flwr").propagate = False  # it has its own handler
    # lm-eval warns on every run that fedtune hands it a loaded model, which it does on purpose
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _config(config: Path | None, overrides: list[str] | None) -> Config:
    from fedtune.config import load_config

    return load_config(config, overrides or [])


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[Path | None, typer.Option(help="continue this run directory")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Federated LoRA fine-tuning in Flower's simulation runtime; writes a run directory."""
    from fedtune.launch import run as launch
    from fedtune.report import loss_table, read_metrics

    if resume is not None and (config is not None or set_):
        given = ["--config"] * (config is not None) + [f"--set {s.split('=', 1)[0]}" for s in set_ or []]
        raise FedtuneError(
            f"--resume continues a run with its own config.toml; drop {', '.join(given)} "
            "(a resume cannot change the run's settings, e.g. its model.quantization)"
        )
    started = time.time()
    cfg = None if resume is not None else _config(config, set_)
    run_dir = launch(cfg, resume=resume, progress=progress)
    firsts = [
        r["first_step_at"] for r in run_dir.metrics() if r["phase"] == "train" and r.get("first_step_at")
    ]
    table = Table(title="held-out loss per client (round 0 -> last round)")
    for col in ("client", "before", "after", "change"):
        table.add_column(col, justify="right")
    for row in loss_table(read_metrics(run_dir.path)):
        table.add_row(
            str(row.client), f"{row.before:.4f}", f"{row.after:.4f}", f"{row.after - row.before:+.4f}"
        )
    out.print(table)
    if firsts:
        out.print(f"first training step finished {min(firsts) - started:.1f} s after start")
    out.print(f"wall time: {time.time() - started:.1f} s")
    out.print(f"run directory: {run_dir.path}")
    if run_dir.report_page.exists():
        out.print(f"report: {run_dir.report_page}")


@app.command()
def partition(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Show how the config splits the data: a clients x categories table."""
    from fedtune.data.partition import partition_table
    from fedtune.data.pipeline import partitions

    cfg = _config(config, set_)
    out.print(partition_table(partitions(cfg), cfg.partition.column))


@data_app.command("convert")
def data_convert(
    src: Annotated[Path, typer.Argument(help="input file (.json/.jsonl/.csv/.parquet)")],
    dst: Annotated[Path, typer.Argument(help="output file (.json/.jsonl)")],
    from_: Annotated[str, typer.Option("--from", help="input format")],
    to: Annotated[str, typer.Option("--to", help="output format")],
    explain: Annotated[bool, typer.Option(help="render responses as EXPLAIN: ... CONCLUSION: ...")] = False,
) -> None:
    """Convert a data file between formats (alpaca, dolly, chatglm, sharegpt, openai, explanation)."""
    from fedtune.data.load import convert_file

    n = convert_file(str(src), from_, str(dst), to, explain=explain)
    out.print(f"wrote {n} records to {dst}")


@app.command()
def chat(
    run_dir: RunDirArg,
    prompt: Annotated[
        list[str] | None, typer.Option(help="user turn(s) to send instead of reading stdin")
    ] = None,
    system: Annotated[str | None, typer.Option(help="system message")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    client: Annotated[int | None, typer.Option(help="FF-LoRA: fuse this client's personal adapter")] = None,
    trunk: Annotated[
        str | None, typer.Option(help="split runs: HOST:PORT of a trunk service (default: start one here)")
    ] = None,
    unsplit: Annotated[bool, typer.Option(help="split runs: run the whole model in this process")] = False,
    rag: Annotated[bool, typer.Option(help="evidence before each turn, as the run's [rag] trained")] = False,
    case_base: Annotated[
        Path | None, typer.Option(help="--rag: your case base (record file, text folder or index folder)")
    ] = None,
) -> None:
    """Multi-turn chat with the run's adapter, template and RoPE scaling. Empty line or /exit ends it.

    On a split run the chat generates across the split (head and tail here, the trunk on a
    trunk service, KV caches in every part) unless --unsplit. With --rag each turn gets
    evidence from the run's reference base and --case-base, and the passages used are shown.
    """
    from fedtune.inference import load_run, load_split_run
    from fedtune.rundir import RunDir

    split_run = RunDir.open(run_dir).config().split.enabled
    if trunk is not None and not split_run:
        raise FedtuneError(f"--trunk: {run_dir} is not a split run")
    if case_base is not None and not rag:
        raise FedtuneError("--case-base needs --rag")
    if split_run and not unsplit and client is None:
        loaded = load_split_run(run_dir, trunk=trunk)
    else:
        loaded = load_run(run_dir, client=client)
    try:
        retrieval = None
        if rag:
            from fedtune.rag.chat import chat_retrieval

            source = str(case_base) if case_base is not None else None
            retrieval = chat_retrieval(loaded.cfg, loaded.tokenizer, case_source=source)
        _chat_loop(loaded, prompt, system, max_new_tokens, retrieval)
    finally:
        if loaded.split is not None:
            loaded.split.close()


def _chat_loop(
    loaded: Loaded,
    prompt: list[str] | None,
    system: str | None,
    max_new_tokens: int,
    retrieval: ChatRetrieval | None = None,
) -> None:
    from fedtune.data.types import Conversation
    from fedtune.inference import reply

    history: Conversation = [{"role": "system", "content": system}] if system else []
    turns = iter(prompt) if prompt else None
    while True:
        if turns is not None:
            text = next(turns, None)
            if text is None:
                break
            out.print(f"[bold]you>[/bold] {text}")
        else:
            try:
                text = input("you> ")
            except EOFError:
                break
        if not text.strip() or text.strip() == "/exit":
            break
        history.append({"role": "user", "content": text})
        sent = history
        if retrieval is not None:  # evidence for this turn only; the history keeps the user's words
            from fedtune.rag.chat import describe_all

            sent, used = retrieval.augment(history)
            for line in describe_all(used) or ["(no passage fits)"]:
                out.print(f"[dim]evidence> {escape(line)}[/dim]", highlight=False)
        answer = reply(loaded, sent, max_new_tokens=max_new_tokens)
        history.append({"role": "assistant", "content": answer})
        out.print(f"[bold]model>[/bold] {answer}")


@app.command()
def export(
    run_dir: RunDirArg,
    out_dir: Annotated[Path, typer.Argument(help="folder to write (must not exist unless --replace)")],
    merge: Annotated[bool, typer.Option(help="a merged full model folder instead of the adapter")] = False,
    replace: Annotated[bool, typer.Option(help="overwrite an existing OUT_DIR")] = False,
) -> None:
    """Write the run's adapter for other tools (base named loadably), or with --merge the merged model."""
    from fedtune.export import export_run

    out.print(f"wrote {export_run(run_dir, out_dir, merge=merge, replace=replace)}")


@app.command()
def serve(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories sharing one base model")],
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    max_tokens: Annotated[int, typer.Option(min=1, help="the largest max_tokens a request may ask")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="the largest request body")] = 1_000_000,
    max_prompt_tokens: Annotated[
        int | None,
        typer.Option(
            min=1, help="prompt tokens kept, cut from the left (default: each run's data.max_source_length)"
        ),
    ] = None,
    trunk: Annotated[
        str | None,
        typer.Option(help="the split run's trunk service, HOST:PORT (default: start one here per split run)"),
    ] = None,
    unsplit: Annotated[bool, typer.Option(help="split runs: run the whole model in this process")] = False,
) -> None:
    """An OpenAI-compatible API over the runs' adapters (model ids: see GET /v1/models).

    One base model, each run's global adapter (model = the run folder's name), each FF-LoRA
    client's personal adapter (NAME/client-PID) and the base model (base). A split run generates
    across the split (head and tail here, the trunk on a trunk service) unless --unsplit.
    Ctrl-C stops it.
    """
    from fedtune.serve import Limits, SplitServing
    from fedtune.serve import serve as run_server

    limits = Limits(
        max_tokens=max_tokens,
        default_max_tokens=min(256, max_tokens),
        max_body_bytes=max_body_bytes,
        max_prompt_tokens=max_prompt_tokens,
    )
    split = SplitServing(unsplit=unsplit, trunk=trunk)
    console.print(f"serving {', '.join(d.name for d in run_dirs)} on http://{host}:{port}/v1")
    run_server(list(run_dirs), host=host, port=port, limits=limits, split=split)


@app.command()
def report(run_dir: RunDirArg) -> None:
    """Write plots and an HTML page for a run directory."""
    from fedtune.report import write_report

    out.print(f"report: {write_report(run_dir)}")


@app.command("serve-trunk")
def serve_trunk(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    adapter: Annotated[
        Path | None,
        typer.Option(help="peft adapter folder to start from, e.g. RUN_DIR/final (default: a fresh LoRA)"),
    ] = None,
    ready_file: Annotated[Path | None, typer.Option(help="written with the bound port once serving")] = None,
    save_trunk: Annotated[
        Path | None, typer.Option(help="safetensors file for the trunk adapter at exit")
    ] = None,
    grace: Annotated[float, typer.Option(min=0, help="seconds running sessions get at exit")] = 5.0,
) -> None:
    """Serve a split model's trunk over gRPC until SIGTERM / SIGINT.

    The config gives the model, the cut (split.n_head, split.n_tail), the endpoint (split.host,
    split.port: 0 for any free port, split.tls_*), the trunk optimiser (split.trunk_lr or train.lr,
    train.weight_decay, train.grad_accum) and train.num_threads; e.g. a run's own
    `--config RUN_DIR/config.toml --adapter RUN_DIR/final`.
    """
    from fedtune.split.serve_trunk import serve_trunk as serve

    serve(_config(config, set_), adapter=adapter, ready_file=ready_file, save_trunk=save_trunk, grace=grace)


@app.command()
def node(
    dir_: Annotated[
        Path, typer.Option("--dir", help="the worker's folder: the SuperNode's node config `worker`")
    ] = Path("~/.cache/fedtune/node"),
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="load this config's model before the first message")
    ] = None,
    set_: SetOpt = None,
    ready_file: Annotated[
        Path | None, typer.Option(help="written with the socket's path once serving")
    ] = None,
) -> None:
    """Serve a SuperNode's ClientApp from one long-lived process until SIGTERM / SIGINT.

    Start it beside `flower-supernode ... --node-config "partition-id=0 ... worker='DIR'"`: the
    ClientApp forwards every message to it, and it keeps the base model and the client's data
    loaded across rounds and runs (reloading the model only when the config's model changes).
    """
    from fedtune.federated.node import serve

    logging.getLogger("fedtune").setLevel(logging.INFO)
    serve(dir_, preload=_config(config, set_) if config is not None else None, ready=ready_file)


def main() -> None:
    """The ``fedtune`` entry point; a FedtuneError is printed as one line and exits with status 2."""
    _quiet_libraries()
    try:
        app(standalone_mode=False)
    except FedtuneError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)  # one line, however long
        sys.exit(2)
    except (typer.Exit, SystemExit) as err:
        code = getattr(err, "exit_code", getattr(err, "code", 0))
        sys.exit(code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as err:  # click usage errors arrive here in standalone_mode=False
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise
