"""The trunk service in this process (fast): TLS, sessions taking turns, a client vanishing mid-step."""

from __future__ import annotations

import datetime
import ipaddress
import threading
from collections.abc import Iterator

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedtune.split import cut_model, split_step
from fedtune.split.client import TrunkClient, remote_split_step
from fedtune.split.server import TrunkOptim, TrunkService, serve
from split.conftest import tiny_lora_model

HIDDEN = 64


def _self_signed() -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 and its key, PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune-trunk-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def parts():
    """(head, tail) on the client, a service running the trunk of an identical copy, and the reference."""
    reference = cut_model(tiny_lora_model("llama"), 2, 2)
    head, trunk, tail = cut_model(tiny_lora_model("llama"), 2, 2)
    return head, tail, TrunkService(trunk, TrunkOptim(step_every=0)), reference


@pytest.fixture
def running(parts) -> Iterator[tuple[str, TrunkService]]:
    service = parts[2]
    server, port = serve(service)
    yield f"127.0.0.1:{port}", service
    server.stop(0).wait()


def test_tls_session_gives_the_in_process_loss(parts, batch):
    # Prepare
    head, tail, service, (ref_head, ref_trunk, ref_tail) = parts
    cert, key = _self_signed()
    server, port = serve(service, tls=(cert, key))
    try:
        # Execute
        with TrunkClient(f"127.0.0.1:{port}", HIDDEN, tls_root_cert=cert) as client:
            loss = remote_split_step(head, tail, client, batch).loss
        # a plaintext client cannot talk to a TLS service
        with pytest.raises(ConnectionError, match=r"no connection within 1 s \(plaintext\)"):
            TrunkClient(f"127.0.0.1:{port}", HIDDEN, timeout_s=1)
    finally:
        server.stop(0).wait()
    # Assert
    assert loss == pytest.approx(split_step(ref_head, ref_trunk, ref_tail, batch).loss, abs=1e-5)


def test_a_client_that_hangs_up_mid_step_frees_the_trunk(running, parts, batch):
    # Prepare
    address, service = running
    head, tail = parts[0], parts[1]
    valid = batch["valid"]
    # Execute: the first client holds the trunk (forward done, no backward) and vanishes
    gone = TrunkClient(address, HIDDEN, timeout_s=10)
    gone.forward(head(batch["input_ids"], valid).detach(), valid)
    gone.close()
    with TrunkClient(address, HIDDEN, timeout_s=10) as client:
        loss = remote_split_step(head, tail, client, batch).loss
    # Assert
    assert 0 < loss < 100
    assert not service._lease.locked()


def test_concurrent_sessions_take_turns_and_accumulate_every_gradient(running, parts, batch):
    # Prepare: step_every=0, so the trunk's grads after N steps are N times one step's
    address, service = running
    _, _, _, (ref_head, ref_trunk, ref_tail) = parts
    split_step(ref_head, ref_trunk, ref_tail, batch)
    expected = {n: p.grad for n, p in ref_trunk.named_parameters() if "lora_" in n}
    errors: list[BaseException] = []
    clients = [TrunkClient(address, HIDDEN) for _ in range(3)]
    heads_tails = [tuple(cut_model(tiny_lora_model("llama"), 2, 2))[::2] for _ in clients]

    def train(client: TrunkClient, head_tail: tuple) -> None:
        try:
            for _ in range(2):
                remote_split_step(head_tail[0], head_tail[1], client, batch)
        except BaseException as err:  # surfaced in the main thread
            errors.append(err)

    # Execute
    threads = [threading.Thread(target=train, args=pair) for pair in zip(clients, heads_tails, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for client in clients:
        client.close()
    # Assert: 3 clients x 2 steps, none lost or mixed up
    assert not errors, errors
    grads = {n: p.grad for n, p in service.trunk.named_parameters() if "lora_" in n}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, 6 * expected[name], atol=1e-4, rtol=1e-5, msg=name)
