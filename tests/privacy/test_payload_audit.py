"""Payload audit of every mode: what each client sends in a round, read back from every reply.

One round of configs/tiny.toml per mode runs through Flower's simulation runtime with a Grid
that records every message both ways. In every mode a reply holds only adapter tensors
(float, LoRA keys), counts and numeric metrics: no text of the clients' records, no token ids,
no labels. Under client-level DP the update in a reply (reply minus the adapter the client was
sent) is within the clip norm, plus the client's noise share where it adds one. The RAG and
split modes have their own audits (tests/federated/test_rag_payload.py,
tests/federated/test_split_payload.py); SecAgg+'s masked stages are audited in
tests/federated/test_secagg.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.serverapp import Grid, ServerApp

from federated.payload import ADAPTER_KEY, RecordingGrid, adapter_keys, leaks, needles
from fedtune.config import Config, load_config
from fedtune.data.pipeline import client_conversations
from fedtune.federated.protocol import read_instruction
from fedtune.federated.records import from_record
from fedtune.federated.server_app import run_federation
from fedtune.federated.simulation import run_server_app
from fedtune.privacy.dpfedavg import global_norm
from fedtune.rundir import RunDir

pytestmark = pytest.mark.integration  # a Flower simulation (Ray) per mode

DP = ("privacy.dp=true", "privacy.sampling='fixed'", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.05")
MODES = {
    "plain": (),
    "dp": DP,  # noise on the server
    # client noise shares, FF-LoRA's global adapter, FFA-LoRA's B only: one round for three modes
    "fflora-ffa-dp-client-noise": (
        *DP,
        "privacy.noise='client'",
        "fed.strategy='fflora'",
        "model.lora.freeze_a=true",
    ),
}


def _round(tmp: Path, overrides: tuple[str, ...]) -> tuple[Config, RecordingGrid]:
    cfg = load_config("configs/tiny.toml", [f"run.output_dir='{tmp}'", "fed.rounds=1", *overrides])
    recorded: list[RecordingGrid] = []
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        rec = RecordingGrid(grid)
        run_federation(rec, cfg, RunDir.create(cfg), progress=False)  # type: ignore[arg-type]
        recorded.append(rec)

    run_server_app(cfg, server)
    return cfg, recorded[0]


def _private_text(cfg: Config) -> set[str]:
    texts = set()
    for pid in range(cfg.partition.num_partitions):
        for ds in client_conversations(cfg, pid):
            texts |= {m["content"] for c in ds for m in c["messages"]}
    return needles(texts)


@pytest.fixture(scope="module", params=list(MODES))
def mode_round(request, tmp_path_factory) -> tuple[str, Config, RecordingGrid]:
    cfg, rec = _round(tmp_path_factory.mktemp(request.param), MODES[request.param])
    return request.param, cfg, rec


def test_replies_hold_adapters_counts_and_numbers_only(mode_round) -> None:
    mode, cfg, rec = mode_round
    kinds = [r.metadata.message_type for r in rec.replies]
    assert kinds.count(MessageType.TRAIN) >= 1 and kinds.count(MessageType.EVALUATE) >= 1, mode
    private = _private_text(cfg)
    for reply in rec.replies:
        assert not reply.has_error(), reply.error.reason
        assert set(reply.content.keys()) <= {"arrays", "metrics"}
        assert not any(isinstance(r, ConfigRecord) for r in reply.content.values())
        metrics = reply.content["metrics"]
        assert isinstance(metrics, MetricRecord) and all(isinstance(v, int | float) for v in metrics.values())
        if "arrays" in reply.content:
            arrays = reply.content["arrays"]
            assert isinstance(arrays, ArrayRecord) and reply.metadata.message_type == MessageType.TRAIN
            fmt, keys = adapter_keys(arrays)
            assert all(ADAPTER_KEY.search(k) and "personal" not in k for k in keys)  # no ids, no labels
            assert fmt in ("float16", "float32", "int8.b64", "nf4.b64")  # float values or their codes
        assert not leaks(reply, private), (mode, reply.metadata.message_type)


def _sent_to(rec: RecordingGrid, reply: Message) -> Message:
    (msg,) = [m for m in rec.sent if m.metadata.message_id == reply.metadata.reply_to_message_id]
    return msg


def test_under_dp_nothing_unclipped_leaves(mode_round) -> None:
    mode, cfg, rec = mode_round
    if not cfg.privacy.dp:
        pytest.skip("no client-level DP in this mode")
    train = [r for r in rec.replies if r.metadata.message_type == MessageType.TRAIN]
    for reply in train:
        inst = read_instruction(_sent_to(rec, reply))
        assert inst.clip_norm == cfg.privacy.clip_norm
        sent = from_record(reply.content["arrays"])
        start = from_record(inst.adapter)
        assert adapter_keys(reply.content["arrays"])[0] == "float32"  # exact values: the clip is checkable
        if cfg.model.lora.freeze_a:
            assert all(".lora_B." in k for k in sent)  # FFA-LoRA: only B leaves
        norm = global_norm({k: sent[k].astype(np.float64) - start[k] for k in sent})
        bound = cfg.privacy.clip_norm * (1 + 1e-5)
        if inst.noise_std is not None:  # plus the client's Gaussian share: ‖N(0, s²I_d)‖ ≈ s √d
            dims = sum(v.size for v in sent.values())
            bound += inst.noise_std * (math.sqrt(dims) + 8)
        assert norm <= bound, (mode, norm, bound)
        assert reply.content["metrics"]["unclipped"] in (0, 1)
