"""Hand a run's model to other tools: ``fedtune export RUN OUT [--merge]``.

- The adapter folder as peft writes it, with ``base_model_name_or_path`` set to something
  ``from_pretrained`` loads anywhere on this host (a hub id, or the absolute folder of a local
  or built-in model), so ``AutoPeftModelForCausalLM.from_pretrained(OUT)`` works.
- ``--merge``: base + LoRA merged (peft ``merge_and_unload``) into a full model folder in the
  run's dtype, with the run's RoPE scaling in its config and the tokenizer beside it: plain
  transformers (and what reads its folders: vLLM, lm-eval, llama.cpp's converter) loads it.
  A run on a quantised base (``model.quantization``) is merged into its base loaded
  *unquantised*, in ``model.dtype``: merging into a 4/8-bit base would round the LoRA update
  into the quantised weights and write a bitsandbytes checkpoint. The merged model is so the
  adapter on the full-precision weights, not bit for bit the model trained (whose base was
  rounded to 4/8 bits); quantise it again when loading if that is wanted.

Either is written atomically; an existing ``OUT`` is refused unless ``replace``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from fedtune.errors import FedtuneError
from fedtune.io import atomic_folder
from fedtune.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter_folder, load_adapter_folder
from fedtune.models.load import load_model, load_tokenizer, resolve_model_path
from fedtune.rundir import RunDir


def loadable_base(name: str) -> str:
    """``model.name`` as ``from_pretrained`` takes it outside fedtune: a hub id, or an absolute path."""
    path = resolve_model_path(name)
    return str(Path(path).resolve()) if Path(path).expanduser().exists() else path


def export_run(run_dir: str | Path, out: str | Path, *, merge: bool = False, replace: bool = False) -> Path:
    """Write the run's adapter (or, with ``merge``, the merged model) to ``out``; returns ``out``."""
    out = Path(out)
    run = RunDir.open(run_dir)
    cfg = run.config()
    folder = check_adapter_folder(run.final_dir())  # a missing or corrupt adapter fails here, named
    if out.exists() and not replace:
        raise FedtuneError(f"{out}: already exists (pass --replace to overwrite it)")
    base = loadable_base(cfg.model.name)
    with atomic_folder(out) as tmp:
        if merge:
            _write_merged(run, folder, tmp)
        else:
            _write_adapter(folder, base, tmp)
    return out


def _write_adapter(folder: Path, base: str, tmp: Path) -> None:
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shutil.copyfile(folder / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)


@torch.no_grad()
def _write_merged(run: RunDir, folder: Path, tmp: Path) -> None:
    model_cfg = run.config().model.model_copy(update={"quantization": None})  # see the module's docstring
    merged = load_adapter_folder(load_model(model_cfg), folder).merge_and_unload()
    merged.save_pretrained(str(tmp))
    load_tokenizer(model_cfg).save_pretrained(str(tmp))
