"""Client and trunk service across a real gRPC stream, the service in its own process.

The service process loads the same tiny Llama + LoRA the test builds (saved as a model folder and
a peft adapter folder), so a remote split step can be compared with the in-process one.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtune.split import cut_model, split_step
from fedtune.split import protocol as wire
from fedtune.split.client import TrunkClient, TrunkError, remote_split_step
from split.conftest import tiny_lora_model

pytestmark = pytest.mark.integration  # each test starts a trunk service process (seconds)

N_HEAD, N_TAIL, HIDDEN = 2, 2, 64  # the conftest Llama: 6 layers, 64 wide -> a 2-block trunk
LR = 1e-2  # large enough that one AdamW step visibly moves every trunk weight
STARTUP_S = 90.0
MAX_MIB = 1  # the service's message limit: a step of the test batch is 8 KiB, so 1 MiB is plenty


@dataclass
class TrunkProcess:
    proc: subprocess.Popen[bytes]
    address: str
    saved_trunk: Path
    log: Path

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait: the service saves its trunk adapter and exits 0."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"trunk service ignored SIGTERM\n{self.log.read_text()[-3000:]}") from None


def _save_model(root: Path) -> tuple[Path, Path]:
    """The conftest model as a base-model folder + a peft adapter folder, as a run would keep them."""
    peft_model = tiny_lora_model("llama")
    peft_model.save_pretrained(root / "adapter")
    copy.deepcopy(peft_model).unload().save_pretrained(root / "model")  # base weights, LoRA removed
    return root / "model", root / "adapter"


@contextlib.contextmanager
def trunk_process(root: Path) -> Iterator[TrunkProcess]:
    model_dir, adapter_dir = _save_model(root)
    ready, saved, log = root / "port", root / "trunk.safetensors", root / "trunk.log"
    settings = [
        f"model.name='{model_dir}'", f"split.n_head={N_HEAD}", f"split.n_tail={N_TAIL}", f"train.lr={LR}",
        "train.num_threads=1", f"split.max_message_mib={MAX_MIB}",
    ]  # fmt: skip
    cmd = [
        sys.executable, "-m", "fedtune", "serve-trunk", *[x for s in settings for x in ("--set", s)],
        "--adapter", str(adapter_dir), "--ready-file", str(ready), "--save-trunk", str(saved), "--grace", "1",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    handle = TrunkProcess(proc, "", saved, log)
    try:
        deadline = time.monotonic() + STARTUP_S
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"trunk service did not start\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        handle.address = f"127.0.0.1:{ready.read_text()}"
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[TrunkProcess]:
    with trunk_process(tmp_path_factory.mktemp("trunk")) as handle:
        yield handle


def _client_parts() -> tuple[torch.nn.Module, ...]:
    """The client's own copy of the model, cut: (head, trunk, tail); the trunk is for reference only."""
    return tuple(cut_model(tiny_lora_model("llama"), N_HEAD, N_TAIL))


def _lora_grads(*parts: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{n}": p.grad.clone()
        for i, part in enumerate(parts)
        for n, p in part.named_parameters()
        if "lora_" in n and p.grad is not None
    }


def test_remote_step_matches_in_process_split_step(tmp_path, batch):
    # Prepare: the reference runs all three parts here; the client keeps head and tail only
    ref_head, ref_trunk, ref_tail = _client_parts()
    head, _, tail = _client_parts()
    trunk_before = ref_trunk.adapter_state_dict()
    # Execute
    expected = split_step(ref_head, ref_trunk, ref_tail, batch)
    trunk_lora = [p for n, p in ref_trunk.named_parameters() if "lora_" in n]
    torch.optim.AdamW(trunk_lora, lr=LR, weight_decay=0.0).step()  # the service's defaults
    with trunk_process(tmp_path) as service:  # a service of its own: its trunk is the saved adapter
        with TrunkClient(service.address, HIDDEN) as client:
            result = remote_split_step(head, tail, client, batch)
            # the service stepped its optimiser after the BACKWARD: its trunk's new output ...
            h1 = ref_head(batch["input_ids"], batch["valid"]).detach()
            h2_remote = client.forward(h1, batch["valid"], train=False)
        assert service.stop() == 0
    with torch.no_grad():
        h2_expected = ref_trunk(h1, batch["valid"])
    saved = load_file(str(service.saved_trunk))  # ... and its weights, written at exit
    # Assert: loss and the client-side adapter gradients
    assert result.loss == pytest.approx(expected.loss, abs=1e-5)
    assert result.num_tokens == expected.num_tokens
    ref_grads, grads = _lora_grads(ref_head, ref_tail), _lora_grads(head, tail)
    assert sorted(grads) == sorted(ref_grads) and len(grads) == 2 * 2 * 7 * 2  # 2 blocks each, 7 targets, A+B
    for name, ref_grad in ref_grads.items():
        assert ref_grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref_grad, atol=1e-5, rtol=0, msg=name)
    # Assert: the trunk's LoRA update matches, seen through its output
    torch.testing.assert_close(h2_remote, h2_expected, atol=1e-5, rtol=0)
    moved = ref_trunk.adapter_state_dict()
    assert sorted(saved) == sorted(moved)
    for key, value in moved.items():
        assert not torch.equal(value, trunk_before[key]), key
        torch.testing.assert_close(saved[key], value, atol=1e-5, rtol=0, msg=key)


def test_payload_audit_only_float_activations_gradients_and_int64_counts(service, batch):
    # Prepare
    head, _, tail = _client_parts()
    # Execute
    with TrunkClient(service.address, HIDDEN, keep_wire=True) as client:
        for _ in range(2):
            remote_split_step(head, tail, client, batch)
    # Assert: what left the client, read back from its wire bytes
    b, t = batch["input_ids"].shape
    assert [m.kind for m in client.audit] == ["FORWARD", "BACKWARD"] * 2
    for message in client.audit:
        assert set(message.header) <= {"v", "kind", "step", "tensors", "train"}  # no free-form field
        for info in message.tensors:
            if info.name == "valid":
                assert (info.dtype, info.shape) == ("int64", (b,))
            else:
                assert info.name in ("hidden", "grad")
                assert info.dtype in ("float32", "float16", "bfloat16") and info.shape == (b, t, HIDDEN)
        assert message.wire is not None
        # neither the token ids nor the labels appear anywhere in the bytes, in any integer width
        for secret in (batch["input_ids"], batch["labels"]):
            for dtype in (torch.int64, torch.int32):
                for row in secret.to(dtype):
                    assert row.numpy().tobytes() not in message.wire
    # the counts are the only integers sent, and the client counted every byte both ways
    sent = [wire.decode(m.wire, wire.Limits(HIDDEN)) for m in client.audit if m.wire is not None]
    assert all(torch.equal(m.tensors["valid"], batch["valid"]) for m in sent if m.kind is wire.Kind.FORWARD)
    assert client.bytes_up == sum(m.nbytes for m in client.audit)
    assert client.bytes_down > 2 * 2 * b * t * HIDDEN * 4  # two steps of h2 and dL/dh1 in fp32


def test_malformed_message_gets_error_and_other_clients_keep_training(service, batch):
    # Prepare: two sessions open at once; the good one is mid-step when the bad one misbehaves
    head, _, tail = _client_parts()
    good = TrunkClient(service.address, HIDDEN)
    bad = TrunkClient(service.address, HIDDEN)
    valid = batch["valid"]
    try:
        h2 = good.forward(head(batch["input_ids"], valid).detach(), valid)
        # Execute: a wrongly shaped hidden state, a BACKWARD out of turn, a broken header
        wide = torch.randn(3, 10, HIDDEN + 1)
        replies = [
            bad.exchange(wire.encode(wire.forward(1, wide, valid), wire.Limits(HIDDEN + 1))),
            bad.exchange(wire.encode(wire.backward(9, torch.randn(3, 10, HIDDEN)), wire.Limits(HIDDEN))),
            bad.exchange(b"\x00\x00\x00\x02{"),
        ]
        grad_h1 = good.backward(torch.ones_like(h2))
        losses = [remote_split_step(head, tail, good, batch).loss for _ in range(2)]
        recovered = remote_split_step(head, tail, bad, batch).loss  # its stream outlived its errors
    finally:
        good.close()
        bad.close()
    # Assert
    assert [r.kind for r in replies] == [wire.Kind.ERROR] * 3
    assert "hidden: hidden size 65 != the model's 64" in replies[0].error
    assert "BACKWARD of step 9, awaiting none" in replies[1].error
    assert "header" in replies[2].error
    assert grad_h1.shape == h2.shape and bool(grad_h1.abs().sum() > 0)
    assert all(0 < loss < 100 for loss in [*losses, recovered])


def test_out_of_range_counts_get_error(service):
    with TrunkClient(service.address, HIDDEN) as client:
        data = wire.encode(
            wire.forward(1, torch.randn(3, 10, HIDDEN), torch.tensor([10, 7, 4])), client.limits
        )
        # counts patched after encoding, as a sender that bypasses the checks would: 4 -> 11
        bad = data[:-8] + torch.tensor([11]).numpy().tobytes()
        reply = client.exchange(bad)
    assert reply.kind is wire.Kind.ERROR and "valid: counts must lie in 1..10, got [10, 7, 11]" in reply.error


def test_oversized_message_gets_error_and_the_stream_lives(service, batch):
    # Prepare: 1 x 4097 x 64 fp32 is 1 MiB + 256 bytes, over the service's 1 MiB
    head, _, tail = _client_parts()
    with TrunkClient(service.address, HIDDEN) as client:  # the client's own limit is the default 256 MiB
        # Execute / Assert
        with pytest.raises(TrunkError, match=f"exceed the limit of {MAX_MIB * 2**20}"):
            client.forward(torch.zeros(1, 4097, HIDDEN), torch.tensor([4097]))
        loss = remote_split_step(head, tail, client, batch).loss
    assert 0 < loss < 100


def test_teardown_saves_the_trunk_and_leaves_no_process(service):
    # Execute
    rc = service.stop()
    # Assert
    assert rc == 0, service.log.read_text()[-3000:]
    with pytest.raises(ProcessLookupError):
        os.killpg(service.proc.pid, 0)  # nothing left in the service's process group
    saved = load_file(str(service.saved_trunk))
    trunk_keys = sorted(_client_parts()[1].adapter_state_dict())
    assert sorted(saved) == trunk_keys and all(torch.isfinite(v).all() for v in saved.values())
