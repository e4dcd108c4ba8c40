"""``bench/quant.py``'s shape table: each shape is the real model's size."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

_spec = importlib.util.spec_from_file_location(
    "bench_quant", Path(__file__).parents[2] / "bench" / "quant.py"
)
assert _spec is not None and _spec.loader is not None
quant = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quant)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        # embeddings 49152 x 960 = 47,185,920 (tied: lm_head shares them);
        # a layer: q, o 960 x 960 and k, v 960 x 320 (5 kv heads of 960 / 15 = 64) = 2,457,600,
        # gate/up/down 3 x 960 x 2560 = 7,372,800, two norms 1,920: 9,832,320, x 32 layers;
        # the final norm 960: 361,821,120 (SmolLM2-360M's published size, 362M)
        ("smollm2-360m", 47_185_920 + 32 * 9_832_320 + 960),
        # embeddings 49152 x 2048 = 100,663,296; a layer: 4 x 2048 x 2048 = 16,777,216
        # (32 kv heads: no grouping), 3 x 2048 x 8192 = 50,331,648, norms 4,096: 67,112,960,
        # x 24; the final norm 2,048: 1,711,376,384 (SmolLM2-1.7B's, 1.71B)
        ("smollm2-1.7b", 100_663_296 + 24 * 67_112_960 + 2_048),
    ],
)
def test_shape_has_the_real_models_parameter_count(name: str, params: int) -> None:
    with torch.device("meta"):  # shapes only: no memory, no time
        model = LlamaForCausalLM(LlamaConfig(**quant.SHAPES[name]))

    assert sum(p.numel() for p in model.parameters()) == params
