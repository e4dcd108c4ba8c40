"""Split runs end to end through Flower's simulation runtime: the three modes, resume, chat."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import load_config
from fedtune.errors import FedtuneError
from fedtune.inference import load_run, load_split_run, reply
from fedtune.launch import preflight
from helpers import run_cli
from test_e2e import resume_after_round_1, same_adapter, tiny_run

SPLIT = (
    "model.name='tiny-llama-4l'",
    "split.enabled=true",
    "split.n_head=1",
    "split.n_tail=1",
    "train.num_threads=1",
)
TRUNK_LAYERS = {"1", "2"}  # tiny-llama-4l cut 1 + 2 + 1


def _layer(key: str) -> str:
    return key.split(".layers.")[1].split(".")[0]


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# Tests of a simulated run (Ray) are marked integration; the config checks at the end are not.
@pytest.fixture(scope="module")
def split_run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("split"), *SPLIT)


@pytest.mark.integration
def test_split_run_trains_head_tail_and_trunk_and_checkpoints_the_whole_adapter(split_run: Path) -> None:
    start = load_file(split_run / "rounds" / "0000" / "adapter_model.safetensors")
    final = load_file(split_run / "final" / "adapter_model.safetensors")
    assert final.keys() == start.keys()
    assert {_layer(k) for k in final} == {"0", "1", "2", "3"}  # head, trunk and tail in one peft folder
    changed = {
        _layer(k) for k in final if k.endswith("lora_B.weight") and not torch.equal(final[k], start[k])
    }
    assert changed == {"0", "1", "2", "3"}, "every part's LoRA trained (B starts at zero)"
    train = [x for x in _lines(split_run) if x["phase"] == "train"]
    assert len(train) == 6 and all(x["trunk_bytes_up"] > 0 and x["trunk_bytes_down"] > 0 for x in train)
    # Flower carried only the client-side adapter: one round's upload is far smaller than the whole
    whole = sum(v.numel() for v in final.values()) * 2  # fp16 wire
    client = sum(v.numel() for k, v in final.items() if _layer(k) not in TRUNK_LAYERS) * 2
    assert all(client <= x["bytes_up"] < whole for x in train)
    evals = [x for x in _lines(split_run) if x["phase"] == "server" and "eval_loss" in x]
    assert [x["round"] for x in evals] == [0, 1, 2] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    # sequential: one trunk pass per client step, on every sample the clients trained on
    for server in [x for x in _lines(split_run) if x["phase"] == "server" and x["round"] > 0]:
        assert server["trunk_passes"] == 3 * 2 and server["trunk_samples"] == 3 * 2 * 4


@pytest.mark.integration
def test_split_run_resumes_exactly(split_run: Path, tmp_path: Path) -> None:
    resumed = resume_after_round_1(split_run, tmp_path / "copy")
    assert same_adapter(split_run / "final", resumed / "final")


@pytest.mark.integration
def test_chat_across_the_split_equals_the_unsplit_model(split_run: Path) -> None:
    history = [{"role": "user", "content": "Do you like books?"}]
    across = load_split_run(split_run)
    try:
        assert across.model is None and across.split is not None
        split_text = reply(across, history, max_new_tokens=12)
        prompt = torch.tensor([[1, 2, 3, 4, 5]])
        split_tokens = across.split.generate(prompt, 12, None)
    finally:
        across.split.close()  # type: ignore[union-attr]
    whole = load_run(split_run)
    assert reply(whole, history, max_new_tokens=12) == split_text
    expected = whole.model.generate(  # type: ignore[union-attr]
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False
    )[0, 5:]
    assert split_tokens == expected.tolist()


@pytest.mark.integration
def test_chat_command_on_a_split_run(
    split_run: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedtune")
    code, out, err = run_cli(capsys, "chat", str(split_run), "--prompt", "hi", "--max-new-tokens", "4")
    assert code == 0, err[-2000:]
    assert "model>" in out
    assert "trunk service on 127.0.0.1" in caplog.text  # it started one of its own


@pytest.mark.integration
@pytest.mark.parametrize(
    ("mode", "groups", "expect"),
    [
        ("client-batch", 1, "trunk service (client-batch)"),
        ("hierarchical", 2, "trunk service (hierarchical)"),
    ],
)
def test_concurrent_modes_run(tmp_path: Path, mode: str, groups: int, expect: str) -> None:
    run = tiny_run(tmp_path, *SPLIT, f"split.mode='{mode}'", f"split.groups={groups}", "fed.rounds=1")
    final = load_file(run / "final" / "adapter_model.safetensors")
    start = load_file(run / "rounds" / "0000" / "adapter_model.safetensors")
    trunk_changed = [k for k in final if _layer(k) in TRUNK_LAYERS and not torch.equal(final[k], start[k])]
    assert trunk_changed
    assert all(torch.isfinite(v).all() for v in final.values())


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (("fed.strategy='fflora'",), "fed.strategy"),
        (("model.name='tiny-llama'",), "split.n_head + split.n_tail"),  # 2 layers: nothing for the trunk
        (
            ("split.tls_cert='nope.pem'", "split.tls_key='nope.key'", "split.tls_root_cert='ca.pem'"),
            "split.tls_cert",
        ),
    ],
)
def test_bad_split_config_is_refused_before_the_run_starts(overrides: tuple[str, ...], field: str) -> None:
    cfg = load_config("configs/tiny.toml", [*SPLIT, *overrides])
    with pytest.raises(FedtuneError, match=field.replace("+", r"\+")):
        preflight(cfg)


def test_split_config_ships_and_loads() -> None:
    cfg = load_config("configs/split.toml")
    assert cfg.split.enabled and cfg.model.name == "smollm2"
    with pytest.raises(FedtuneError, match=r"split\.groups"):
        load_config("configs/split.toml", ["split.groups=2"])


@pytest.mark.integration
def test_chat_with_a_trunk_service_of_its_own_process(
    split_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedtune")
    ready = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtune", "serve-trunk", "--config", str(split_run / "config.toml"),
         "--adapter", str(split_run / "final"), "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "trunk service did not start"
            time.sleep(0.2)
        address = f"127.0.0.1:{ready.read_text()}"
        across = load_split_run(split_run, trunk=address)
        try:
            assert across.split is not None and across.split.server is None  # no service of its own
            prompt = torch.tensor([[7, 8, 9, 10]])
            tokens = across.split.generate(prompt, 10, None)
        finally:
            across.split.close()  # type: ignore[union-attr]
        cli = run_cli(
            capsys, "chat", str(split_run), "--prompt", "hi", "--max-new-tokens", "4", "--trunk", address
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    whole = load_run(split_run).model
    expected = whole.generate(  # type: ignore[union-attr]
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False
    )[0, 4:]
    assert tokens == expected.tolist()
    code, out, err = cli
    assert code == 0 and "model>" in out, err[-2000:]
    assert "trunk service on" not in caplog.text  # it used the given service, started none
