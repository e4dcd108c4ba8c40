"""Which modules get LoRA: ``model.lora.target_modules`` resolved against the loaded model.

``"auto"`` (the default) targets every linear layer directly inside an attention block, found
by the block's class (``LlamaAttention``, ``Phi3Attention``, ``GPT2Attention``, ...), so fused
and differently named projections are covered without a table to keep up to date:

- Llama, Qwen2, Gemma, Mistral: ``q_proj k_proj v_proj o_proj`` (the default before ``auto``);
- Phi-3: ``qkv_proj o_proj`` (one fused projection for q, k and v);
- OPT: ``q_proj k_proj v_proj out_proj``; GPT-2: ``attn.c_attn attn.c_proj`` (Conv1D layers);
- GPT-NeoX: ``attention.query_key_value attention.dense``.

peft's own per-type defaults were not taken: they are q and v only and have no Phi-3 entry.
``"all-linear"`` (peft's: every linear layer but the output head) is there for adapters on
the MLPs too, at about three times the adapter's bytes on the wire. An explicit list is
checked: a name that matches no module, or a module that is not a linear layer, is a
FedtuneError naming ``model.lora.target_modules`` and the model's linear layers.

Targets are written as module paths with the layer index and everything before it dropped
(``self_attn.q_proj``): peft matches them by suffix, so they mean the same in every layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

KEY = "model.lora.target_modules"
_LAYER_INDEX = re.compile(r"^(?:.*\.)?\d+\.")


def is_linear(module: nn.Module) -> bool:
    """True for a layer LoRA can wrap as a projection.

    That is ``nn.Linear`` (bitsandbytes' 4/8-bit layers subclass it) or transformers' GPT-2
    style ``Conv1D``, also once peft has wrapped it.
    """
    from transformers.pytorch_utils import Conv1D

    base = getattr(module, "base_layer", None)  # a layer peft has wrapped already
    return isinstance(base if isinstance(base, nn.Module) else module, nn.Linear | Conv1D)


def _named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` without peft's own sub-layers (``lora_A``, ``base_layer``...)."""
    return [
        (n, m) for n, m in model.named_modules() if n and not re.search(r"\.(lora_\w+|base_layer)(\.|$)", n)
    ]


def short_name(path: str) -> str:
    """A module path without its layer index and what comes before it.

    ``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``; a path with no index
    (``lm_head``) is kept whole.
    """
    return _LAYER_INDEX.sub("", path)


def linear_layers(model: nn.Module) -> list[str]:
    """The model's linear layers by short name, in order of first appearance."""
    names = [short_name(n) for n, m in _named_modules(model) if is_linear(m)]
    return list(dict.fromkeys(names))


def attention_projections(model: nn.Module) -> list[str]:
    """Short names of the linear layers directly inside modules whose class ends in ``Attention``."""
    found = []
    for path, module in _named_modules(model):
        if type(module).__name__.endswith("Attention"):
            for child, sub in module.named_children():
                if is_linear(sub):
                    found.append(short_name(f"{path}.{child}"))
    return list(dict.fromkeys(found))


def _matches(path: str, target: str) -> bool:
    return path == target or path.endswith(f".{target}")


def resolve_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str] | str:
    """``model.lora.target_modules`` as peft takes it for ``model``: a checked list, or ``all-linear``.

    Raises
    ------
    FedtuneError
        ``auto`` on a model with no attention block holding linear layers; a listed name that
        matches no module, or matches one that is not a linear layer (naming the model's
        linear layers, so the fix is one look away).
    """
    from fedtune.errors import FedtuneError

    if targets == "all-linear":
        return "all-linear"
    layers = ", ".join(linear_layers(model)) or "none"
    if targets == "auto":
        found = attention_projections(model)
        if not found:
            raise FedtuneError(
                f"{KEY}='auto': found no attention block with linear layers in this model; "
                f"list the targets, or 'all-linear' (its linear layers: {layers})"
            )
        return found
    modules = _named_modules(model)
    for target in targets:
        hits = [m for n, m in modules if _matches(n, target)]
        if not hits:
            raise FedtuneError(
                f"{KEY}: {target!r} matches no module of this model; its linear layers: {layers}"
            )
        if not all(is_linear(m) for m in hits):
            kind = type(next(m for m in hits if not is_linear(m))).__name__
            raise FedtuneError(
                f"{KEY}: {target!r} is a {kind}, not a linear layer; its linear layers: {layers}"
            )
    return list(targets)


def targeted_from_keys(keys: Iterable[str]) -> list[str]:
    """What an adapter really targets, read from its peft state-dict keys.

    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` -> ``self_attn.q_proj``.
    """
    out = []
    for key in keys:
        for part in (".lora_A.", ".lora_B."):
            if part in key:
                out.append(short_name(key.split(part)[0]))
    return sorted(dict.fromkeys(out))


def needs_fan_in_fan_out(model: nn.Module, targets: list[str] | str) -> bool:
    """True when the targets are GPT-2 style ``Conv1D`` layers, whose weight is stored (in, out)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(targets, str):
        return any(isinstance(m, Conv1D) for m in model.modules())
    return any(
        isinstance(m, Conv1D) and any(_matches(n, t) for t in targets) for n, m in model.named_modules()
    )
