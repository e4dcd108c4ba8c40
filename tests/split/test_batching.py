"""Client-batch mode: one trunk pass over several clients' activations, gradients sliced back."""

from __future__ import annotations

import copy
import threading

import torch

from fedtune.split import cut_model
from fedtune.split.batching import BatchingTrunkService
from fedtune.split.client import TrunkClient
from fedtune.split.server import TrunkOptim, serve
from split.conftest import tiny_lora_model

HIDDEN = 64


def _alone(trunk, h1: torch.Tensor, valid: torch.Tensor, grad: torch.Tensor):  # type: ignore[no-untyped-def]
    """What a trunk of its own gives one client: h2, dL/dh1 and the trunk's LoRA gradients."""
    trunk = copy.deepcopy(trunk)
    trunk.train()
    leaf = h1.clone().requires_grad_()
    h2 = trunk(leaf, valid)
    h2.backward(grad)
    grads = {n: p.grad.clone() for n, p in trunk.named_parameters() if p.grad is not None}
    return h2.detach(), leaf.grad, grads


def _inputs(seed: int, batch: int, seq: int, valid: list[int]):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    h1 = torch.randn(batch, seq, HIDDEN, generator=gen)
    grad = torch.randn(batch, seq, HIDDEN, generator=gen)
    for i, n in enumerate(valid):  # padding columns carry nothing, as from a real tail
        grad[i, n:] = 0
    return h1, torch.tensor(valid), grad


def test_two_clients_share_one_trunk_pass_and_each_gets_its_own_slices() -> None:
    _, trunk, _ = cut_model(tiny_lora_model("llama"), 2, 2)
    reference = copy.deepcopy(trunk)
    service = BatchingTrunkService(trunk, TrunkOptim(step_every=0), wait_s=30.0)  # only "all joined" closes
    server, port = serve(service)
    inputs = [_inputs(1, 2, 5, [5, 3]), _inputs(2, 1, 7, [6])]  # different batch sizes and lengths
    results: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    clients = [TrunkClient(f"127.0.0.1:{port}", HIDDEN) for _ in inputs]
    barrier = threading.Barrier(len(clients))

    def work(i: int) -> None:
        h1, valid, grad = inputs[i]
        barrier.wait()  # both streams are open before either sends
        h2 = clients[i].forward(h1, valid)
        results[i] = (h2, clients[i].backward(grad))

    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        for c in clients:
            c.close()
        server.stop(0)
    assert service.batch_sizes == [2]
    summed: dict[str, torch.Tensor] = {}
    for i, (h1, valid, grad) in enumerate(inputs):
        h2, grad_h1, grads = _alone(reference, h1, valid, grad)
        got_h2, got_grad = results[i]
        assert got_h2.shape == h1.shape
        for row, n in enumerate(valid.tolist()):  # valid positions: what the client uses
            torch.testing.assert_close(got_h2[row, :n], h2[row, :n], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got_grad[row, :n], grad_h1[row, :n], atol=1e-5, rtol=1e-4)
        for name, g in grads.items():
            summed[name] = summed.get(name, 0) + g
    got = {n: p.grad for n, p in trunk.named_parameters() if p.grad is not None}
    assert set(got) == set(summed)
    for name, g in summed.items():  # one pass, the sum of both clients' gradients
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_a_client_that_hangs_up_mid_batch_does_not_stall_the_others() -> None:
    # an idle open session is waited for up to wait_s; one that hangs up is not waited for
    _, trunk, _ = cut_model(tiny_lora_model("llama"), 2, 2)
    reference = copy.deepcopy(trunk)
    service = BatchingTrunkService(trunk, TrunkOptim(step_every=0), wait_s=30.0)
    server, port = serve(service)
    stay, leave = _inputs(3, 1, 4, [4]), _inputs(4, 1, 4, [4])
    clients = [TrunkClient(f"127.0.0.1:{port}", HIDDEN, timeout_s=30) for _ in range(2)]
    barrier = threading.Barrier(2)
    out: dict[str, torch.Tensor] = {}

    def stayer() -> None:
        barrier.wait()
        clients[0].forward(stay[0], stay[1])
        out["grad"] = clients[0].backward(stay[2])

    def leaver() -> None:
        barrier.wait()
        clients[1].forward(leave[0], leave[1])
        clients[1].close()  # gone before its BACKWARD

    try:
        threads = [threading.Thread(target=stayer), threading.Thread(target=leaver)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        clients[0].close()
        # the service goes on: a new client gets a step of its own
        with TrunkClient(f"127.0.0.1:{port}", HIDDEN, timeout_s=30) as late:
            late.forward(stay[0], stay[1])
            late.backward(stay[2])
    finally:
        clients[0].close()
        server.stop(0)
    assert service.batch_sizes == [2, 1]
    _, expected, _ = _alone(reference, *stay)
    torch.testing.assert_close(out["grad"], expected, atol=1e-5, rtol=1e-4)  # the leaver added nothing
