import numpy as np
import pytest
import torch

from fedtune.errors import FedtuneError
from fedtune.federated.protocol import ProtocolError
from fedtune.federated.protocol.tensors import Tensor, pack, unpack
from fedtune.federated.records import from_record, shapes, to_record, to_torch


def test_fp16_wire_halves_bytes_and_round_trips() -> None:
    state = {"x.lora_A.weight": torch.randn(8, 64), "x.lora_B.weight": torch.zeros(64, 8)}
    fp32 = to_record(state, "float32")
    fp16 = to_record(state, "float16")
    data32 = sum(len(t.data) for t in unpack(fp32)[1])
    data16 = sum(len(t.data) for t in unpack(fp16)[1])
    assert data32 == 2 * 8 * 64 * 4  # two 512-value tensors at 4 bytes each
    assert data16 == data32 // 2
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
def test_blockwise_formats_pack_scales_and_codes_per_tensor(fmt: str, codes: int) -> None:
    # Prepare: two 8 x 64 tensors = 512 values = 8 blocks of 64 each
    state = {"x.lora_A.weight": torch.randn(8, 64), "x.lora_B.weight": torch.zeros(64, 8)}

    # Execute
    fmt_sent, tensors = unpack(to_record(state, fmt, 64))

    # Assert: the format names the block; each tensor keeps its shape; scale + 8 ratios + codes
    assert fmt_sent == f"{fmt}.b64"
    assert [(t.key, t.shape) for t in tensors] == [("x.lora_A.weight", (8, 64)), ("x.lora_B.weight", (64, 8))]
    assert [len(t.data) for t in tensors] == [4 + 2 * 8 + codes] * 2
    back = from_record(to_record(state, fmt, 64))
    assert back["x.lora_A.weight"].shape == (8, 64) and back["x.lora_A.weight"].dtype == np.float32
    np.testing.assert_array_equal(back["x.lora_B.weight"], np.zeros((64, 8)))


def test_float_formats_pack_the_raw_little_endian_values() -> None:
    state = {"w": np.array([1.0, -2.0], np.float32)}
    assert unpack(to_record(state, "float32"))[1][0].data == np.array([1.0, -2.0], "<f4").tobytes()
    assert unpack(to_record(state, "float16"))[1][0].data == np.array([1.0, -2.0], "<f2").tobytes()


def test_an_unknown_format_or_damaged_tensor_is_refused_naming_it() -> None:
    # Prepare
    good = unpack(to_record({"w": np.ones(4)}, "int8", 4))[1][0].data
    foreign = pack("int3.b4", [Tensor("m.lora_A.weight", (4,), good)])
    short = pack("int8.b4", [Tensor("m.lora_B.weight", (4,), good[:-1])])
    short_float = pack("float32", [Tensor("m.lora_B.weight", (4,), b"\0" * 15)])
    huge = pack("int8.b10000000000", [Tensor("w", (3,), good[:9])])

    # Execute / Assert
    with pytest.raises(ProtocolError, match=r"client 2: unknown wire format 'int3.b4'"):
        from_record(foreign, where="client 2")
    with pytest.raises(
        ProtocolError, match=r"'m.lora_B.weight': int8 data of 4 values .* 9 bytes, expected 10"
    ):
        from_record(short)
    with pytest.raises(
        ProtocolError, match=r"'m.lora_B.weight': float32 data of 4 values is 15 bytes, expected 16"
    ):
        from_record(short_float)
    with pytest.raises(ProtocolError, match=r"'w': wire block size must be in 1\.\.65536"):
        from_record(huge)  # refused before anything the size of the block is allocated
    with pytest.raises(FedtuneError, match="wire format 'int4' is unknown"):
        to_record({"w": np.ones(4)}, "int4")
    with pytest.raises(FedtuneError, match="'nf4' needs a block size"):
        to_record({"w": np.ones(4)}, "nf4")


def test_shapes_reads_the_header_only() -> None:
    record = to_record({"a": np.zeros((2, 3)), "b": np.zeros(5)}, "int8", 4)
    assert shapes(record) == {"a": (2, 3), "b": (5,)}


def test_a_delta_record_is_added_to_its_reference() -> None:
    # Prepare
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
