"""chat and eval use the run's adapter, template and RoPE scaling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.config import Config, load_config
from fedtune.inference import load_run, reply
from fedtune.models.adapters import initial_adapter_state
from fedtune.rundir import RunDir
from helpers import run_cli


def _run_dir(tmp_path: Path, *overrides: str) -> tuple[RunDir, Config]:
    cfg = load_config("configs/tiny.toml", [f"run.output_dir='{tmp_path}'", *overrides])
    run = RunDir.create(cfg)
    state = initial_adapter_state(cfg.model, seed=0)
    state = {k: v if "lora_A" in k else torch.full_like(v, 0.05) for k, v in state.items()}  # non-zero B
    run.save_round(1, state, cfg)
    run.mark_complete(1)
    run.save_final(state, cfg)
    return run, cfg


def test_chat_model_has_the_runs_rope_scaling_and_adapter(tmp_path: Path) -> None:
    run, _ = _run_dir(tmp_path, "model.rope_scaling={type='dynamic', factor=2.0}")
    loaded = load_run(run.path)
    assert loaded.model.config.rope_parameters["rope_type"] == "dynamic"
    assert loaded.model.config.rope_parameters["factor"] == 2.0
    assert loaded.adapter == run.path / "final"
    base = load_run(run.path, base_only=True)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert not torch.allclose(loaded.model(ids).logits, base.model(ids).logits)  # adapter is active


def test_reply_needs_a_user_turn_last(tmp_path: Path) -> None:
    run, _ = _run_dir(tmp_path)
    loaded = load_run(run.path)
    answer = reply(loaded, [{"role": "user", "content": "hello"}], max_new_tokens=4)
    assert isinstance(answer, str)
    from fedtune.errors import FedtuneError

    with pytest.raises(FedtuneError, match="end with a user message"):
        reply(loaded, [{"role": "assistant", "content": "hi"}])


def _cli(capsys, *args: str) -> tuple[int, str]:
    code, out, _ = run_cli(capsys, *args)
    return code, out


def test_chat_command_is_multi_turn(capsys, tmp_path: Path) -> None:
    run, _ = _run_dir(tmp_path)
    code, out = _cli(
        capsys, "chat", str(run.path), "--prompt", "hi", "--prompt", "and again", "--max-new-tokens", "3"
    )
    assert code == 0
    assert out.count("model>") == 2 and "and again" in out


def test_eval_command_compares_base_and_adapter(capsys, tmp_path: Path) -> None:
    run, _ = _run_dir(tmp_path)
    code, out = _cli(capsys, "eval", str(run.path))
    assert code == 0
    assert "base" in out and "adapter" in out
    assert out.count("│") > 3 * 4  # three client rows


def test_chat_on_a_directory_that_is_not_a_run(capsys, tmp_path: Path) -> None:
    code, _ = _cli(capsys, "chat", str(tmp_path))
    assert code == 2


def test_chat_with_a_clients_personal_adapter_fused(capsys, tmp_path: Path) -> None:
    from fedtune.models.adapters import save_adapter_folder

    run, cfg = _run_dir(tmp_path)
    personal = initial_adapter_state(cfg.model, seed=3)
    personal = {k: v if "lora_A" in k else torch.full_like(v, 0.2) for k, v in personal.items()}
    save_adapter_folder(personal, cfg.model.lora, cfg.model, run.path / "clients" / "1" / "personal-0001")
    fused = load_run(run.path, client=1)
    plain = load_run(run.path)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert not torch.allclose(fused.model(ids).logits, plain.model(ids).logits)
    code, out = _cli(
        capsys, "chat", str(run.path), "--client", "1", "--prompt", "hi", "--max-new-tokens", "2"
    )
    assert code == 0 and out.count("model>") == 1
    code, _ = _cli(capsys, "chat", str(run.path), "--client", "7", "--prompt", "hi")
    assert code == 2


def _break(run: RunDir, how: str) -> Path:
    weights = run.path / "final" / "adapter_model.safetensors"
    if how == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    return weights


@pytest.mark.parametrize("command", ["chat", "eval"])
@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing", "final: not a peft adapter folder (adapter_model.safetensors missing"),
        ("truncated", "final/adapter_model.safetensors: corrupt or truncated adapter weights"),
    ],
)
def test_missing_or_corrupt_adapter_is_a_clear_error(
    capsys, tmp_path: Path, command: str, how: str, message: str
) -> None:
    # Prepare
    run, _ = _run_dir(tmp_path)
    _break(run, how)
    # Execute
    code, _, err = run_cli(capsys, command, str(run.path), *(["--prompt", "hi"] if command == "chat" else []))
    # Assert (rich folds a long path anywhere, so compare without whitespace)
    assert code == 2
    assert message.replace(" ", "") in err.replace(" ", "") and "Traceback" not in err


def test_eval_and_chat_load_the_base_with_the_runs_quantisation(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    run, _ = _run_dir(tmp_path, "model.quantization={bits=8}")
    loaded = load_run(run.path)
    q_proj = loaded.model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear8bitLt"
    answer = reply(loaded, [{"role": "user", "content": "hello"}], max_new_tokens=2)
    assert isinstance(answer, str)
