"""A client's reply: delta-coded under int8 / nf4, error feedback across rounds, float16 as before."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.federated.protocol import Instruction, Job
from fedtune.federated.quantize import max_error
from fedtune.federated.records import from_record, to_record
from fedtune.federated.task import NodeData, Task, delta_coded
from fedtune.federated.uplink import encode_reply, load_residual, save_residual, with_feedback
from fedtune.rundir import residual_file

START = {
    "m.lora_A.weight": np.array([[1.0, -2.0, 0.5]], np.float32),
    "m.lora_B.weight": np.zeros((2, 1), np.float32),
}


def _task(tmp_path: Path, *overrides: str, server_round: int = 1, **fields) -> Task:
    cfg = load_config("configs/tiny.toml", list(overrides))
    adapter = to_record(START, cfg.fed.wire_dtype, cfg.fed.wire_block)
    inst = Instruction(job=Job.PLAIN, server_round=server_round, config=cfg, adapter=adapter, **fields)
    return Task(inst, cfg, NodeData(0), tmp_path, 0.0)


def _trained(update_a: list[float], update_b: list[float]) -> dict[str, torch.Tensor]:
    return {
        "m.lora_A.weight": torch.tensor([update_a]) + torch.from_numpy(START["m.lora_A.weight"]),
        "m.lora_B.weight": torch.tensor(update_b).reshape(2, 1),
    }


def test_error_feedback_sums_track_the_true_updates_by_hand() -> None:
    # Prepare: every round the same update [1.0, 0.003] in one int8 block (scale 1.0, step 1/127);
    # alone, 0.003 x 127 = 0.38 rounds to 0 every round
    update = {"w": np.array([1.0, 0.003], np.float32)}
    residual, sent = None, []

    # Execute: four rounds, the residual carried
    for _ in range(4):
        record, residual = with_feedback(update, residual, "int8", 2)
        sent.append(from_record(record)["w"][1])
    plain = from_record(with_feedback(update, None, "int8", 2)[0])["w"][1]

    # Assert: carried 0.003 -> code 0; 0.006 -> 1 (0.7874e-2); 0.001126 -> 0; 0.004126 -> 1
    assert plain == 0.0
    np.testing.assert_allclose(sent, [0.0, 1 / 127, 0.0, 1 / 127], rtol=1e-6)
    np.testing.assert_allclose(residual["w"], [0.0, 4 * 0.003 - 2 / 127], atol=1e-8)  # -0.003748
    assert abs(sum(sent) - 4 * 0.003) <= 1 / 254  # the sums differ by the last residual only


def test_error_feedback_over_many_rounds_keeps_the_sum_within_one_step() -> None:
    # Prepare: 20 random updates of a 100-value tensor in nf4
    rng = np.random.default_rng(1)
    updates = [{"w": rng.normal(size=100).astype(np.float32) * 1e-3} for _ in range(20)]
    residual, total_sent, plain_sent = None, np.zeros(100), np.zeros(100)

    # Execute
    for u in updates:
        record, residual = with_feedback(u, residual, "nf4", 64)
        total_sent += from_record(record)["w"]
        plain_sent += from_record(to_record(u, "nf4", 64))["w"]
    true = sum(u["w"].astype(np.float64) for u in updates)

    # Assert: with feedback the sum is off by the last residual (one rounding); without, by 20
    np.testing.assert_allclose(total_sent + residual["w"], true, atol=1e-9)
    assert np.abs(residual["w"]).max() <= max_error(updates[-1]["w"] + residual["w"], "nf4", 64).max() * 2
    assert np.abs(total_sent - true).max() < 0.5 * np.abs(plain_sent - true).max()


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_blockwise_reply_is_the_update_against_the_decoded_start(tmp_path: Path, fmt: str) -> None:
    # Prepare: an update far smaller than the adapter (1e-4 against 2.0)
    task = _task(tmp_path, f"fed.wire_dtype='{fmt}'")
    trained = _trained([1e-4, -1e-4, 2e-4], [3e-4, 0.0])
    start = from_record(task.inst.adapter)

    # Execute
    record = encode_reply(task, trained)

    # Assert: the reply decodes to trained - start within the update's own rounding
    assert delta_coded(task)
    got = from_record(record)
    for k, v in trained.items():
        true = v.numpy() - start[k]
        assert (np.abs(got[k] - true) <= max_error(true, fmt, 64)).all()
    assert np.abs(got["m.lora_A.weight"]).max() > 1e-4  # not rounded away
    assert not list(tmp_path.iterdir())  # no error feedback: nothing kept


def test_float16_reply_is_the_trained_adapter_as_before(tmp_path: Path) -> None:
    # Prepare
    task = _task(tmp_path)
    trained = _trained([1e-4, -1e-4, 2e-4], [3e-4, 0.0])

    # Execute
    record = encode_reply(task, trained)

    # Assert: bit for bit what to_record always sent
    assert not delta_coded(task)
    expected = to_record(trained, "float16")
    assert [a.data for a in record.values()] == [a.data for a in expected.values()]


def test_dp_and_secagg_replies_stay_float32_and_absolute(tmp_path: Path) -> None:
    # Prepare
    trained = _trained([0.1, 0.2, 0.3], [0.4, 0.5])
    dp = _task(tmp_path, "fed.wire_dtype='int8'", clip_norm=1.0)
    secagg = _task(tmp_path, "fed.wire_dtype='nf4'", secagg=True)

    # Execute / Assert
    for task in (dp, secagg):
        assert not delta_coded(task)
        got = from_record(encode_reply(task, trained))
        np.testing.assert_array_equal(got["m.lora_A.weight"], trained["m.lora_A.weight"].numpy())


def test_error_feedback_keeps_the_residual_per_round_on_the_clients_disk(tmp_path: Path) -> None:
    # Prepare
    on = ("fed.wire_dtype='int8'", "fed.error_feedback=true")
    trained = _trained([1e-4, -1e-4, 2e-4], [3e-4, 1e-6])

    # Execute: rounds 1 and 2; round 2 again, as a run resumed after round 1 does; round 3
    records = {r: encode_reply(_task(tmp_path, *on, server_round=r), trained) for r in (1, 2)}
    again = encode_reply(_task(tmp_path, *on, server_round=2), trained)
    encode_reply(_task(tmp_path, *on, server_round=3), trained)

    # Assert: the resumed round 2 sent what round 2 did (it read round 1's residual, not its own);
    # one file per round, the last two kept
    assert [a.data for a in again.values()] == [a.data for a in records[2].values()]
    first = from_record(records[1])["m.lora_B.weight"]
    assert from_record(records[2])["m.lora_B.weight"].tolist() != first.tolist()  # the residual added
    assert [p.name for p in sorted((tmp_path / "0").iterdir())] == [
        "residual-0002.safetensors",
        "residual-0003.safetensors",
    ]
    assert residual_file(tmp_path, 0, 3).is_file()


def test_residual_files_round_trip_and_a_missing_start_is_refused(tmp_path: Path) -> None:
    # Prepare
    residual = {"w": np.array([0.5, -0.25], np.float32)}

    # Execute
    save_residual(tmp_path, 4, 7, residual)

    # Assert
    np.testing.assert_array_equal(load_residual(tmp_path, 4, before_round=8)["w"], residual["w"])
    assert load_residual(tmp_path, 4, before_round=7) is None
    task = _task(tmp_path, "fed.wire_dtype='int8'")
    with pytest.raises(FedtuneError, match="lacks 1 keys"):
        encode_reply(task, {**_trained([0, 0, 0], [0, 0]), "m.other": torch.zeros(1)})
