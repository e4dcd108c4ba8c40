import numpy as np
import pytest
import torch

from fedtune.errors import FedtuneError
from fedtune.federated.records import from_record, to_record, to_torch


def test_fp16_wire_halves_bytes_and_round_trips() -> None:
    state = {"x.lora_A.weight": torch.randn(8, 64), "x.lora_B.weight": torch.zeros(64, 8)}
    fp32 = to_record(state, "float32")
    fp16 = to_record(state, "float16")
    data32 = sum(len(a.data) for a in fp32.values())
    data16 = sum(len(a.data) for a in fp16.values())
    assert data32 >= 2 * 8 * 64 * 4  # two 512-value tensors at 4 bytes each
    assert data16 < data32 * 0.55  # half, plus numpy header overhead
    back = from_record(fp16)
    assert back["x.lora_A.weight"].dtype == np.float32
    np.testing.assert_allclose(back["x.lora_A.weight"], state["x.lora_A.weight"].numpy(), atol=2e-3)
    np.testing.assert_array_equal(from_record(fp32)["x.lora_A.weight"], state["x.lora_A.weight"].numpy())
    assert torch.equal(to_torch(from_record(fp32))["x.lora_B.weight"], state["x.lora_B.weight"])


def test_non_finite_update_is_refused() -> None:
    bad = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(FedtuneError, match="NaN or Inf"):
        from_record(to_record(bad, "float32"))
