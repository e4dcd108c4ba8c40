"""LoRA steps of SmolLM2-135M on a CUDA GPU: full precision vs a 4-bit (nf4) base.

Run on a machine with an accelerator; elsewhere it says so and exits 0 (CI never has a GPU).
For each base it loads the model as fedtune does (``model.device = "cuda"``), runs ``--steps``
LoRA steps of ``--batch`` x ``--seq`` random tokens and reports the mean step time (after the
first) and the peak GPU memory allocated by torch during those steps.

Usage: python bench/gpu.py [--steps 10] [--batch 8] [--seq 256]
Last line: ``gpu_nf4_step_memory_over_fp32: X`` (or ``gpu_nf4_step_memory_over_fp32: skipped``).
"""

from __future__ import annotations

import argparse
import time

import torch

VARIANTS = {
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "nf4": {"dtype": "bfloat16", "quantization": {"bits": 4, "kind": "nf4", "compute_dtype": "bfloat16"}},
}


def measure(variant: str, steps: int, batch: int, seq: int) -> tuple[float, float]:
    """(mean step seconds, peak MiB allocated during the steps) of one variant on cuda:0."""
    from fedtune.config import LoraConfig, ModelConfig
    from fedtune.models.adapters import attach_lora
    from fedtune.models.load import load_model

    cfg = ModelConfig.model_validate({"name": "smollm2", "device": "cuda", **VARIANTS[variant]})
    model = attach_lora(load_model(cfg), LoraConfig(r=8, alpha=16, dropout=0.0), seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model, opt
    torch.cuda.empty_cache()
    return sum(times[1:]) / max(1, len(times) - 1), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: the GPU bench is skipped (run it on a machine with one)")
        print("gpu_nf4_step_memory_over_fp32: skipped")
        return
    print(f"{torch.cuda.get_device_name(0)}; SmolLM2-135M, LoRA r=8, batch {args.batch} x {args.seq}")
    results = {v: measure(v, args.steps, args.batch, args.seq) for v in VARIANTS}
    for name, (step_s, peak) in results.items():
        print(f"{name:5} step {step_s:.3f} s  peak {peak:.0f} MiB")
    print(f"gpu_nf4_step_memory_over_fp32: {results['nf4'][1] / results['fp32'][1]:.3f}")


if __name__ == "__main__":
    main()
