"""TrunkHost: trunk replicas for client groups, averaged after every round."""

from __future__ import annotations

import pytest
import torch

from fedtune.config import SplitConfig
from fedtune.split import cut_model
from fedtune.split.client import TrunkClient
from fedtune.split.host import TrunkHost, average_states, replicate
from split.conftest import tiny_lora_model


def test_average_states_weights_by_samples_by_hand() -> None:
    states = [{"a": torch.tensor([1.0, 2.0])}, {"a": torch.tensor([3.0, 6.0])}]
    torch.testing.assert_close(average_states(states, [1, 3])["a"], torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(average_states(states, [0, 0])["a"], torch.tensor([2.0, 4.0]))  # no samples


def test_replica_shares_frozen_weights_and_owns_its_lora() -> None:
    _, trunk, _ = cut_model(tiny_lora_model("llama"), 2, 2)
    copy = replicate(trunk)
    frozen = [(n, p) for n, p in trunk.named_parameters() if not p.requires_grad]
    lora = [(n, p) for n, p in trunk.named_parameters() if p.requires_grad]
    theirs = dict(copy.named_parameters())
    assert frozen and lora
    assert all(theirs[n] is p for n, p in frozen)
    assert all(theirs[n] is not p and torch.equal(theirs[n], p) for n, p in lora)
    with torch.no_grad():
        theirs[lora[0][0]].add_(1.0)
    assert not torch.equal(theirs[lora[0][0]], lora[0][1])
    assert copy.adapter_state_dict().keys() == trunk.adapter_state_dict().keys()


def test_hierarchical_host_serves_groups_apart_and_averages_their_trunks() -> None:
    _, trunk, _ = cut_model(tiny_lora_model("llama"), 2, 2)
    host = TrunkHost(trunk, SplitConfig(enabled=True, mode="hierarchical", groups=2), lr=1e-2)
    try:
        assert len(set(host.addresses)) == 2
        assert [host.address_for(p) for p in range(4)] == [host.addresses[0], host.addresses[1]] * 2
        host.begin_round()
        gen = torch.Generator().manual_seed(0)
        for group, batch in ((0, 1), (1, 3)):  # group 1 trains on 3 samples, group 0 on 1
            with TrunkClient(host.addresses[group], 64) as client:
                h1 = torch.randn(batch, 4, 64, generator=gen)
                client.forward(h1, torch.full((batch,), 4))
                client.backward(torch.randn(batch, 4, 64, generator=gen))
        states = [s.adapter_state_dict() for s in host.services]
        key = next(iter(states[0]))
        assert not torch.equal(states[0][key], states[1][key]), "each replica trained on its own"
        mean = host.end_round()
        for key, value in mean.items():
            torch.testing.assert_close(value, 0.25 * states[0][key] + 0.75 * states[1][key])
        for service in host.services:  # both continue from the average
            for key, value in service.adapter_state_dict().items():
                torch.testing.assert_close(value, mean[key])
    finally:
        host.stop()


def test_sequential_host_is_one_trunk_and_groups_need_hierarchical() -> None:
    _, trunk, _ = cut_model(tiny_lora_model("llama"), 2, 2)
    host = TrunkHost(trunk, SplitConfig(enabled=True), lr=1e-3)
    try:
        assert len(host.addresses) == 1 and host.address_for(5) == host.addresses[0]
        assert host.keys == set(trunk.adapter_state_dict())
    finally:
        host.stop()
    with pytest.raises(ValueError, match="hierarchical"):
        SplitConfig(enabled=True, groups=2)


def test_host_serves_tls_from_config_files(tmp_path) -> None:
    from split.test_service import _self_signed

    cert, key = _self_signed()
    (tmp_path / "trunk.pem").write_bytes(cert)
    (tmp_path / "trunk.key").write_bytes(key)
    split = SplitConfig(
        enabled=True,
        tls_cert=str(tmp_path / "trunk.pem"),
        tls_key=str(tmp_path / "trunk.key"),
        tls_root_cert=str(tmp_path / "trunk.pem"),
    )
    _, trunk, _ = cut_model(tiny_lora_model("llama"), 2, 2)
    host = TrunkHost(trunk, split, lr=1e-3)
    try:
        with TrunkClient(host.addresses[0], 64, tls_root_cert=split.tls_root_cert) as client:
            h2 = client.forward(torch.ones(1, 3, 64), torch.tensor([3]), train=False)
        assert h2.shape == (1, 3, 64)
        with pytest.raises(ConnectionError, match="plaintext"):
            TrunkClient(host.addresses[0], 64, timeout_s=2)
    finally:
        host.stop()
