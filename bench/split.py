"""Split-learning step time with the trunk in its own process / the same step unsplit; bytes; replicas.

Three measurements, one run:

1. Step time. The same batch (``--batch-size`` x ``--seq-len`` random tokens, every token labelled),
   the same LoRA (r 8, alpha 16 on q/k/v/o, as ``fedtune serve-trunk`` gets it), forward + backward +
   AdamW on every LoRA weight; one step of each mode per round, the order rotating from round to
   round, medians over ``--steps`` rounds after ``--warmup``:

   - ``unsplit``: the whole peft model in this process;
   - ``split_inproc``: :func:`fedtune.split.split_step` over head, trunk and tail, one process;
   - ``split_remote``: this process runs head and tail (:func:`remote_split_step`), a
     ``fedtune serve-trunk`` subprocess runs the trunk and steps its own AdamW,
     over gRPC on loopback;
   - ``unsplit_2t`` (``--with-2t``): ``unsplit`` with 2 torch threads, for reference. Off by
     default: on this shared 2-core box OpenMP with 2 threads ran 4-8x SLOWER than with 1
     (12-26 s against 2.5-4 s a SmolLM2 step), so it is neither cheap nor telling.

   Threads: the client and the trunk service get ``--threads`` each (default 1: two processes on
   a 2-core box, not fighting over it). The two sides never compute at once (every step is
   head -> trunk -> tail -> trunk -> head), so the baseline is the unsplit step with the thread
   count of ONE side; ``split_step_ratio`` divides by that. Besides wall time, each mode's CPU
   seconds (this process + the trunk process, from /proc) are reported: under other users' load
   they vary less than wall time.

2. Bytes per step, from ``TrunkClient.bytes_up`` / ``bytes_down``, against the analytic fp32
   activation size B*T*H*4 (up: h1 and dL/dh2; down: h2 and dL/dh1; plus counts and headers).

3. Hierarchical speed-up: ``--clients`` client processes (this script with ``--worker``, driven
   over stdin), each doing ``--hier-steps`` split steps against G trunk replicas (``serve-trunk``
   processes; client i uses replica i % G). A replica serves its clients' steps in turn, as
   TrunkService does: the trunk is leased from a step's FORWARD to its BACKWARD, so a client's
   tail runs inside the lease. Wall time from "go" to the last client's last step, per G, G in
   the order 1, 2, 4, 4, 2, 1, ... (``--hier-repeats``), median per G. The box has 2 cores, so
   the speed-up cannot pass about 2x however many replicas run; how much two processes get
   out of it at the time is measured before and after (1-thread matmul loops). Default model:
   the tiny one; SmolLM2 x 8 processes does not fit the run's time budget on 2 cores.

Anchor (FedSEA, ReCoRD): sequential split training of 2 clients took 689 s against 382 s for
centralised training; the hierarchical set-up took 348 / 174 / 86 s for 2 / 4 / 8 clients.

``tiny-llama`` has 2 blocks, too few to cut into head, trunk and tail, so ``tiny-llama`` here
means its config (64 wide, SmolLM2's 49152-token vocabulary) with ``--tiny-layers`` blocks,
random weights seeded 0, saved to a temporary folder that every process loads.

Usage: python bench/split.py [--model tiny-llama] [--steps 10] [--clients 4] [--groups 1,2,4]
Last line: ``split_step_ratio: X`` (median split_remote / median unsplit wall time, goal <= 1.3).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import torch
from torch import Tensor

Batch = dict[str, Tensor]
STARTUP_S = 180.0  # model load of up to 9 processes sharing 2 cores


# -- models and data ------------------------------------------------------------------------------


def model_path(name: str, tiny_layers: int, root: Path) -> str:
    """What both sides load: a built-in name or folder, or the cuttable tiny-llama (see docstring)."""
    if name != "tiny-llama":
        return name
    from transformers import AutoConfig, LlamaForCausalLM

    from fedtune.models.load import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path("tiny-llama"))
    config.num_hidden_layers = tiny_layers
    torch.manual_seed(0)
    out = root / f"tiny-llama-{tiny_layers}l"
    LlamaForCausalLM(config).save_pretrained(out)
    return str(out)


def load_peft(path: str, lora_r: int, seed: int) -> torch.nn.Module:
    """Base model + a fresh LoRA, as ``fedtune serve-trunk`` builds it (:func:`trunk_settings`)."""
    from fedtune.config import LoraConfig, ModelConfig
    from fedtune.models.adapters import attach_lora
    from fedtune.models.load import load_model

    base = load_model(ModelConfig(name=path))
    return attach_lora(base, LoraConfig(r=lora_r, alpha=2 * lora_r, dropout=0.0), seed=seed)


def make_batch(vocab: int, batch_size: int, seq_len: int, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    return {
        "input_ids": ids,
        "labels": ids.clone(),
        "attention_mask": torch.ones_like(ids),
        "valid": torch.full((batch_size,), seq_len, dtype=torch.int64),
    }


def lora_params(*modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        for name, p in module.named_parameters():
            if "lora_" in name and p.requires_grad:
                seen[id(p)] = p
    return list(seen.values())


# -- processes ------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process we started (by its PID), then SIGKILL it if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def trunk_settings(path: str, args: argparse.Namespace) -> list[str]:
    """The config of a ``fedtune serve-trunk`` process: :func:`load_peft`'s model and LoRA, any free port."""
    r = args.lora_r
    return [
        f"model.name='{path}'", f"model.lora.r={r}", f"model.lora.alpha={2 * r}", "model.lora.dropout=0.0",
        "seed=0", f"split.n_head={args.n_head}", f"split.n_tail={args.n_tail}", "split.host='127.0.0.1'",
        "split.port=0", f"train.num_threads={args.threads}",
    ]  # fmt: skip


@dataclass
class Service:
    address: str
    proc: subprocess.Popen


@contextlib.contextmanager
def trunk_services(path: str, count: int, args: argparse.Namespace, root: Path) -> Iterator[list[Service]]:
    """``count`` serve-trunk processes on loopback, free ports; stopped by PID on the way out."""
    procs: list[tuple[subprocess.Popen, Path, Path]] = []
    try:
        for g in range(count):
            ready, log = root / f"trunk{g}.port", root / f"trunk{g}.log"
            ready.unlink(missing_ok=True)
            sets = [x for s in trunk_settings(path, args) for x in ("--set", s)]
            cmd = [sys.executable, "-m", "fedtune", "serve-trunk", *sets, "--ready-file", str(ready)]
            cmd += ["--grace", "1"]
            with log.open("wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            procs.append((proc, ready, log))
        deadline = time.monotonic() + STARTUP_S
        for proc, ready, log in procs:
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"trunk service did not start\n{_tail(log)}")
                time.sleep(0.1)
        yield [Service(f"127.0.0.1:{ready.read_text()}", proc) for proc, ready, _ in procs]
    finally:
        for proc, _, _ in procs:
            _stop(proc)


class Worker:
    """One client process (this script with ``--worker``), driven by lines on its stdin."""

    def __init__(self, index: int, path: str, args: argparse.Namespace, root: Path) -> None:
        self.log = root / f"client{index}.log"
        cmd = [
            sys.executable, __file__, "--worker", "--client-index", str(index), "--model", path,
            "--n-head", str(args.n_head), "--n-tail", str(args.n_tail), "--lora-r", str(args.lora_r),
            "--threads", str(args.threads), "--batch-size", str(args.hier_batch_size),
            "--seq-len", str(args.hier_seq_len), "--hier-steps", str(args.hier_steps),
        ]  # fmt: skip
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1
            )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, word: str) -> list[str]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != word:
            raise RuntimeError(f"client worker: expected {word!r}, got {line}\n{_tail(self.log)}")
        return line[1:]

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send("quit")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            _stop(self.proc)


def worker_main(args: argparse.Namespace) -> None:
    """Client side of the hierarchical measurement: ``connect ADDR`` (1 warm-up step), ``go``, ``quit``."""
    from fedtune.split import TrunkClient, cut_model, remote_split_step

    torch.set_num_threads(args.threads)
    model = load_peft(args.model, args.lora_r, seed=0)
    head, _, tail = cut_model(model, args.n_head, args.n_tail)
    optim = torch.optim.AdamW(lora_params(head, tail), lr=2e-4)
    batch = make_batch(model.config.vocab_size, args.batch_size, args.seq_len, seed=1 + args.client_index)
    model.train()

    def step(client: TrunkClient) -> None:
        optim.zero_grad(set_to_none=True)
        remote_split_step(head, tail, client, batch)
        optim.step()

    print("loaded", flush=True)
    client: TrunkClient | None = None
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "connect":
            client = TrunkClient(rest[0], model.config.hidden_size)
            step(client)
            print("ready", flush=True)
        elif cmd == "go":
            assert client is not None
            start, cpu0 = time.time(), time.process_time()  # wall clock: compared across processes
            for _ in range(args.hier_steps):
                step(client)
            end, cpu = time.time(), time.process_time() - cpu0
            client.close()
            client = None
            print(f"done {start:.6f} {end:.6f} {cpu:.4f}", flush=True)
        elif cmd == "quit":
            break


# -- 1 and 2: step time and bytes -----------------------------------------------------------------


@dataclass
class Timings:
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # this process + the trunk process
    exchange: list[float] = field(default_factory=list)  # split_remote: waiting on the trunk's replies
    trunk: list[float] = field(default_factory=list)  # split_inproc: in the trunk's forward and backward
    bytes_up: float = 0.0
    bytes_down: float = 0.0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TrunkClock:
    """Seconds spent in a trunk's forward and backward, from hooks (for ``split_inproc``)."""

    def __init__(self, trunk: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._t0 = 0.0
        trunk.register_forward_pre_hook(self._pre)
        trunk.register_forward_hook(self._post)

    def _begin(self, *_: object) -> None:
        self._t0 = time.perf_counter()

    def _end(self, *_: object) -> None:
        self.seconds += time.perf_counter() - self._t0

    def _pre(self, _module: object, inputs: tuple) -> None:
        if inputs[0].requires_grad:
            inputs[0].register_hook(self._end)  # fires when dL/dh1 is done: the trunk's backward ends
        self._begin()

    def _post(self, _module: object, _inputs: tuple, output: Tensor) -> None:
        self._end()
        if output.requires_grad:
            output.register_hook(self._begin)  # fires when dL/dh2 arrives: its backward starts


def step_times(args: argparse.Namespace, path: str, root: Path) -> tuple[Timings, int]:
    """Interleaved rounds of every mode on one batch; returns the timings and the hidden size."""
    from fedtune.split import TrunkClient, cut_model, remote_split_step, split_step
    from fedtune.split import protocol as wire

    waited = [0.0]

    class TimedClient(TrunkClient):
        def exchange(self, data: bytes) -> wire.Message:
            t0 = time.perf_counter()
            try:
                return super().exchange(data)
            finally:
                waited[0] += time.perf_counter() - t0

    with trunk_services(path, 1, args, root) as (service,):  # it loads while we do
        model = load_peft(path, args.lora_r, seed=0)
        remote_model = copy.deepcopy(model)  # the split client's own copy; its trunk is never run
        head, trunk, tail = cut_model(model, args.n_head, args.n_tail)
        r_head, _, r_tail = cut_model(remote_model, args.n_head, args.n_tail)
        hidden = int(model.config.hidden_size)
        batch = make_batch(model.config.vocab_size, args.batch_size, args.seq_len, seed=1)
        optim = torch.optim.AdamW(lora_params(model), lr=2e-4)  # unsplit and split_inproc: all LoRA
        r_optim = torch.optim.AdamW(lora_params(r_head, r_tail), lr=2e-4)  # the service steps the trunk's
        model.train()
        remote_model.train()
        clock = TrunkClock(trunk)
        client = TimedClient(service.address, hidden, timeout_s=STARTUP_S)
        try:

            def unsplit() -> None:
                optim.zero_grad(set_to_none=True)
                model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss.backward()
                optim.step()

            def unsplit_2t() -> None:
                torch.set_num_threads(2)
                try:
                    unsplit()
                finally:
                    torch.set_num_threads(args.threads)

            def split_inproc() -> None:
                optim.zero_grad(set_to_none=True)
                split_step(head, trunk, tail, batch)
                optim.step()

            def split_remote() -> None:
                r_optim.zero_grad(set_to_none=True)
                remote_split_step(r_head, r_tail, client, batch)
                r_optim.step()

            modes: dict[str, Callable[[], None]] = {
                "unsplit": unsplit,
                "split_inproc": split_inproc,
                "split_remote": split_remote,
            }
            if args.with_2t:
                modes["unsplit_2t"] = unsplit_2t
            out = Timings(wall={m: [] for m in modes}, cpu={m: [] for m in modes})
            names = list(modes)
            for rnd in range(args.warmup + args.steps):
                if rnd == args.warmup:
                    up0, down0 = client.bytes_up, client.bytes_down
                for name in names[rnd % len(names) :] + names[: rnd % len(names)]:  # rotate the order
                    waited[0] = clock.seconds = 0.0
                    cpu0, trunk0 = time.process_time(), _cpu_s(service.proc.pid)
                    t0 = time.perf_counter()
                    modes[name]()
                    wall = time.perf_counter() - t0
                    cpu = time.process_time() - cpu0 + _cpu_s(service.proc.pid) - trunk0
                    if rnd >= args.warmup:
                        out.wall[name].append(wall)
                        out.cpu[name].append(cpu)
                        if name == "split_remote":
                            out.exchange.append(waited[0])
                        if name == "split_inproc":
                            out.trunk.append(clock.seconds)
            out.bytes_up = (client.bytes_up - up0) / args.steps
            out.bytes_down = (client.bytes_down - down0) / args.steps
        finally:
            client.close()
    return out, hidden


def serialisation_s(args: argparse.Namespace, hidden: int) -> float:
    """Encode + decode of one step's four messages, no gRPC (median of 10)."""
    from fedtune.split import protocol as wire

    limits = wire.Limits(hidden)
    h = torch.randn(args.batch_size, args.seq_len, hidden)
    valid = torch.full((args.batch_size,), args.seq_len, dtype=torch.int64)
    messages = [wire.forward(1, h, valid), wire.activation(1, h), wire.backward(1, h), wire.gradient(1, h)]
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        for m in messages:
            wire.decode(wire.encode(m, limits), limits)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report_steps(args: argparse.Namespace, t: Timings, hidden: int) -> float:
    """Print parts 1 and 2; returns split_step_ratio."""
    wall = {m: statistics.median(ts) for m, ts in t.wall.items()}
    cpu = {m: statistics.median(ts) for m, ts in t.cpu.items()}
    paired = statistics.median(r / u for r, u in zip(t.wall["split_remote"], t.wall["unsplit"], strict=True))
    analytic = args.batch_size * args.seq_len * hidden * 4
    print(f"model: {args.model}  batch: {args.batch_size} x {args.seq_len}  hidden: {hidden}  "
          f"n_head: {args.n_head}  n_tail: {args.n_tail}  "
          f"rounds: {args.warmup} warm-up + {args.steps}")  # fmt: skip
    print(f"threads: client {args.threads}, trunk service {args.threads}, unsplit baseline {args.threads} "
          "(= one side: the two sides never compute at once)")  # fmt: skip
    for m, ts in t.wall.items():
        print(f"{m}_wall_s: {[round(x, 3) for x in ts]}")
    for m in t.wall:
        print(f"median_{m}: wall {wall[m]:.4f} s  cpu {cpu[m]:.4f} s (this process + trunk process)")
    waiting, in_trunk = statistics.median(t.exchange), statistics.median(t.trunk)
    print(f"split_remote_waiting_on_trunk_s (trunk compute + transport), median: {waiting:.4f}")
    print(f"split_inproc_in_trunk_s (trunk forward + backward, hooks), median: {in_trunk:.4f}")
    print(f"transport_s_per_step (waiting on trunk - in trunk; incl. the service's AdamW): "
          f"{waiting - in_trunk:.4f}")  # fmt: skip
    print(f"transport_s_per_step (median split_remote - median split_inproc): "
          f"{wall['split_remote'] - wall['split_inproc']:.4f}")  # fmt: skip
    print(f"serialisation_s_per_step (encode + decode of the 4 messages, no gRPC): "
          f"{serialisation_s(args, hidden):.4f}")  # fmt: skip
    print(f"split_inproc_ratio (wall): {wall['split_inproc'] / wall['unsplit']:.3f}")
    print(f"split_remote_cpu_ratio (cpu seconds, both processes): {cpu['split_remote'] / cpu['unsplit']:.3f}")
    print(f"split_remote_paired_ratio (median of per-round ratios): {paired:.3f}")
    if "unsplit_2t" in wall:
        print(f"split_remote_vs_unsplit_2t_ratio: {wall['split_remote'] / wall['unsplit_2t']:.3f}")
    print(f"bytes_up_per_step: {t.bytes_up:.0f}")
    print(f"bytes_down_per_step: {t.bytes_down:.0f}")
    print(f"analytic_B*T*H*4: {analytic} bytes per tensor; per step up 2x = {2 * analytic} "
          f"(h1, dL/dh2) + counts + headers, down 2x = {2 * analytic} (h2, dL/dh1) + headers")  # fmt: skip
    return wall["split_remote"] / wall["unsplit"]


# -- 3: hierarchical speed-up ---------------------------------------------------------------------


CAPACITY_CODE = """
import time, torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
t = time.perf_counter()
for _ in range(300):
    a @ a
print(time.perf_counter() - t)
"""


def parallel_capacity(procs: int) -> float:
    """How many 1-thread matmul loops' worth of work this box does with ``procs`` running at once."""

    def run(n: int) -> float:
        started = [
            subprocess.Popen([sys.executable, "-c", CAPACITY_CODE], stdout=subprocess.PIPE, text=True)
            for _ in range(n)
        ]
        try:
            return statistics.mean(float(p.communicate()[0]) for p in started)
        finally:
            for p in started:
                _stop(p)

    return procs * run(1) / run(procs)


def hierarchical(args: argparse.Namespace, path: str, root: Path) -> None:
    groups = [int(g) for g in args.groups.split(",")]
    order: list[int] = []
    for rep in range(args.hier_repeats):
        order += groups if rep % 2 == 0 else groups[::-1]  # drift in load hits every G alike
    walls: dict[int, list[float]] = {g: [] for g in groups}
    cpus: dict[int, list[float]] = {g: [] for g in groups}
    workers: list[Worker] = []
    capacity_before = parallel_capacity(os.cpu_count() or 1)
    with trunk_services(path, max(groups), args, root) as services:
        try:
            for i in range(args.clients):
                workers.append(Worker(i, path, args, root))  # one by one: a failed start stops the rest
            for w in workers:
                w.expect("loaded")
            for g in order:
                for i, w in enumerate(workers):
                    w.send(f"connect {services[i % g].address}")
                for w in workers:
                    w.expect("ready")
                trunk0 = sum(_cpu_s(s.proc.pid) for s in services)
                for w in workers:
                    w.send("go")
                spans = [tuple(map(float, w.expect("done"))) for w in workers]
                trunk_cpu = sum(_cpu_s(s.proc.pid) for s in services) - trunk0
                walls[g].append(max(end for _, end, _ in spans) - min(start for start, _, _ in spans))
                cpus[g].append(sum(cpu for _, _, cpu in spans) + trunk_cpu)
        finally:
            for w in workers:
                w.stop()
    med = {g: statistics.median(ws) for g, ws in walls.items()}
    base = med[groups[0]]
    print(f"hierarchical: model {args.hier_model}, {args.clients} client processes x {args.hier_steps} "
          f"steps of {args.hier_batch_size} x {args.hier_seq_len}, {args.threads} thread(s) per process; "
          f"client i -> replica i % G")  # fmt: skip
    capacity_after = parallel_capacity(os.cpu_count() or 1)
    cores = os.cpu_count()
    print(f"hierarchical note: this box has {cores} cores, shared with other users, so the speed-up is "
          f"capped near {cores}x whatever G is; {cores} concurrent 1-thread matmul processes did "
          f"{capacity_before:.2f}x (before) / {capacity_after:.2f}x (after) the work of one")  # fmt: skip
    for g in groups:
        cpu = statistics.median(cpus[g])
        print(f"hier_G{g}: wall_s {[round(w, 3) for w in walls[g]]} median {med[g]:.3f}  "
              f"cpu_s (clients + trunks) median {cpu:.2f}  cores_busy {cpu / med[g]:.2f}  "
              f"speedup_vs_G{groups[0]}: {base / med[g]:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny-llama (see docstring) or a folder")
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--n-tail", type=int, default=2)
    parser.add_argument("--tiny-layers", type=int, default=6, help="blocks of the cuttable tiny-llama")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed rounds (one step of each mode)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    parser.add_argument("--with-2t", action="store_true", help="add unsplit with 2 threads (see docstring)")
    parser.add_argument("--hier-model", default="tiny-llama")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--groups", default="1,2,4", help="trunk replica counts; the first is the base")
    parser.add_argument("--hier-steps", type=int, default=5, help="steps per client per G")
    parser.add_argument("--hier-batch-size", type=int, default=4)
    parser.add_argument("--hier-seq-len", type=int, default=128)
    parser.add_argument("--hier-repeats", type=int, default=3)
    parser.add_argument("--skip-hier", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client-index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-split-") as tmp:
        root = Path(tmp)
        timings, hidden = step_times(args, model_path(args.model, args.tiny_layers, root), root)
        ratio = report_steps(args, timings, hidden)
        if not args.skip_hier:
            hier_path = model_path(args.hier_model, args.tiny_layers, root)
            hierarchical(args, hier_path, root)
    print(f"bench_wall_s: {time.perf_counter() - start:.0f}")
    print(f"split_step_ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
