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
  counter is reset between the two phases through ``/proc/self/clear_refs``);
- step time: the mean of those steps after the first (batch ``--batch`` x ``--seq`` random tokens).

Usage: python bench/quant.py [--steps 3] [--batch 4] [--seq 128] [--threads 2]
Last line: ``nf4_weight_memory_over_fp32: X`` (goal: <= 0.35).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

VARIANTS = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"dtype": "float32", "quantization": {"bits": 8}},
    "nf4": {"dtype": "float32", "quantization": {"bits": 4, "kind": "nf4"}},
}
MIB = 2**20


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


def measure(variant: str, steps: int, batch: int, seq: int, threads: int) -> dict[str, float]:
    """One variant, in this process: weight memory, load and step peaks, step time."""
    import torch

    from fedtune.config import LoraConfig, ModelConfig
    from fedtune.models.adapters import attach_lora
    from fedtune.models.load import load_model

    torch.set_num_threads(threads)
    cfg = ModelConfig.model_validate({"name": "smollm2", "device": "cpu", **VARIANTS[variant]})
    cfg = cfg.model_copy(update={"lora": LoraConfig(r=8, alpha=16, dropout=0.0)})
    load_model(cfg.model_copy(update={"name": "tiny-llama"}))  # warm up lazy imports and kernels
    _reset_peak()
    before = _status_kib("VmRSS")
    with AnonPeak() as anon:
        base = load_model(cfg)
    load_peak = _status_kib("VmHWM") - before
    weights = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
    loaded = {
        "weights_mib": weights / MIB,
        "load_peak_mib": load_peak / 1024,
        "load_anon_peak_mib": (anon.peak - anon.before) / 1024,
    }
    if steps == 0:
        return loaded
    model = attach_lora(base, cfg.lora, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    model.train()
    _reset_peak()
    before = _status_kib("VmRSS")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    step_peak = _status_kib("VmHWM") - before
    return {
        **loaded,
        "step_peak_mib": step_peak / 1024,
        "step_s": sum(times[1:]) / max(1, len(times) - 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=list(VARIANTS), help="measure one variant (the child process)")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.steps, args.batch, args.seq, args.threads)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, *map(str, ["--steps", args.steps])]
        cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    fp32 = results["fp32"]["weights_mib"]
    print(f"SmolLM2-135M, CPU, LoRA r=8 on q/k/v/o, batch {args.batch} x {args.seq}, {args.threads} threads")
    print(
        f"{'base':6} {'weights MiB':>12} {'/fp32':>6} {'load peak MiB':>14} {'/fp32 w':>8} "
        f"{'step peak MiB':>14} {'step s':>7}"
    )
    for name, r in results.items():
        print(
            f"{name:6} {r['weights_mib']:12.1f} {r['weights_mib'] / fp32:6.3f} {r['load_peak_mib']:14.1f} "
            f"{r['load_peak_mib'] / fp32:8.3f} {r['step_peak_mib']:14.1f} {r['step_s']:7.2f}"
        )
    print(f"nf4_weight_memory_over_fp32: {results['nf4']['weights_mib'] / fp32:.3f}")


if __name__ == "__main__":
    main()
