"""A deployment with TLS and SuperNode authentication on loopback, as docs/deployment.md sets one up.

The certificates and keys are made at run time (``certificates.py``): a CA and a server
certificate for 127.0.0.1, and an ECDSA P-384 key pair per SuperNode. The SuperLink runs
with ``--enable-supernode-auth``; an administrator's CLI registers two of the public keys
with ``flwr supernode register``; a third SuperNode brings a key nobody registered. One
round of configs/tiny.toml then runs over TLS with the two registered nodes only.

The fast tests check the files themselves: those of ``certificates.py`` and those the
``openssl`` and ``ssh-keygen`` lines of docs/deployment.md make, under a strict TLS client.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from certificates import TlsFiles, make_node_key, make_tls_files
from loopback import LoopbackDeployment, superlink_healthy

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "deployment.md"
# the doc's names for host A -> loopback names; 127.0.0.1, the SuperLink's own, stays as it is
DOC_HOSTS = {"superlink.example.org": "localhost", "10.0.0.5": "127.0.0.2"}
BIN = Path(sys.executable).parent
# a plain-HTTP run takes ~30 s on 2 idle cores (test_deployment.py); this whole test took
# 157-213 s while other jobs kept the 2 cores at a load average of 8-15
DEADLINE_S = 360.0
OVERRIDES = "partition.num_partitions=2 fed.rounds=1 fed.timeout=300"


def wait_until_online(dep: LoopbackDeployment, timeout_s: float) -> list[dict[str, str]]:
    """``flwr supernode ls`` until every node it lists is online; the last listing."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes: list[dict[str, str]] = dep.flwr("supernode", "ls")["nodes"]
        if all(node["status"] == "online" for node in nodes) or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def flwr_run(
    env: dict[str, str], overrides: str, dep: LoopbackDeployment
) -> subprocess.CompletedProcess[str]:
    """``flwr run REPO deployment --stream`` of configs/tiny.toml; the logs if it overruns."""
    args = [str(BIN / "flwr"), "run", str(REPO), "deployment", "--stream"]
    args += ["--run-config", f"config-file='configs/tiny.toml' overrides='{overrides}'"]
    try:
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"flwr run took over {DEADLINE_S:.0f} s\n{exc.stdout!r:.3000}\n{dep.diagnostics()}")


def tls_handshake(tls: TlsFiles, hostname: str) -> None:
    """A TLS handshake on loopback, the server on ``tls``, the client dialling ``hostname``.

    The client trusts only ``tls.ca_cert`` and verifies strictly (RFC 5280 rules that
    Python 3.13 turns on by default), so a file that a stricter SuperNode or CLI would
    reject fails here too. Raises ``ssl.SSLCertVerificationError`` on a bad certificate.
    """
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tls.server_cert, tls.server_key)
    client = ssl.create_default_context(cafile=tls.ca_cert)
    client.verify_flags |= ssl.VERIFY_X509_STRICT
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            with contextlib.suppress(OSError), server.wrap_socket(conn, server_side=True) as tls_conn:
                tls_conn.recv(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw:
                client.wrap_socket(raw, server_hostname=hostname).close()
        finally:
            thread.join(timeout=10)


def assert_p384_pair(private: Path) -> None:
    """``private`` and ``private.pub`` are one ECDSA P-384 key pair in OpenSSH format."""
    key = load_ssh_private_key(private.read_bytes(), None)
    public = load_ssh_public_key(private.with_name(private.name + ".pub").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public == key.public_key()


def doc_key_commands() -> list[str]:
    """The ``openssl``/``printf``/``ssh-keygen`` lines of docs/deployment.md, for loopback."""
    lines = DOC.read_text().splitlines()
    commands = [line for line in lines if line.split(" ", 1)[0] in ("openssl", "printf", "ssh-keygen")]
    for doc_host, loopback_host in DOC_HOSTS.items():
        commands = [command.replace(doc_host, loopback_host) for command in commands]
    return commands


def test_make_tls_files_names_loopback_for_a_strict_client(tmp_path: Path) -> None:
    # Prepare
    tls = make_tls_files(tmp_path)
    node = make_node_key(tmp_path / "node0")

    # Execute / Assert: both loopback names verify; a name not in subjectAltName does not
    tls_handshake(tls, "127.0.0.1")
    tls_handshake(tls, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        tls_handshake(tls, "superlink.example.org")
    assert_p384_pair(node)


@pytest.mark.skipif(
    not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl and ssh-keygen"
)
def test_docs_recipe_makes_files_a_strict_client_accepts(tmp_path: Path) -> None:
    # Prepare: the doc's commands, with loopback for its host names
    commands = doc_key_commands()
    assert [c.split(" ", 1)[0] for c in commands] == ["openssl", "openssl", "printf", "openssl", "ssh-keygen"]

    # Execute
    for command in commands:
        subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True, capture_output=True, timeout=60)

    # Assert: the names the SuperNodes and the CLI dial, and the SuperLink's own 127.0.0.1, verify
    tls = TlsFiles(tmp_path / "ca.crt", tmp_path / "server.pem", tmp_path / "server.key")
    for hostname in ("localhost", "127.0.0.2", "127.0.0.1"):
        tls_handshake(tls, hostname)
    assert_p384_pair(tmp_path / "node0")


@pytest.mark.slow
def test_tls_and_supernode_auth_admit_registered_nodes_only(tmp_path: Path) -> None:
    # Prepare: a CA, a certificate for 127.0.0.1, keys for two registered nodes and one stranger
    tls = make_tls_files(tmp_path / "pki")
    keys = [make_node_key(tmp_path / "keys" / f"node{i}") for i in range(2)]
    stranger_key = make_node_key(tmp_path / "keys" / "stranger")
    root = tmp_path / "deployment"
    with LoopbackDeployment(root, num_nodes=2, tls=tls, node_keys=keys) as dep:
        # partition 2 of 3: were it admitted, its metrics would carry client 2
        stranger = dep.start_supernode(
            "supernode-stranger", {"partition-id": 2, "num-partitions": 3}, key=stranger_key
        )
        env = dep.connect("deployment", default=True)  # the user's CLI: root-certificates, no insecure
        out_dir = root / "runs"

        # Execute: the stranger is turned away, then one round runs over TLS
        try:
            stranger_rc = stranger.wait(timeout=120)  # refused, it exits a few seconds after start-up
        except subprocess.TimeoutExpired:
            pytest.fail(f"the SuperNode with an unregistered key is still up\n{dep.diagnostics()}")
        before = wait_until_online(dep, timeout_s=60)
        cli = flwr_run(env, f"{OVERRIDES} run.output_dir={out_dir}", dep)
        after = dep.flwr("supernode", "ls")["nodes"]
        context = f"flwr run exited {cli.returncode}\n{cli.stdout[-3000:]}\n{cli.stderr[-3000:]}\n"
        context += dep.diagnostics()

        # Assert: TLS only; the stranger exited refused and was never a node
        assert not superlink_healthy(dep.port), "the SuperLink answered plain HTTP"
        assert superlink_healthy(dep.port, tls.ca_cert), context
        stranger_log = (root / "supernode-stranger.log").read_text(errors="replace")
        assert stranger_rc != 0, context
        assert "Exit Code: 305" in stranger_log and "Failed to activate SuperNode" in stranger_log, context
        registered = {str(node_id) for node_id in dep.node_ids}
        assert len(registered) == 2, context
        assert {n["node-id"]: n["status"] for n in before} == dict.fromkeys(registered, "online"), context
        assert {n["node-id"] for n in after} == registered, context

    # Assert: one complete round with the two registered nodes' partitions
    runs = list(out_dir.glob("*/state.json"))
    assert len(runs) == 1, context
    assert json.loads(runs[0].read_text())["last_round"] == 1, context
    assert (runs[0].parent / "final" / "adapter_model.safetensors").is_file(), context
    lines = [json.loads(line) for line in (runs[0].parent / "metrics.jsonl").read_text().splitlines()]
    clients = {line["client"] for line in lines if line["round"] == 1 and line["phase"] == "train"}
    assert clients == {0, 1}, context
