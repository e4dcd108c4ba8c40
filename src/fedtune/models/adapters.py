"""peft glue: attach LoRA, read and write adapter state dicts, save peft adapter folders."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from fedtune.config import LoraConfig, ModelConfig
from fedtune.errors import FedtuneError
from fedtune.io import atomic_folder
from fedtune.models.quantize import prepare_for_lora
from fedtune.models.targets import needs_fan_in_fan_out, resolve_targets, short_name, targeted_from_keys

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

StateDict = dict[str, torch.Tensor]


def peft_lora_config(
    cfg: LoraConfig, targets: list[str] | str, *, fan_in_fan_out: bool = False
) -> PeftLoraConfig:
    """``model.lora`` as peft's LoraConfig for a causal LM (no bias terms trained) on ``targets``.

    ``targets`` come from :func:`fedtune.models.targets.resolve_targets`.
    """
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        task_type="CAUSAL_LM",
    )


def lora_for(model: torch.nn.Module, cfg: LoraConfig) -> PeftLoraConfig:
    """Peft's LoraConfig for ``model``, its ``model.lora.target_modules`` resolved and checked.

    ``fan_in_fan_out`` is set for GPT-2 style Conv1D targets.
    """
    targets = resolve_targets(model, cfg.target_modules)
    return peft_lora_config(cfg, targets, fan_in_fan_out=needs_fan_in_fan_out(model, targets))


def attach_lora(model: PreTrainedModel, cfg: LoraConfig, *, seed: int = 0) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter; A is drawn from ``seed``, B is zero.

    A quantised base is prepared for k-bit training first (:func:`~fedtune.models.quantize.prepare_for_lora`).
    """
    model = prepare_for_lora(model)
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, lora_for(model, cfg))
    except ValueError as err:  # e.g. target modules not found in the model
        raise FedtuneError(f"model.lora.target_modules: {err}") from None
    return peft_model


def adapter_state(model: PeftModel, name: str = "default") -> StateDict:
    """The adapter's weights (peft names, fp32 copies detached from the model)."""
    state = get_peft_model_state_dict(model, adapter_name=name)
    return {k: v.detach().to(torch.float32).clone() for k, v in state.items()}


def load_adapter_state(model: PeftModel, state: Mapping[str, torch.Tensor], name: str = "default") -> None:
    """Overwrite the adapter's weights; every key must match the model's adapter."""
    expected = get_peft_model_state_dict(model, adapter_name=name)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise FedtuneError(
            f"adapter keys do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise FedtuneError(
                f"adapter weight {key}: shape {tuple(value.shape)} != model's {tuple(expected[key].shape)}"
            )
    set_peft_model_state_dict(
        model, {k: v.to(expected[k].dtype) for k, v in state.items()}, adapter_name=name
    )


def save_adapter_folder(
    state: Mapping[str, torch.Tensor], lora: LoraConfig, model: ModelConfig, out: str | Path
) -> Path:
    """Write a peft adapter folder atomically (``PeftModel.from_pretrained`` loads it).

    Its config records the modules the weights really adapt (read from their keys), not
    ``auto`` or the names as listed, and ``fan_in_fan_out`` where they are GPT-2 style
    Conv1D layers (so peft loads it as trained, without resetting the flag itself).
    """
    out = Path(out)
    targets = targeted_from_keys(state)
    conv1d = conv1d_layers(model.name, model.trust_remote_code)
    with atomic_folder(out) as tmp:
        config = peft_lora_config(lora, targets, fan_in_fan_out=any(t in conv1d for t in targets))
        config.base_model_name_or_path = model.name
        config.save_pretrained(str(tmp))
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / ADAPTER_WEIGHTS)
    return out


def check_adapter_folder(folder: str | Path) -> Path:
    """``folder`` if it is a readable peft adapter folder, else a FedtuneError naming what is wrong.

    Checks that both files are there, that the config is a JSON object and that the weights'
    header is whole (a truncated ``.safetensors`` file fails here); not the weights' values.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FedtuneError(f"{folder}: no such adapter folder")
    weights, config = folder / ADAPTER_WEIGHTS, folder / ADAPTER_CONFIG
    missing = [p.name for p in (weights, config) if not p.is_file()]
    if missing:
        raise FedtuneError(
            f"{folder}: not a peft adapter folder ({' and '.join(missing)} missing; "
            f"it needs {ADAPTER_WEIGHTS} + {ADAPTER_CONFIG})"
        )
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FedtuneError(f"{config}: corrupt adapter config ({err})") from None
    if not isinstance(parsed, dict):
        raise FedtuneError(f"{config}: corrupt adapter config (not a JSON object)")
    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise FedtuneError(f"{weights}: corrupt or truncated adapter weights ({err})") from None
    return folder


def read_adapter_folder(folder: str | Path) -> StateDict:
    """The adapter weights of a peft folder (fp32); FedtuneError if it is missing or corrupt."""
    weights = check_adapter_folder(folder) / ADAPTER_WEIGHTS
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise FedtuneError(f"{weights}: corrupt or truncated adapter weights ({err})") from None
    return {k: v.to(torch.float32) for k, v in state.items()}


def load_adapter_folder(
    model: PreTrainedModel | PeftModel, folder: str | Path, *, name: str = "default", trainable: bool = False
) -> PeftModel:
    """Wrap ``model`` with the adapter of a peft folder as adapter ``name`` (peft reads its config).

    On a model that is already a :class:`PeftModel` the adapter is added beside the others.
    A missing or corrupt folder, or one that does not fit the model, is a FedtuneError naming it.
    """
    folder = check_adapter_folder(folder)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=name, is_trainable=trainable)
            return model
        return PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=trainable)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as err:
        raise FedtuneError(f"{folder}: could not load the adapter: {err}") from None


def adapter_num_bytes(state: Mapping[str, torch.Tensor], bytes_per_value: int = 4) -> int:
    """Raw size of an adapter's values at ``bytes_per_value`` (fp32 = 4)."""
    return sum(v.numel() for v in state.values()) * bytes_per_value


def meta_model(model: ModelConfig) -> PreTrainedModel:
    """``model``'s architecture built on the meta device: its modules without its weights."""
    from transformers import AutoModelForCausalLM

    from fedtune.models.load import load_model_config

    config = load_model_config(model)
    with torch.device("meta"):
        base: PreTrainedModel = AutoModelForCausalLM.from_config(
            config, trust_remote_code=model.trust_remote_code
        )
    return base


@functools.cache
def conv1d_layers(name: str, trust_remote_code: bool = False) -> frozenset[str]:
    """Short names (``attn.c_attn``) of model ``name``'s GPT-2 style Conv1D layers, read once per process."""
    from transformers.pytorch_utils import Conv1D

    base = meta_model(ModelConfig(name=name, trust_remote_code=trust_remote_code))
    return frozenset(short_name(n) for n, m in base.named_modules() if isinstance(m, Conv1D))


def initial_adapter_state(model: ModelConfig, *, seed: int) -> StateDict:
    """A fresh adapter (A drawn from ``seed``, B zero) without loading the base weights.

    The base model is built on the meta device, so a server can start a run for a
    model it could not hold in memory; only the LoRA factors are materialised.
    """
    from peft.tuners.lora import LoraLayer

    base = meta_model(model)
    try:
        peft_model = get_peft_model(base, lora_for(base, model.lora))
    except ValueError as err:
        raise FedtuneError(f"model.lora.target_modules: {err}") from None
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.lora_A.to_empty(device="cpu")
            module.lora_B.to_empty(device="cpu")
    reset_adapter(peft_model, "default", seed=seed)
    return adapter_state(peft_model)


def reset_adapter(model: PeftModel, name: str, *, seed: int) -> None:
    """Re-initialise adapter ``name`` as peft does (A random from ``seed``, B zero)."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            module.reset_lora_parameters(name, True)


def ensure_adapter(model: PeftModel, name: str, lora: LoraConfig) -> None:
    """Make sure ``model`` has an adapter ``name`` of ``lora``'s rank and alpha."""
    existing = model.peft_config.get(name)
    if existing is not None and (existing.r, existing.lora_alpha) != (lora.r, lora.alpha):  # type: ignore[attr-defined]
        model.base_model.set_adapter("default")  # type: ignore[operator]  # peft keeps one adapter active
        model.delete_adapter(name)
        existing = None
    if existing is None:
        model.add_adapter(name, lora_for(model.get_base_model(), lora))


def activate(model: PeftModel, names: list[str], *, trainable: str | list[str] | None) -> None:
    """Sum the adapters ``names`` in the forward pass; only ``trainable`` get gradients."""
    model.base_model.set_adapter(names)  # type: ignore[operator]
    chosen = [trainable] if isinstance(trainable, str) else (trainable or [])
    markers = [f".{name}." for name in chosen]
    for param_name, param in model.named_parameters():
        param.requires_grad = "lora_" in param_name and any(m in param_name for m in markers)


def sent_keys(keys: Iterable[str], lora: LoraConfig) -> list[str]:
    """The adapter keys a client sends back: all of them, or only B under FFA-LoRA (``freeze_a``)."""
    return [k for k in keys if not (lora.freeze_a and ".lora_A." in k)]


def parameter_names(state: Mapping[str, torch.Tensor], name: str = "default") -> dict[str, str]:
    """Each peft state-dict key -> its model parameter (``.lora_A.weight`` -> ``.lora_A.<name>.weight``)."""
    out = {}
    for key in state:
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                out[key] = key.replace(part, f"{part}{name}.")
    return out
