"""SplitLM: head + trunk + tail as one causal LM, the trunk in process or across the transport."""

from __future__ import annotations

import pytest
import torch

from fedtune.config import Config, ModelConfig, SplitConfig
from fedtune.split import cut_model
from fedtune.split.client import RemoteTrunk, TrunkClient
from fedtune.split.lm import SplitLM, parts_from_config
from fedtune.split.server import TrunkOptim, TrunkService, serve
from split.conftest import tiny_lora_model


def _lora_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if "lora_" in n and p.grad is not None}


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def test_in_process_split_lm_is_the_unsplit_model(batch) -> None:
    reference = tiny_lora_model("llama")
    head, trunk, tail = cut_model(tiny_lora_model("llama"), 2, 2)
    model = SplitLM(head, trunk, tail)
    expected = reference(**_model_inputs(batch))
    got = model(**_model_inputs(batch))
    valid_positions = batch["attention_mask"].bool()
    torch.testing.assert_close(
        got.logits[valid_positions], expected.logits[valid_positions], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)


def test_remote_split_lm_backward_trains_all_three_parts_like_the_unsplit_model(batch) -> None:
    reference = tiny_lora_model("llama")
    reference(**_model_inputs(batch)).loss.backward()
    expected = {k.replace(".default", ""): v for k, v in _lora_grads(reference).items()}

    head, trunk, tail = cut_model(tiny_lora_model("llama"), 2, 2)
    service = TrunkService(trunk, TrunkOptim(step_every=0))  # keep the trunk's gradients for the check
    server, port = serve(service)
    try:
        with TrunkClient(f"127.0.0.1:{port}", 64) as client:
            model = SplitLM(head, RemoteTrunk(client), tail)
            trunk_ids = {id(p) for p in trunk.parameters()}
            assert not trunk_ids & {id(p) for p in model.parameters()}, "the trunk is not the client's"
            loss = model(**_model_inputs(batch)).loss
            loss.backward()
            kinds = [m.kind for m in client.audit]
    finally:
        server.stop(0)
    assert kinds == ["FORWARD", "BACKWARD"]
    torch.testing.assert_close(loss, reference(**_model_inputs(batch)).loss, atol=1e-5, rtol=1e-5)
    got: dict[str, torch.Tensor] = {}
    for part in (head, trunk, tail):
        params = dict(part.named_parameters())
        for local, key in part._adapter_keys.items():
            got[key] = params[local].grad
    assert set(got) == set(expected)
    for key, grad in expected.items():
        torch.testing.assert_close(got[key], grad, atol=1e-5, rtol=1e-4, msg=key)


def test_eval_forward_keeps_no_graph_on_the_service(batch) -> None:
    head, trunk, tail = cut_model(tiny_lora_model("llama"), 2, 2)
    service = TrunkService(trunk, TrunkOptim(step_every=0))
    server, port = serve(service)
    try:
        with TrunkClient(f"127.0.0.1:{port}", 64) as client, torch.no_grad():
            SplitLM(head, RemoteTrunk(client), tail)(**_model_inputs(batch))
            assert [m.header.get("train") for m in client.audit] == [False]
    finally:
        server.stop(0)


def test_parts_from_config_client_only_drops_the_trunk_blocks() -> None:
    cfg = Config(model=ModelConfig(name="tiny-llama-4l"), split=SplitConfig(enabled=True, n_head=1, n_tail=1))
    whole = parts_from_config(cfg)
    client = parts_from_config(cfg, client_only=True)
    assert len(whole.trunk.blocks) == 2 and len(client.trunk.blocks) == 0
    assert set(client.head.adapter_state_dict()) == set(whole.head.adapter_state_dict())
    # the same seeded adapter on both sides: the client's head + tail match the whole model's
    for key, value in whole.tail.adapter_state_dict().items():
        torch.testing.assert_close(client.tail.adapter_state_dict()[key], value)
    ids = torch.tensor([[5, 6, 7, 8]])
    valid = torch.tensor([4])
    torch.testing.assert_close(client.head(ids, valid), whole.head(ids, valid))


def test_split_lm_refuses_left_padding() -> None:
    head, trunk, tail = cut_model(tiny_lora_model("llama"), 2, 2)
    with pytest.raises(ValueError, match="right-padded"):
        SplitLM(head, trunk, tail)(torch.tensor([[0, 5, 6]]), attention_mask=torch.tensor([[0, 1, 1]]))


def test_split_parts_of_a_4bit_base_carry_lora_only() -> None:
    pytest.importorskip("bitsandbytes")
    model = ModelConfig(name="tiny-llama-4l", quantization={"bits": 4})
    parts = parts_from_config(Config(model=model, split=SplitConfig(enabled=True, n_head=1, n_tail=1)))
    q_proj = parts.head.blocks[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    # what a split client exchanges: 1 layer x q/k/v/o x (A, B) per part, fp32 LoRA factors
    for part in (parts.head, parts.tail):
        state = part.adapter_state_dict()
        assert len(state) == 8 and all(".lora_" in k and v.dtype == torch.float32 for k, v in state.items())
