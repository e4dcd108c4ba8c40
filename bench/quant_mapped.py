"""After a quantised load, how much of the process's RSS is the still-mapped weight file.

Loads ``bench/quant.py --shape NAME``'s random Llama (built there first) with an nf4 base as
fedtune does, and prints ``/proc/self/status``'s VmRSS, RssAnon and RssFile (MiB) and the RSS of
the mappings of ``*.safetensors`` files: before loading, after it, and after ``gc.collect()``.
File-backed clean pages can be reclaimed by the kernel; private (anon) ones cannot.

``load_model`` copies a quantised base's unquantised tensors out of the mapping
(``models.quantize.release_weight_file``); ``--keep-mapped`` skips that, for comparison.

Usage: python bench/quant_mapped.py [--shape smollm2-1.7b] [--bits 4] [--keep-mapped]
Last line: ``safetensors_mapped_mib_after_gc: X``.
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import quant  # bench/quant.py: the shapes and their cache folders


def status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {
        k: int(re.search(k + r":\s+(\d+)", text).group(1)) // 1024 for k in ("VmRSS", "RssAnon", "RssFile")
    }  # type: ignore[union-attr]


def safetensors_mapped() -> int:
    """MiB of RSS in mappings of ``*.safetensors`` files."""
    total, current = 0, ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            current = line
        elif line.startswith("Rss:") and current.endswith(".safetensors"):
            total += int(line.split()[1])
    return total // 1024


def main() -> None:
    from fedtune.config import ModelConfig
    from fedtune.models.load import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-1.7b", choices=list(quant.SHAPES))
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument(
        "--keep-mapped",
        action="store_true",
        help="skip load_model's release_weight_file (as fedtune loaded before it existed)",
    )
    args = parser.parse_args()
    if args.keep_mapped:
        import fedtune.models.load

        fedtune.models.load.release_weight_file = lambda model: None  # type: ignore[assignment]
    name = str(quant.build_shape(args.shape))
    quantization = {"bits": 4, "kind": "nf4"} if args.bits == 4 else {"bits": 8}
    print("before load", status(), flush=True)
    fields = {"name": name, "device": "cpu", "dtype": "float32", "quantization": quantization}
    model = load_model(ModelConfig.model_validate(fields))
    print("after load", status(), "safetensors mapped MiB", safetensors_mapped(), flush=True)
    gc.collect()
    print("after gc", status(), "safetensors mapped MiB", safetensors_mapped(), flush=True)
    print(f"model parameters: {sum(p.numel() for p in model.parameters())}")
    print(f"safetensors_mapped_mib_after_gc: {safetensors_mapped()}")


if __name__ == "__main__":
    main()
