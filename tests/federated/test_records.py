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


@pytest.mark.parametrize(("fmt", "codes"), [("int8", 512), ("nf4", 256)])
def test_blockwise_formats_are_one_array_per_tensor(fmt: str, codes: int) -> None:
    # Prepare: two 8 x 64 tensors = 512 values = 8 blocks of 64 each
    state = {"x.lora_A.weight": torch.randn(8, 64), "x.lora_B.weight": torch.zeros(64, 8)}

    # Execute
    record = to_record(state, fmt, 64)

    # Assert: the original shape, the format and block in stype; scale + 8 ratios + codes
    assert list(record) == list(state)
    for array in record.values():
        assert array.stype == f"fedtune.{fmt}.b64" and array.dtype == "float32"
        assert len(array.data) == 4 + 2 * 8 + codes
    assert record["x.lora_A.weight"].shape == (8, 64) and record["x.lora_B.weight"].shape == (64, 8)
    assert record.count_bytes() == 2 * (4 + 16 + codes) + len("x.lora_A.weight") + len("x.lora_B.weight")
    back = from_record(record)
    assert back["x.lora_A.weight"].shape == (8, 64) and back["x.lora_A.weight"].dtype == np.float32
    np.testing.assert_array_equal(back["x.lora_B.weight"], np.zeros((64, 8)))


def test_an_unknown_or_damaged_array_is_refused_naming_its_key() -> None:
    # Prepare
    from flwr.app import Array, ArrayRecord

    from fedtune.federated.protocol import ProtocolError

    good = to_record({"w": np.ones(4)}, "int8", 4)["w"]
    foreign = ArrayRecord({"m.lora_A.weight": Array("float32", (4,), "fedtune.int3.b4", good.data)})
    short = ArrayRecord({"m.lora_B.weight": Array("float32", (4,), "fedtune.int8.b4", good.data[:-1])})

    # Execute / Assert
    with pytest.raises(ProtocolError, match=r"'m.lora_A.weight': unknown wire format 'fedtune.int3.b4'"):
        from_record(foreign)
    with pytest.raises(
        ProtocolError, match=r"'m.lora_B.weight': int8 data of 4 values .* 9 bytes, expected 10"
    ):
        from_record(short)
    huge = ArrayRecord({"w": Array("float32", (3,), "fedtune.int8.b10000000000", good.data[:9])})
    with pytest.raises(ProtocolError, match=r"'w': wire block size must be in 1\.\.65536"):
        from_record(huge)  # refused before anything the size of the block is allocated
    with pytest.raises(FedtuneError, match="wire format 'int4' is unknown"):
        to_record({"w": np.ones(4)}, "int4")
    with pytest.raises(FedtuneError, match="'nf4' needs a block size"):
        to_record({"w": np.ones(4)}, "nf4")


def test_a_delta_record_is_added_to_its_reference() -> None:
    # Prepare
    from fedtune.federated.protocol import ProtocolError

    reference = {"a": np.array([1.0, 2.0], np.float32), "b": np.array([[0.5]], np.float32)}
    update = to_record({"a": np.array([0.25, -0.5]), "b": np.array([[0.0]])}, "float32")

    # Execute
    got = from_record(update, delta_of=reference)

    # Assert
    np.testing.assert_array_equal(got["a"], [1.25, 1.5])
    np.testing.assert_array_equal(got["b"], [[0.5]])
    with pytest.raises(ProtocolError, match="client 3: the update's keys differ"):
        from_record(update, delta_of={"a": reference["a"]}, where="client 3")
    with pytest.raises(
        ProtocolError, match=r"client 3: update 'a' has shape \(2,\), the adapter sent \(3,\)"
    ):
        from_record(update, delta_of={**reference, "a": np.zeros(3)}, where="client 3")
