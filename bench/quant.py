"""SmolLM2-135M on the CPU with its base at fp32, bf16, int8 and nf4 (``model.quantization``).

Each variant runs in its own process (so one's memory does not hide in another's), loading
the model exactly as fedtune does (``fedtune.models.load.load_model`` + ``attach_lora``), and
reports:

- weight memory: the bytes of the model's parameters and buffers after loading (nf4 weights
  are packed two to a byte, plus their blocks' scales);
- load peak: the process's peak RSS while loading, above its RSS just before (imports done);
  the goal is that a quantised load never holds the whole fp32 model at once
  (load peak <= fp32 weight memory + 20 %);
  RSS counts the pages of the memory-mapped safetensors file too, so the private part
  (``RssAnon``, sampled every 5 ms) is reported beside it (``--variant V --steps 0``: that
  figure for one variant, without training);
- step peak: the peak RSS of ``--steps`` LoRA steps above the RSS before them (the peak
  counter is reset between the two phases through ``/proc/self/clear_refs``), and the step
  total: that peak above the RSS before loading (weights and step together). Before the
  steps every variant's float tensors are in private memory (``load_model`` copies a quantised
  base's unquantised ones, ``models.quantize.release_weight_file``; the bench does the same for
  fp32 and bf16), so the weight file's mapped pages count for no variant and every variant's
  weights count in full;
- step time: the mean of those steps after the first (batch ``--batch`` x ``--seq`` random tokens);
- held-out loss: then, on the same loaded base, the federation of ``--config`` (the demo:
  3 rounds x 8 chatterbot clients x 4 steps, batch 4, lr 5e-4) run in this process: every
  round each client starts from the global adapter and trains with fedtune's own
  ``training.local.train`` and per-client seed, its adapter goes through the wire dtype
  (float16 in the demo) and FedAvg weighs the clients by their examples, as the Flower run
  does; the final adapter's loss is the token-weighted loss over all clients' test splits
  (the base's loss before training beside it). Same seed, data and steps for every base;
  ``--rounds R`` shortens the run (0: skip it). The goal: within 2 % of fp32.

The step total (the peak RSS of the steps above the RSS before loading: weights and step
together) is printed over fp32's for int8 and nf4; the goal, on a model whose weights dominate
the step, is nf4 <= 0.5 of fp32. SmolLM2-135M is no such model (its 49k-word logits dominate),
so ``--shape NAME`` (a name of ``SHAPES``: SmolLM2-360M's or SmolLM2-1.7B's real configuration)
runs the memory and time part on a *random* Llama of that shape with SmolLM2's tokenizer, built
once into ``~/.cache/fedtune/bench/`` (seeded, safetensors, built in a temporary folder and
renamed). Random weights are a fair stand-in for memory and time: neither depends on the
weights' values, only on their shapes and dtypes. The held-out loss is skipped (``--rounds 0``;
a loss of random weights means nothing), and the defaults become 2 steps of batch 1 x 64 (an
fp32 step of the 1.7B shape takes well under a minute on 2 cores).

Usage: python bench/quant.py [--steps 3] [--batch 4] [--seq 128] [--threads 2]
       [--config configs/demo.toml] [--rounds R] [--shape NAME]
Last line: ``nf4_weight_memory_over_fp32: X`` (goal: <= 0.35); with ``--shape``,
``nf4_step_peak_over_fp32: X`` (goal: <= 0.5).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedtune.config import Config

VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"dtype": "float32", "quantization": {"bits": 8}},
    "nf4": {"dtype": "float32", "quantization": {"bits": 4, "kind": "nf4"}},
}
MIB = 2**20
# the real configurations of SmolLM2-360M and SmolLM2-1.7B (their config.json on the Hub),
# as LlamaConfig fields; both share SmolLM2's 49,152-word vocabulary and tie their embeddings
SMOLLM2_VOCAB = {"vocab_size": 49152, "tie_word_embeddings": True}
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-360m": {
        **SMOLLM2_VOCAB,
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
    },
    "smollm2-1.7b": {
        **SMOLLM2_VOCAB,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
}


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM, RssAnon) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class AnonPeak:
    """The peak of ``RssAnon`` (private memory: not the memory-mapped weight files) over a block,
    sampled every 5 ms by a thread."""

    def __enter__(self) -> AnonPeak:
        self.before = self.peak = _status_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _status_kib("RssAnon"))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kib("RssAnon"))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM) to the current RSS


def shape_dir(name: str) -> Path:
    """The cache folder of ``SHAPES[name]``'s random Llama (built by :func:`build_shape`)."""
    from fedtune.models.load import cache_dir

    return cache_dir() / "bench" / f"random-{name}-v1"


def _build_shape(name: str) -> None:
    from fedtune.io import atomic_folder
    from fedtune.models.load import build_random_llama

    with atomic_folder(shape_dir(name), replace=False) as tmp:
        build_random_llama(tmp, **SHAPES[name])


def build_shape(name: str) -> Path:
    """``SHAPES[name]``'s random Llama folder, built once, in a child process (so that none of
    the builder's memory is left in this one while the variants run)."""
    target = shape_dir(name)
    if not target.is_dir():
        print(f"# building a random Llama of {name}'s shape into {target} (once)", flush=True)
        proc = multiprocessing.get_context("spawn").Process(target=_build_shape, args=(name,))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"building {target} failed (exit code {proc.exitcode})")
    return target


def heldout_loss(model: Any, cfg: Config, rounds: int) -> dict[str, float]:
    """``rounds`` of ``cfg``'s federation (all clients each round, FedAvg) run in this process
    on ``model`` (base + LoRA); the union held-out loss before and after, and the time taken."""
    import numpy as np
    import torch

    from fedtune.data.pipeline import client_tokenized, partitions
    from fedtune.federated.aggregation.fedavg import fedavg
    from fedtune.federated.task import client_seed
    from fedtune.models.adapters import adapter_state, initial_adapter_state, load_adapter_state
    from fedtune.models.load import load_tokenizer
    from fedtune.training.local import evaluate, train

    start = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    data = [client_tokenized(cfg, tokenizer, pid) for pid in range(len(partitions(cfg)))]
    if cfg.fed.wire_dtype not in ("float16", "float32"):
        raise SystemExit(f"{cfg.fed.wire_dtype=}: this bench sends the adapter as float16 or float32 only")
    wire = getattr(torch, cfg.fed.wire_dtype)

    def union() -> float:
        results = [evaluate(model, test, tokenizer, cfg.train.eval_batch_size) for _, test in data]
        return float(sum(r.loss * r.num_tokens for r in results) / sum(r.num_tokens for r in results))

    state = initial_adapter_state(cfg.model, seed=cfg.seed)
    load_adapter_state(model, state)
    before = union()
    for server_round in range(1, rounds + 1):
        replies, weights = [], []
        for pid, (train_ds, _) in enumerate(data):
            load_adapter_state(model, state)
            result = train(
                model, train_ds, tokenizer, cfg.train, seed=client_seed(cfg.seed, server_round, pid)
            )
            replies.append({k: v.to(wire).float().numpy() for k, v in adapter_state(model).items()})
            weights.append(result.num_examples)
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in fedavg(replies, weights).items()}
    load_adapter_state(model, state)
    return {"loss_before": before, "loss_after": union(), "fed_s": time.perf_counter() - start}


def _timed_steps(model: Any, steps: int, batch: int, seq: int) -> tuple[int, list[float]]:
    """``steps`` AdamW steps of ``model``'s trainable (LoRA) weights on random tokens: the peak
    RSS (KiB) over them, with the peak counter reset just before, and each step's seconds."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    model.train()
    _reset_peak()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    return _status_kib("VmHWM"), times


def measure(
    variant: str,
    steps: int,
    batch: int,
    seq: int,
    threads: int,
    config: str,
    rounds: int | None,
    name: str | None = None,
) -> dict[str, float]:
    """One variant, in this process: weight memory, load and step peaks, step time, held-out loss
    (of ``config``'s model, or of the model folder ``name``)."""
    import torch

    from fedtune.config import LoraConfig, ModelConfig, load_config
    from fedtune.models.adapters import attach_lora
    from fedtune.models.load import load_model
    from fedtune.models.quantize import is_quantized, release_weight_file

    torch.set_num_threads(threads)
    fed_cfg = load_config(config)
    model_fields = {**fed_cfg.model.model_dump(), "device": "cpu", **VARIANTS[variant]}
    if name is not None:
        model_fields["name"] = name
    fed_cfg = fed_cfg.model_copy(update={"model": ModelConfig.model_validate(model_fields)})
    cfg = fed_cfg.model.model_copy(update={"lora": LoraConfig(r=8, alpha=16, dropout=0.0)})
    load_model(cfg.model_copy(update={"name": "tiny-llama"}))  # warm up lazy imports and kernels
    _reset_peak()
    before_load = _status_kib("VmRSS")
    with AnonPeak() as anon:
        base = load_model(cfg)
    load_peak = _status_kib("VmHWM") - before_load
    weights = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
    loaded = {
        "params": sum(p.numel() for p in base.parameters()),  # nf4: packed, two weights a number
        "weights_mib": weights / MIB,
        "load_peak_mib": load_peak / 1024,
        "load_anon_peak_mib": (anon.peak - anon.before) / 1024,
    }
    if steps == 0:  # no timed steps: the held-out loss (unless --rounds 0) on the fresh base
        if rounds == 0:
            return loaded
        fresh = attach_lora(base, fed_cfg.model.lora, seed=fed_cfg.seed)
        return {**loaded, **heldout_loss(fresh, fed_cfg, fed_cfg.fed.rounds if rounds is None else rounds)}
    if not is_quantized(base):  # load_model already released a quantised base's weight file
        release_weight_file(base)
    gc.collect()
    model = attach_lora(base, cfg.lora, seed=0)
    before_steps = _status_kib("VmRSS")
    peak, times = _timed_steps(model, steps, batch, seq)
    out = {
        **loaded,
        "step_peak_mib": (peak - before_steps) / 1024,
        "step_total_mib": (peak - before_load) / 1024,
        "step_s": sum(times[1:]) / max(1, len(times) - 1),
    }
    if rounds == 0:
        return out
    # the demo's own adapter (its rank, alpha, dropout, targets) on the same loaded base
    model = model.unload()
    fed_model = attach_lora(model, fed_cfg.model.lora, seed=fed_cfg.seed)
    return {**out, **heldout_loss(fed_model, fed_cfg, fed_cfg.fed.rounds if rounds is None else rounds)}


def print_table(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    fp32 = results["fp32"]
    w, total = fp32["weights_mib"], fp32["step_total_mib"]
    model = "SmolLM2-135M"
    if args.shape:
        model = f"random Llama of {args.shape}'s shape ({fp32['params'] / 1e9:.2f}B parameters)"
    print(
        f"{model}, CPU, LoRA r=8 on q/k/v/o, {args.steps} steps of batch {args.batch} x {args.seq}, "
        f"{args.threads} threads"
    )
    print(
        f"{'base':6} {'weights MiB':>12} {'/fp32':>6} {'load peak MiB':>14} {'/fp32 w':>8} "
        f"{'step peak MiB':>14} {'step total MiB':>15} {'/fp32':>6} {'step s':>7}"
    )
    for name, r in results.items():
        print(
            f"{name:6} {r['weights_mib']:12.1f} {r['weights_mib'] / w:6.3f} {r['load_peak_mib']:14.1f} "
            f"{r['load_peak_mib'] / w:8.3f} {r['step_peak_mib']:14.1f} {r['step_total_mib']:15.1f} "
            f"{r['step_total_mib'] / total:6.3f} {r['step_s']:7.2f}"
        )
    print(
        "step peak: the steps' peak RSS above the RSS before them; step total: above the RSS "
        "before loading (weights and step)"
    )
    if "loss_after" not in fp32:
        return
    rounds = "the config's rounds" if args.rounds is None else f"{args.rounds} rounds"
    print(f"\nheld-out loss (union of the clients' test splits), {args.config}, {rounds}, in-process FedAvg")
    print(f"{'base':6} {'before':>8} {'after':>8} {'/fp32-1':>8} {'within 2%':>10} {'fed s':>7}")
    for name, r in results.items():
        rel = r["loss_after"] / fp32["loss_after"] - 1
        print(
            f"{name:6} {r['loss_before']:8.4f} {r['loss_after']:8.4f} {rel:+8.2%} "
            f"{abs(rel) <= 0.02!s:>10} {r['fed_s']:7.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        type=int,
        help="LoRA steps timed (0: none; the held-out loss on the fresh base); default 3 (--shape: 2)",
    )
    parser.add_argument("--batch", type=int, help="default 4 (--shape: 1)")
    parser.add_argument("--seq", type=int, help="default 128 (--shape: 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", default=str(Path(__file__).parent.parent / "configs" / "demo.toml"))
    parser.add_argument(
        "--rounds", type=int, help="federated rounds for the held-out loss (unset: the config's)"
    )
    parser.add_argument(
        "--shape", choices=list(SHAPES), help="a random Llama of this shape instead of SmolLM2-135M (no loss)"
    )
    parser.add_argument("--variant", choices=list(VARIANTS), help="measure one variant (the child process)")
    args = parser.parse_args()
    defaults = {"steps": 2, "batch": 1, "seq": 64} if args.shape else {"steps": 3, "batch": 4, "seq": 128}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.shape:
        if args.rounds not in (None, 0):
            parser.error("--shape: random weights have no meaningful held-out loss (--rounds 0 only)")
        args.rounds = 0
    if args.variant:
        name = str(shape_dir(args.shape)) if args.shape else None
        result = measure(
            args.variant, args.steps, args.batch, args.seq, args.threads, args.config, args.rounds, name
        )
        print(json.dumps(result))
        return
    if args.shape:
        build_shape(args.shape)
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)]
        cmd += ["--config", args.config, "--batch", str(args.batch), "--seq", str(args.seq)]
        cmd += ["--threads", str(args.threads)]
        cmd += [] if args.rounds is None else ["--rounds", str(args.rounds)]
        cmd += ["--shape", args.shape] if args.shape else []
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"# {variant}: {json.dumps(results[variant])}", flush=True)
    print_table(results, args)
    fp32 = results["fp32"]
    weight_line = f"nf4_weight_memory_over_fp32: {results['nf4']['weights_mib'] / fp32['weights_mib']:.3f}"
    step_lines = [
        f"{v}_step_peak_over_fp32: {results[v]['step_total_mib'] / fp32['step_total_mib']:.3f}"
        for v in ("int8", "nf4")
    ]
    print("\n".join([weight_line, *step_lines] if args.shape else [*step_lines, weight_line]))


if __name__ == "__main__":
    main()
