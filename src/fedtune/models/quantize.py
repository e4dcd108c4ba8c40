"""Where the model runs (``model.device``, ``model.device_map``); how its base is quantised.

A quantised base follows QLoRA's order: the weights are quantised while they load (transformers'
``BitsAndBytesConfig``: each layer is quantised as its shard arrives, so the whole fp32 model
is never held), the model is prepared for k-bit training (peft's
``prepare_model_for_kbit_training``: base frozen, norms and embeddings in fp32, input gradients
on), and only then is LoRA attached. The adapter stays full precision and is all that trains
and travels; ``eval`` and ``chat`` load the base from the run's config, so with the same
quantisation.

Backend: bitsandbytes (pinned 0.50.2), which runs nf4, fp4 and int8 on CUDA and on the CPU.
On any other device, or without bitsandbytes installed, :func:`check_quantization` refuses the
config naming ``model.quantization`` before a run directory is made.

``model.device_map`` hands the placement to accelerate (transformers' ``device_map``): a model
too big for one GPU is spread over several (or GPU and CPU), layer by layer; it replaces
``model.device``. Its GPUs must exist here; ``disk`` offloading is not offered (the model trains).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from fedtune.config import ModelConfig, QuantizationConfig
from fedtune.errors import FedtuneError

# devices bitsandbytes 0.50 quantises on: CUDA and its CPU backend
BNB_DEVICES = ("cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a torch device: ``auto`` is the first CUDA GPU when there is one, else the CPU.

    Raises
    ------
    FedtuneError
        A CUDA device asked for on a machine without it (or with fewer GPUs).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise FedtuneError(f"model.device={name!r}: this machine has {count} CUDA device(s)")
    return device


def check_device_map(cfg: ModelConfig) -> None:
    """Raise FedtuneError naming ``model.device_map`` if it names a GPU this machine lacks."""
    if cfg.device_map is None:
        return
    if importlib.util.find_spec("accelerate") is None:
        raise FedtuneError("model.device_map: needs accelerate, not installed (pip install accelerate)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    targets = cfg.device_map.values() if isinstance(cfg.device_map, dict) else []
    for target in targets:
        gpu = isinstance(target, int) or torch.device(target).type == "cuda"
        index = target if isinstance(target, int) else torch.device(target).index
        if gpu and (index or 0) >= count:
            raise FedtuneError(f"model.device_map: {target!r}: this machine has {count} CUDA device(s)")


def check_quantization(cfg: ModelConfig) -> None:
    """Raise FedtuneError naming the key if the model's placement or quantisation cannot run here.

    A CUDA device this machine lacks (``model.device`` or ``model.device_map``), a device
    bitsandbytes cannot quantise on, or bitsandbytes missing.
    """
    check_device_map(cfg)
    device = resolve_device(cfg.device)
    if cfg.quantization is None:
        return
    if device.type not in BNB_DEVICES:
        raise FedtuneError(
            f"model.quantization: bitsandbytes cannot quantise on {device.type!r} "
            f"(model.device={cfg.device!r}); it runs on {', '.join(BNB_DEVICES)}"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FedtuneError(
            "model.quantization: needs bitsandbytes, not installed (pip install bitsandbytes==0.50.2)"
        )


def bnb_config(q: QuantizationConfig) -> Any:
    """``model.quantization`` as transformers' ``BitsAndBytesConfig``."""
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.kind,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        bnb_4bit_use_double_quant=q.double_quant,
    )


def load_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for the model's placement and ``model.quantization``.

    ``model.device_map`` is passed as it is. Otherwise a quantised base is placed by
    ``device_map`` on ``model.device`` (bitsandbytes quantises as the weights land on the
    device), and a full-precision one is moved with ``.to`` after loading.
    """
    check_quantization(cfg)
    out: dict[str, Any] = {}
    if cfg.device_map is not None:
        out["device_map"] = cfg.device_map
    if cfg.quantization is not None:
        out["quantization_config"] = bnb_config(cfg.quantization)
        out.setdefault("device_map", {"": resolve_device(cfg.device)})
    return out


def is_quantized(model: torch.nn.Module) -> bool:
    """True for a model transformers loaded with a quantisation config."""
    return getattr(model, "hf_quantizer", None) is not None


def release_weight_file(model: torch.nn.Module) -> None:
    """Copy a model's float tensors on the CPU out of the memory-mapped weight file.

    Called on a quantised base, whose unquantised tensors (embeddings, norms, the head) would
    otherwise keep the mapping of the full-precision file alive.

    transformers loads safetensors through a memory map; tensors kept as they are (not
    quantised) stay views of it, and with them every page of the full-precision file that
    quantising read: clean, reclaimable pages, but counted in the process's RSS (6 GB after an
    nf4 load of a 1.7B Llama, for 1.15 GB of 4-bit weights). Values, dtypes and ties are kept.
    """
    for param in model.parameters():  # a tied parameter is listed once: the tie is kept
        if param.is_floating_point() and param.device.type == "cpu":
            param.data = param.data.clone()
    for module in model.modules():
        for key, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.device.type == "cpu":
                setattr(module, key, buf.clone())  # stays a buffer, persistent or not


def prepare_for_lora(model: Any) -> Any:
    """Make a quantised base ready for LoRA (peft's k-bit preparation); others pass unchanged.

    Gradient checkpointing is left off: fedtune's models are small enough, and it would change
    the training step's behaviour between quantised and full-precision runs.
    """
    if not is_quantized(model):
        return model
    from peft import prepare_model_for_kbit_training

    keep_cpu_layout_for_training(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def keep_cpu_layout_for_training(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel on a model that trains.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit.forward`` rewrites the weight, in
    place, into a packed layout the first time it runs in eval mode without gradients (as
    fedtune's held-out evaluation does), and does not unpack it when the model trains again:
    the training forward then reads the packed bytes as the plain layout. Measured on
    SmolLM2-135M nf4 (bench/quant.py): held-out loss 3.03 before, 13.76 after one round. A
    model that trains keeps the plain layout (its evaluation is a little slower on the CPU);
    served models, which never train, still pack.
    """
    from bitsandbytes.nn.modules import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
